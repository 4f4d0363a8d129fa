"""Sequential consistency: every schedule on real ranks trains exactly like one process.

The backbone test of the package. For each schedule (naive, GPipe, 1F1B, interleaved with
``v = 2``, ZB-H1), ``p`` ranks and ``m`` micro-batches, :func:`minipipe.runtime.train` on real
gloo ranks must give the losses, every gradient and the weights after the SGD step that
:func:`minipipe.runtime.reference` (one process, whole batch) gives.

Tolerance: ``atol = 1e-5``, ``rtol = 1e-4`` (float32). The pipeline sums the weighted loss
of ``m`` micro-batches, and each gradient is accumulated micro-batch by micro-batch, while
the reference reduces over the whole batch at once: the same sums added in another order.
Floating-point addition is not associative, so the results differ in the last bits (in
practice ~1e-7); anything beyond the tolerance is a real bug (a missing micro-batch, a wrong
loss scale, a gradient sent to the wrong stage).

Grid (chosen to keep this file near two minutes on two cores): every schedule with the MLP
and the untied GPT at ``p = 2`` for ``m`` in ``{1, p, 2p + 1}`` where the schedule allows it
(interleaved needs ``m % p == 0``, so ``m = p`` and ``2p``); at ``p = 4`` one ``m`` per
schedule with the MLP, and 1F1B with the GPT (marked ``slow``: ~6–9 s each with four ranks
on two cores). Runs with ``m = 2p + 1`` take two optimizer steps on two different batches.
The memory and message tests read the same runs (cached per session).
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch

from minipipe.runtime import ConfigError, RunResult, reference, train
from minipipe.schedules import Schedule, make_schedule
from minipipe.validate import ScheduleError

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")
ATOL, RTOL = 1e-5, 1e-4
SCHEDULES = ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"]


def allowed_ms(name: str, p: int) -> list[int]:
    if name == "interleaved":
        return [p, 2 * p]  # Megatron-LM's constraint: m a multiple of p
    return [1, p, 2 * p + 1]


def steps_for(p: int, m: int) -> int:
    return 2 if m == 2 * p + 1 else 1


P2_GRID = [(name, 2, m, kind) for name in SCHEDULES for m in allowed_ms(name, 2)
           for kind in ("mlp", "gpt")]
P4_GRID = [("naive", 4, 2, "mlp"), ("gpipe", 4, 9, "mlp"), ("1f1b", 4, 9, "mlp"),
           ("interleaved", 4, 4, "mlp"), ("zb-h1", 4, 9, "mlp"), ("1f1b", 4, 4, "gpt")]
_RUNS: dict[tuple, tuple[RunResult, dict]] = {}


def _id(case: tuple) -> str:
    name, p, m, kind = case
    return f"{name}-p{p}-m{m}-{kind}"


@pytest.fixture
def run(make_case):
    """``run(name, p, m, kind) -> (RunResult, reference)``, each configuration run once."""

    def go(name: str, p: int, m: int, kind: str):
        key = (name, p, m, kind)
        if key not in _RUNS:
            model, loss_fn, data = make_case(kind, m, steps_for(p, m))
            schedule = make_schedule(name, p, m, v=2 if name == "interleaved" else 1)
            result = train(model, loss_fn, schedule, data, return_grads=True,
                           return_params=True, timeout=120)
            _RUNS[key] = (result, reference(model, loss_fn, data))
        return _RUNS[key]

    return go


def assert_matches(result: RunResult, ref: dict) -> None:
    """Losses of every step, last gradients and final weights equal the reference's."""
    assert result.losses == pytest.approx(ref["losses"], rel=RTOL, abs=ATOL)
    grads, params = result.grads, result.params
    assert grads.keys() == ref["grads"].keys()
    assert params.keys() == ref["params"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=ATOL, rtol=RTOL,
                                   msg=lambda s: f"gradient {name}: {s}")
    for name, w in ref["params"].items():
        torch.testing.assert_close(params[name], w, atol=ATOL, rtol=RTOL,
                                   msg=lambda s: f"weight {name}: {s}")


# ------------------------------------------------------------------ sequential consistency


@pytest.mark.parametrize("case", P2_GRID, ids=_id)
def test_two_ranks_match_single_process_training(run, case):
    result, ref = run(*case)
    assert_matches(result, ref)
    assert len(result.losses) == steps_for(case[1], case[2])


@pytest.mark.slow
@pytest.mark.parametrize("case", P4_GRID, ids=_id)
def test_four_ranks_match_single_process_training(run, case):
    result, ref = run(*case)
    assert_matches(result, ref)


def test_tied_gpt_copies_stay_identical_and_match(make_case):
    model, loss_fn, data = make_case("gpt-tied", 2, steps=2)
    result = train(model, loss_fn, make_schedule("1f1b", 2, 2), data, return_grads=True,
                   return_params=True, timeout=120)
    assert_matches(result, reference(model, loss_fn, data))
    copies = result.copies("0.tok.weight")
    assert len(copies) == 2  # the embedding on rank 0, the LM head on rank 1
    torch.testing.assert_close(copies[0], copies[1], atol=0, rtol=0)


@pytest.mark.parametrize("orders", [
    ["F0 F1 F2 B0 B1 B2", "F0 B0 F1 B1 F2 B2"],  # fill-drain on rank 0, one at a time on rank 1
    ["F0 F1 B0 W0 B1 W1", "F0 B0 F1 B1 W1 W0"],  # split backward, W deferred on rank 1
], ids=["mixed", "split-backward"])
def test_hand_written_schedule_runs_and_matches(make_case, orders):
    schedule = Schedule(orders, name="by hand")
    model, loss_fn, data = make_case("mlp", schedule.m)
    result = train(model, loss_fn, schedule, data, return_grads=True, return_params=True,
                   timeout=120)
    assert_matches(result, reference(model, loss_fn, data))
    assert result.messages == 2 * (schedule.p - 1) * schedule.m


