"""Shared fixtures for the multi-process tests: small models, their data, and a leak check."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch


def _mlp_case(m: int, steps: int = 1, layers: int = 6):
    from minipipe.models import mlp, mlp_batch

    model = mlp(layers=layers, width=16, d_in=8, d_out=8)  # layers + 2 units
    data = [mlp_batch(4 * m, d_in=8, d_out=8, seed=k) for k in range(steps)]
    return model, torch.nn.functional.mse_loss, data


def _gpt_case(m: int, steps: int = 1, tie: bool = False):
    from minipipe.models import gpt, gpt_loss

    model = gpt(vocab=32, context=8, width=16, layers=2, heads=2, tie=tie)  # 4 units
    data = []
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        tokens = torch.randint(0, 32, (2 * m, 9), generator=g)
        data.append((tokens[:, :-1], tokens[:, 1:]))  # next-token targets, (B, T)
    return model, gpt_loss, data


@pytest.fixture
def make_case():
    """``make_case("mlp" | "gpt" | "gpt-tied", m, steps) -> (model, loss_fn, batches)``.

    Batches hold a whole number of micro-batches (4 samples each for the MLP, 2 for the GPT);
    each step gets its own batch, and every model has at least 4 units.
    """

    def make(kind: str, m: int, steps: int = 1):
        if kind == "mlp":
            return _mlp_case(m, steps)
        return _gpt_case(m, steps, tie=kind == "gpt-tied")

    return make


def _rank_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("minipipe-rank")]


@pytest.fixture
def no_leftover_ranks():
    """Fail the test if a spawned rank process is still alive shortly after it ends."""
    yield
    deadline = time.monotonic() + 5
    while _rank_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _rank_children()
    assert not left, f"rank processes survived the test: {left}"
