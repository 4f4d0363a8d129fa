"""The local verification checkpoint that ends every notebook.

One table, the same in every lesson: versions, backend, device, ranks and cores, runtime,
the data used, the key figures observed, and notes on what the result depends on, so a
workshop can compare machines and a learner can tell whether a number is theirs to trust.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

__all__ = ["environment", "verification_checkpoint", "Stopwatch"]

_START = time.perf_counter()


class Stopwatch:
    """Started when a notebook imports this module; ``elapsed()`` is the notebook's runtime."""

    start = _START

    @classmethod
    def reset(cls) -> None:
        cls.start = time.perf_counter()

    @classmethod
    def elapsed(cls) -> float:
        return time.perf_counter() - cls.start


def environment() -> dict[str, Any]:
    """Versions and hardware as the course reports them."""
    import matplotlib

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "cores": os.cpu_count() or 1,
        "gpus": gpus,
        "gpu": torch.cuda.get_device_name(0) if gpus else "none",
    }


def verification_checkpoint(lesson: str, figures: dict[str, Any], *, result: Any = None,
                            ranks: int | None = None, data: str = "", notes: list[str] | None = None,
                            show: bool = True) -> dict[str, Any]:
    """Print (and return) the checkpoint table that closes a notebook.

    Args:
        lesson: e.g. ``"02 micro-batches and GPipe"``.
        figures: the key figures this notebook observed, name -> value.
        result: a :class:`~minipipe.runtime.RunResult` whose backend, device and ranks are
            reported (else the machine's defaults are).
        ranks: ranks used, when there is no ``result``.
        data: what data the measurements used.
        notes: what the figures depend on (model size, CPU vs GPU, ranks vs cores, ...).
    """
    env = environment()
    info = getattr(result, "info", {}) or {}
    world = info.get("world_size", ranks)
    rows: dict[str, Any] = {"lesson": lesson, **env}
    rows["backend"] = info.get("backend", "gloo" if not env["gpus"] else "nccl/gloo")
    rows["device"] = info.get("device", "cpu" if not env["gpus"] else "cuda")
    if world is not None:
        rows["ranks"] = world
    rows["runtime"] = f"{Stopwatch.elapsed():.1f} s"
    if data:
        rows["data"] = data
    for k, val in figures.items():
        rows[k] = f"{val:.4g}" if isinstance(val, float) else val
    notes = list(notes or [])
    if world is not None and rows["device"] == "cpu" and world > env["cores"]:
        notes.append(f"{world} ranks share {env['cores']} cores: wall-clock times include CPU "
                     "contention; compare shapes and ratios, not absolute times")
    if show:
        width = max(len(k) for k in rows)
        print("Local verification checkpoint")
        print("-" * (width + 40))
        for k, val in rows.items():
            print(f"{k:<{width}}  {val}")
        for note in notes:
            print(f"note: {note}")
    rows["notes"] = notes
    return rows