# ---------------------------------------------------------------- memory and messages

MEMORY_CASES = [("gpipe", 2, 5, "mlp"), ("1f1b", 2, 5, "mlp"), ("gpipe", 2, 1, "mlp"),
                ("1f1b", 2, 1, "mlp"), ("gpipe", 4, 9, "mlp"), ("1f1b", 4, 9, "mlp")]


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c[1] == 4 else c
                                  for c in MEMORY_CASES], ids=_id)
def test_peak_activation_bytes_equal_prediction_and_closed_form(run, case):
    name, p, m, _ = case
    result, _ = run(*case)
    per_mb = [chunks[0] for chunks in result.activation_bytes_per_mb]
    assert all(b > 0 for b in per_mb)
    held = [m] * p if name == "gpipe" else [min(p - r, m) for r in range(p)]
    closed_form = [k * b for k, b in zip(held, per_mb)]
    assert result.peak_activation_bytes == result.predicted_activation_bytes
    assert result.peak_activation_bytes == closed_form


@pytest.mark.parametrize("case", P2_GRID + [pytest.param(c, marks=pytest.mark.slow)
                                            for c in P4_GRID], ids=_id)
def test_messages_per_step(run, case):
    name, p, m, _ = case
    result, _ = run(*case)
    v = result.schedule.v
    assert result.messages == 2 * (p * v - 1) * m  # activations forward, gradients backward
    assert result.timeline.messages == result.messages


def test_measured_timeline_has_every_action_once(run):
    result, _ = run("1f1b", 2, 5, "mlp")
    timelines = result.timelines()
    assert len(timelines) == 2 and len(result.step_times) == 2
    tl = result.timeline
    assert sorted((e.rank, e.action.label(True)) for e in tl.events) == sorted(
        (r, a.label(True)) for r, order in enumerate(result.schedule.ranks) for a in order)
    assert all(e.end >= e.start for e in tl.events)
    assert 0 <= tl.bubble_fraction < 1 and result.step_time > 0
    assert "1f1b" in result.summary()


# ------------------------------------------------------------ bad configurations fail fast


def _forbid_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process was about to start for a configuration that cannot run")

    monkeypatch.setattr("minipipe.runtime.caller.launch", refuse)


@pytest.mark.parametrize("problem", ["batch", "unequal-dp", "layers", "schedule", "bounds",
                                     "batch-shapes"])
def test_bad_configuration_fails_before_any_process(make_case, monkeypatch, problem):
    _forbid_launch(monkeypatch)
    model, loss_fn, data = make_case("mlp", 4)
    (x, y), = data
    schedule, kwargs, error = make_schedule("1f1b", 2, 4), {}, ConfigError
    if problem == "batch":  # 10 samples cannot make 4 equal micro-batches
        data, match = (x[:10], y[:10]), "multiple of 4"
    elif problem == "unequal-dp":  # 2 replicas x 4 micro-batches need a multiple of 8
        data, kwargs, match = (x[:12], y[:12]), {"dp": 2}, "multiple of 8"
    elif problem == "layers":  # 8 units cannot fill 9 stages
        schedule, match = make_schedule("naive", 9, 1), "at least 9 layers"
        data = (x[:4], y[:4])
    elif problem == "schedule":
        schedule, error, match = Schedule(["F0 B0", "B0 F0"]), ScheduleError, "before its F"
    elif problem == "batch-shapes":  # specs: a meta-device trial forward finds the bad stage
        from minipipe.models import mlp_specs

        model, data, match = mlp_specs(layers=6, width=16, d_in=4, d_out=8), (x, y), "stage 0"
    else:
        kwargs, match = {"bounds": [0, 8, 8]}, "empty"
    start = time.perf_counter()
    with pytest.raises(error, match=match):
        train(model, loss_fn, schedule, data, **kwargs)
    assert time.perf_counter() - start < 1.0
    assert not multiprocessing.active_children()


def test_interleaved_needs_m_multiple_of_p():
    with pytest.raises(ValueError, match="multiple"):
        make_schedule("interleaved", 2, 3, v=2)


# ------------------------------------------------------------------------------- GPUs

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_GPUS != 1, reason="needs exactly one CUDA GPU (auto then stages through host)")
def test_one_gpu_two_ranks_staged_through_host(make_case):
    model, loss_fn, data = make_case("mlp", 4)
    result = train(model, loss_fn, make_schedule("1f1b", 2, 4), data, return_grads=True,
                   return_params=True, backend="auto", timeout=120)
    assert result.info["backend"] == "gloo" and result.info["device"] == "cuda"
    assert result.info["staged"] is True
    assert_matches(result, reference(model, loss_fn, data))


@pytest.mark.gpu
@pytest.mark.skipif(_GPUS < 2, reason="needs at least two CUDA GPUs for NCCL")
def test_two_gpus_use_nccl(make_case):
    model, loss_fn, data = make_case("mlp", 4)
    result = train(model, loss_fn, make_schedule("1f1b", 2, 4), data, return_grads=True,
                   return_params=True, backend="auto", timeout=120)
    assert result.info["backend"] == "nccl" and result.info["staged"] is False
    assert_matches(result, reference(model, loss_fn, data))
