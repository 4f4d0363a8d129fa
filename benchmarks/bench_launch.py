"""How long the launcher takes to start ranks, and how fast the simulator plays big schedules.

1. ``launch()`` of a function that does nothing, ``p`` = 1, 2, 4: spawning the processes,
   importing torch in each, the TCP-store rendezvous, ``init_process_group``, the result's
   way back and the shutdown. Median of ``--repeat`` runs.
2. First-step latency of :func:`minipipe.runtime.train` (a small MLP, 1F1B, ``m = 4``): from
   the call to (a) the first forward starting on rank 0, (b) the first optimizer step's
   backward finishing on rank 0 — the step's last action — and (c) ``train`` returning after
   ``--steps`` steps. (a) and (b) come from a marker layer after the first layer that writes
   ``time.perf_counter()`` (CLOCK_MONOTONIC, shared by all processes on Linux) to a file.
3. :func:`minipipe.simulate.simulate` for ``p = 64, m = 1024``, 1F1B and interleaved ``v = 4``:
   ``benchmarks/bench_simulator.py`` does the timing and checks the result.

Run::

    python benchmarks/bench_launch.py            # p = 1, 2, 4 (4 ranks on 2 cores: contended)
    python benchmarks/bench_launch.py --quick    # p = 1, 2, fewer repeats: the CI smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_simulator, run as a script

from minipipe.runtime.launch import Context, launch  # noqa: E402
from minipipe.models import mlp, mlp_batch  # noqa: E402
from minipipe.runtime import train  # noqa: E402
from minipipe.schedules import one_f_one_b  # noqa: E402


def _noop(ctx: Context) -> int:
    return ctx.rank


class _Stamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, path):  # type: ignore[override]
        ctx.path = path
        _append(path, "F")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        _append(ctx.path, "B")
        return grad, None


def _append(path: str, what: str) -> None:
    with open(path, "a") as f:
        f.write(f"{what} {time.perf_counter()!r}\n")


class Mark(nn.Module):
    """Identity that writes the time of each forward and backward through it to ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Stamp.apply(x, self.path)


def bare_launch(p: int, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert launch(_noop, p) == list(range(p))
        times.append(time.perf_counter() - start)
    return {"p": p, "median_s": statistics.median(times), "min_s": min(times)}


def first_step(p: int, m: int, steps: int, repeat: int) -> dict:
    """Seconds from calling train() to rank 0's first forward, first step's end, and return."""
    first_f, first_step_end, total = [], [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "marks.txt")
            net = mlp(layers=max(4, 2 * p), width=64, d_in=32, d_out=32)
            model = nn.Sequential(net[0], Mark(path), *net[1:])  # marks sit on stage 0
            x, y = mlp_batch(8 * m, 32, 32)
            start = time.perf_counter()
            train(model, F.mse_loss, one_f_one_b(p, m), (x, y), steps=steps)
            total.append(time.perf_counter() - start)
            marks = [line.split() for line in Path(path).read_text().splitlines()]
        f_times = [float(t) for kind, t in marks if kind == "F"]
        b_times = [float(t) for kind, t in marks if kind == "B"]
        first_f.append(f_times[0] - start)
        first_step_end.append(b_times[m - 1] - start)  # the m-th backward ends step 0
    med = statistics.median
    return {"p": p, "first_forward_s": med(first_f), "first_step_s": med(first_step_end),
            "total_s": med(total), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="p = 1, 2 and fewer repeats (CI)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per case (default 5)")
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    ps = [1, 2] if args.quick else [1, 2, 4]
    cores = os.cpu_count() or 1
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    print(f"{cpu}, {cores} cores, torch {torch.__version__},"
          f" Python {platform.python_version()}; load average {load}; median of {repeat} run(s)")

    print("\nlaunch() of a no-op rank function (spawn, import, rendezvous, shutdown)")
    print(f"{'p':>3} {'median s':>9} {'min s':>7}")
    for p in ps:
        r = bare_launch(p, repeat)
        flag = "  (more ranks than cores)" if p > cores else ""
        print(f"{p:>3} {r['median_s']:>9.2f} {r['min_s']:>7.2f}{flag}")

    steps = 3
    print(f"\ntrain(): seconds from the call (MLP, 1F1B, m=4, {steps} steps)")
    print(f"{'p':>3} {'first F starts':>15} {'first step ends':>16} {'train returns':>14}")
    for p in ps:
        r = first_step(p, 4, steps, repeat)
        flag = "  (more ranks than cores)" if p > cores else ""
        print(f"{p:>3} {r['first_forward_s']:>15.2f} {r['first_step_s']:>16.2f} "
              f"{r['total_s']:>14.2f}{flag}")

    print("\nsimulate(): benchmarks/bench_simulator.py", flush=True)
    import bench_simulator

    bench_simulator.main(["--quick"] if args.quick else ["--repeat", "3"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
