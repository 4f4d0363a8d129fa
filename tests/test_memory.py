"""Activation memory is observed, and the observation can disagree with the prediction.

:class:`~minipipe.runtime.ActivationMeter` (default ``memory="observed"``) registers each
storage a forward saves through a weak reference and samples the storages still alive after
every action. The tests here show that it sees what a count cannot: a stage that keeps a
micro-batch's output one forward longer than autograd (measured peak above the prediction), and
a model whose saved bytes depend on the data, not only on the shapes (each micro-batch measured
right, against an independent measurement in this process). ``memory="counted"``, the cheap
bookkeeping for benchmarks, is shown to miss both.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minipipe.models import mlp, mlp_batch
from minipipe.runtime import ActivationMeter, train
from minipipe.schedules import make_schedule

# ------------------------------------------------------------------ the meter in one process


def test_meter_follows_the_storage_not_the_tensor_autograd_holds():
    meter = ActivationMeter([])
    x = torch.randn(4, 8, requires_grad=True)
    with meter.record(0, 0):
        y = torch.tanh(x)  # saves its output: 128 bytes
        z = y * y  # saves y twice: the same storage, counted once
    assert meter.bytes[(0, 0)] == 4 * 8 * 4
    view = y[:2]  # a view of y's storage outlives the graph and y
    z.sum().backward()
    del y, z
    assert meter.sample("B") == 4 * 8 * 4  # the whole storage is still alive through the view
    del view
    assert meter.sample("after") == 0  # and the meter itself did not keep it alive


def test_meter_never_counts_parameters_and_counted_mode_trusts_release():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    outs = {}
    for mode in ("observed", "counted"):
        meter = ActivationMeter(list(layer.parameters()), mode=mode)
        with meter.record(0, 0):
            out = torch.tanh(layer(x))  # saves x (the weight is a parameter) and tanh's output
        assert meter.bytes[(0, 0)] == 2 * 4 * 8 * 4
        meter.release(0, 0)  # the runtime says "gone"; the graph is still alive through out
        outs[mode] = (meter, out)
    assert outs["observed"][0].sample("B") == 2 * 4 * 8 * 4
    assert outs["counted"][0].sample("B") == 0
    del outs["observed"], out
    meter = outs.pop("counted")[0]
    del x
    assert meter.sample("later") == 0
    with pytest.raises(ValueError, match="observed"):
        ActivationMeter([], mode="guessed")


# -------------------------------------------------------------- disagreeing on real ranks


class KeepPrevious(nn.Module):
    """A planted leak: ``tanh`` whose module keeps the previous micro-batch's output alive."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)  # autograd saves y
        self.kept = (self.kept + [y])[-2:]  # ...and so does the module, one forward longer
        return y


@pytest.mark.slow
def test_a_planted_leak_shows_as_an_observed_peak_above_the_prediction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), KeepPrevious(), nn.Linear(16, 8))
    data = mlp_batch(16, d_in=8, d_out=8)
    schedule = make_schedule("1f1b", 2, 4)
    leak = 4 * 16 * 4  # one micro-batch's tanh output (4 rows x 16 x float32)
    observed = train(model, F.mse_loss, schedule, data, bounds=[0, 2, 4], timeout=120)
    assert observed.memory_mode == "observed"
    assert observed.peak_activation_bytes[0] == observed.predicted_activation_bytes[0]
    assert observed.peak_activation_bytes[1] == observed.predicted_activation_bytes[1] + leak
    counted = train(model, F.mse_loss, schedule, data, bounds=[0, 2, 4], memory="counted",
                    timeout=120)
    assert counted.memory_mode == "counted"
    assert counted.peak_activation_bytes == counted.predicted_activation_bytes  # blind to it
    assert "observed" in observed.summary() and "counted" in counted.summary()


class GateByData(nn.Module):
    """Saves more for micro-batches whose mean is positive: ``x·sigmoid(x)`` there, else ``x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x) if x.mean() > 0 else x


def _saved_bytes_here(stage: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> int:
    """What one stage's forward saves, measured in this process without the runtime's meter."""
    params = {q.untyped_storage().data_ptr() for q in stage.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            sizes[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(x)
        if target is not None:
            F.mse_loss(out, target)
    return sum(sizes.values())


@pytest.mark.slow
def test_saved_bytes_that_depend_on_the_data_are_observed_per_micro_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), GateByData(), GateByData(), nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.abs_()  # a positive input gives a positive hidden mean, and vice versa
    sign = torch.tensor([3.0, -3.0, 3.0, -3.0]).repeat_interleave(4)[:, None]
    x, y = torch.randn(16, 8) + sign, torch.randn(16, 8)  # micro-batches alternate in sign
    schedule = make_schedule("gpipe", 2, 4)
    run = train(model, F.mse_loss, schedule, (x, y), bounds=[0, 2, 4], timeout=120)
    stages = [model[:2], model[2:]]
    for r in range(2):
        inputs = x.tensor_split(4) if r == 0 else [model[:2](c).detach() for c in x.tensor_split(4)]
        here = [_saved_bytes_here(stages[r], c.clone().requires_grad_(r > 0),
                                  t.clone() if r == 1 else None)
                for c, t in zip(inputs, y.tensor_split(4))]
        assert [run.activation_bytes()[r][(0, mb)] for mb in range(4)] == here
    per_mb = run.activation_bytes()[0]
    assert per_mb[(0, 0)] != per_mb[(0, 1)]  # the data, not the shape, decides
    assert run.peak_activation_bytes == run.predicted_activation_bytes
    counted = train(model, F.mse_loss, schedule, (x, y), bounds=[0, 2, 4], memory="counted",
                    timeout=120)  # measures the first micro-batch of each shape, reuses it
    assert counted.activation_bytes()[0][(0, 1)] == per_mb[(0, 0)] != per_mb[(0, 1)]


# ------------------------------------------------------------------ ZB-H1: between B and W


@pytest.mark.slow
def test_zb_h1_keeps_the_graph_until_w_observed():
    model, data = mlp(layers=2, width=16, d_in=8, d_out=8), mlp_batch(16, d_in=8, d_out=8)
    run = train(model, F.mse_loss, make_schedule("zb-h1", 2, 4), data, timeout=120)
    per_mb = run.activation_bytes()
    for r in range(2):
        after = {label: held for label, _, held in run.activation_trace(r)}
        whole = per_mb[r][(0, 0)]
        lost_at_b = whole - after["B0"][(0, 0)]  # micro-batch 0, between its B and its W
        assert (0, 0) not in after["W0"]  # all of it gone after W
        if r == 0:  # no input gradient on stage 0: W runs the whole backward, all kept till then
            assert lost_at_b == 0
        else:  # torch frees what only the loss saved (its input and the target) at B
            assert lost_at_b == 2 * 4 * 8 * 4
    assert run.peak_activation_bytes[0] == run.predicted_activation_bytes[0]
    assert run.peak_activation_bytes[1] <= run.predicted_activation_bytes[1]
