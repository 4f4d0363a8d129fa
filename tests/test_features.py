"""Model features on real ranks: tied weights, activation checkpointing, data × pipeline, saving.

Every run is compared with :func:`minipipe.runtime.reference` (one process, whole batch) at the
tolerance of the runtime tests, ``atol = 1e-5``, ``rtol = 1e-4``: the pipeline adds the same
numbers in another order (micro-batch by micro-batch), so float32 results differ in the last
bits (~1e-7 in practice); anything beyond is a bug. Two ranks wherever the feature allows, four
only for the 2 × 2 grid of data × pipeline parallelism (marked ``slow``).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minipipe.runtime
from minipipe.models import ResidualMLP, gpt, gpt_loss, mlp, mlp_batch
from minipipe.partition import by_parameters
from minipipe.runtime import ActivationMeter, RunResult, reference, train
from minipipe.schedules import make_schedule
from minipipe.state import (CheckpointError, atomic_save, load_into, merge_checkpoint,
                            rank_file)

ATOL, RTOL = 1e-5, 1e-4
TIED = "0.tok.weight"  # the token embedding, reused by the LM head (layer 3 of the tiny GPT)


def tiny_gpt() -> nn.Sequential:
    return gpt(vocab=32, context=8, width=16, layers=2, heads=2, tie=True)  # 4 units, tied


def token_batches(batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for k in range(steps):
        tokens = torch.randint(0, 32, (batch, 9), generator=torch.Generator().manual_seed(100 + k))
        out.append((tokens[:, :-1], tokens[:, 1:]))  # next-token targets, (B, T)
    return out


def small_mlp() -> nn.Sequential:
    return mlp(layers=4, width=16, d_in=8, d_out=8)  # 6 units


def mlp_batches(batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [mlp_batch(batch, d_in=8, d_out=8, seed=k) for k in range(steps)]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: names differ"
    for name, t in expected.items():
        torch.testing.assert_close(actual[name], t, atol=ATOL, rtol=RTOL,
                                   msg=lambda s, name=name: f"{what} {name}: {s}")


def assert_matches(run: RunResult, ref: dict) -> None:
    """Losses of every step, the last gradients and the final weights equal the reference's."""
    assert run.losses == pytest.approx(ref["losses"], rel=RTOL, abs=ATOL)
    assert_close(run.grads, ref["grads"], "gradient")
    assert_close(run.params, ref["params"], "weight")


# ------------------------------------------------------------------------- tied weights


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"])
def test_tied_gpt_matches_reference_with_every_schedule(name):
    model, data = tiny_gpt(), token_batches(4, steps=3)
    schedule = make_schedule(name, 2, 2, v=2 if name == "interleaved" else 1)
    run = train(model, gpt_loss, schedule, data, return_grads=True, return_params=True,
                timeout=120)
    assert_matches(run, reference(model, gpt_loss, data))
    embedding, head = run.copies(TIED)  # rank 0 holds the embedding, rank 1 the LM head
    assert torch.equal(embedding, head), "the two copies of the tied weight differ"


def test_tied_copies_drift_without_sync():
    # Adam, because its step is ~lr per element whatever the gradient's size: with SGD the
    # missing half of the gradient moves this tiny model's loss by only ~2e-5 in 3 steps.
    model, data = tiny_gpt(), token_batches(4, steps=3)
    ref = reference(model, gpt_loss, data, optimizer="adam", lr=0.01)
    runs = {sync: train(model, gpt_loss, make_schedule("1f1b", 2, 2), data, optimizer="adam",
                        lr=0.01, tie_sync=sync, return_params=True, timeout=120)
            for sync in (True, False)}
    assert runs[True].losses == pytest.approx(ref["losses"], rel=RTOL, abs=ATOL)
    embedding, head = runs[False].copies(TIED)
    assert (embedding - head).abs().max() > 1e-4, "without the sync the copies should drift"
    assert runs[False].losses[0] == pytest.approx(ref["losses"][0], rel=RTOL, abs=ATOL)
    assert abs(runs[False].losses[-1] - ref["losses"][-1]) > 10 * (ATOL + RTOL * ref["losses"][-1])


def tied_across_chunks() -> nn.Sequential:
    """Four units; unit 2 reuses unit 0's weight. With p = 2, v = 2 both are on rank 0."""
    torch.manual_seed(0)
    first, third = nn.Linear(8, 8), nn.Linear(8, 8)
    third.weight = first.weight  # stage 0 (rank 0, chunk 0) and stage 2 (rank 0, chunk 1)
    return nn.Sequential(first, ResidualMLP(8, 16), third, nn.Linear(8, 8))


@pytest.mark.parametrize("case", ["gpt-p1-v2", "linear-p2-v2"])
def test_weight_shared_by_two_chunks_of_one_rank_gets_the_exact_gradient(case):
    if case == "gpt-p1-v2":  # one rank, two chunks: embedding in chunk 0, LM head in chunk 1
        model, loss_fn, data = tiny_gpt(), gpt_loss, token_batches(4, steps=2)
        schedule, name = make_schedule("interleaved", 1, 2, v=2), TIED
    else:
        model, loss_fn, data = tied_across_chunks(), F.mse_loss, mlp_batches(8, steps=2)
        schedule, name = make_schedule("interleaved", 2, 2, v=2), "0.weight"
    run = train(model, loss_fn, schedule, data, return_grads=True, return_params=True, timeout=120)
    ref = reference(model, loss_fn, data)
    assert_matches(run, ref)
    torch.testing.assert_close(run.grads[name], ref["grads"][name], atol=ATOL, rtol=RTOL)
    assert len(run.copies(name)) == 1  # one rank holds it: one copy, its gradient summed locally


# ------------------------------------------------------------- activation checkpointing


def test_checkpointing_keeps_gradients_and_saves_only_stage_boundaries():
    model = mlp(layers=6, width=32, d_in=8, d_out=8)  # units: 8 -> 32, 6 x (32 -> 32), 32 -> 8
    data = mlp_batch(16, d_in=8, d_out=8)
    m, mb = 4, 4  # four micro-batches of four samples
    runs = {ck: train(model, F.mse_loss, make_schedule("1f1b", 2, m), data, checkpoint=ck,
                      return_grads=True, return_params=True, timeout=120)
            for ck in (False, True)}
    ref = reference(model, F.mse_loss, data)
    for run in runs.values():
        assert_matches(run, ref)
        assert run.memory_mode == "observed"
        assert run.peak_activation_bytes == run.predicted_activation_bytes  # nothing outlives B
    # What the last stage's loss saves lies outside the checkpointed stage: the MSE keeps its
    # input (the stage output) and the target. That is the only margin, and it is exact.
    meter = ActivationMeter([])
    with meter.record(0, 0):
        F.mse_loss(torch.randn(mb, 8, requires_grad=True), torch.randn(mb, 8)) * (1 / m)
    loss_bytes = meter.per_mb[0]
    assert loss_bytes == 2 * mb * 8 * 4
    boundary = [mb * 8 * 4, mb * 32 * 4]  # stage inputs: the batch rows (8 wide), hidden (32 wide)
    measured = [per[0] for per in runs[True].activation_bytes_per_mb]
    assert measured == [boundary[0], boundary[1] + loss_bytes]
    for with_ck, without in zip(measured, [per[0] for per in runs[False].activation_bytes_per_mb]):
        assert with_ck * 10 < without


# --------------------------------------------------------------- data × pipeline (2 × 2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "gpt-tied"])
def test_two_replicas_of_a_two_stage_pipeline_match_reference(kind, tmp_path):
    if kind == "mlp":
        model, loss_fn, data = small_mlp(), F.mse_loss, mlp_batches(16, steps=2)
    else:
        model, loss_fn, data = tiny_gpt(), gpt_loss, token_batches(8, steps=2)
    run = train(model, loss_fn, make_schedule("1f1b", 2, 2), data, dp=2, return_grads=True,
                return_params=True, save_dir=tmp_path, timeout=180)
    assert run.info["world_size"] == 4
    ref = reference(model, loss_fn, data)
    assert_matches(run, ref)
    if kind == "gpt-tied":
        embedding, head = run.copies(TIED)
        assert torch.equal(embedding, head)
    state = merge_checkpoint(tmp_path)  # four rank files, two per stage
    assert len(state["meta"]["ranks"]) == 4 and state["meta"]["dp"] == 2
    assert_close({n: state["model"][n] for n in ref["params"]}, ref["params"], "saved weight")


# ------------------------------------------------------------------------- checkpoints
# Resumed runs must give the losses of an uninterrupted run. Same tolerance as above: a
# different split adds in another order (~1e-7 apart); the same split repeats the same sums.

MOMENTUM = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)  # picklable, has state


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """Two SGD-momentum steps of the MLP with 1F1B on two ranks, saved; and all four batches."""
    directory = tmp_path_factory.mktemp("momentum")
    data = mlp_batches(8, steps=4)
    run = train(small_mlp(), F.mse_loss, make_schedule("1f1b", 2, 2), data[:2], optimizer=MOMENTUM,
                save_dir=directory, timeout=120)
    ref = reference(small_mlp(), F.mse_loss, data, optimizer=MOMENTUM)  # four steps, no break
    assert run.losses == pytest.approx(ref["losses"][:2], rel=RTOL, abs=ATOL)
    return directory, data, ref


def test_checkpoint_files_and_merged_state(halfway):
    directory, _, _ = halfway
    assert sorted(os.listdir(directory)) == ["rank0.pt", "rank1.pt"]
    state = merge_checkpoint(directory)
    assert state["model"].keys() == small_mlp().state_dict().keys()
    assert state["meta"]["step"] == 2 and state["meta"]["bounds"] == [0, 3, 6]
    assert state["meta"]["schedule"] == {"name": "1f1b", "p": 2, "m": 2, "v": 1,
                                         "placement": [[0, 0], [1, 0]]}
    assert state["meta"]["optimizer"] == "SGD"
    assert set(state["optimizer"]) == set(state["model"])  # a momentum buffer per parameter
    assert all(set(s) == {"momentum_buffer"} for s in state["optimizer"].values())


def test_resume_with_the_same_split(halfway):
    directory, data, ref = halfway
    run = train(small_mlp(), F.mse_loss, make_schedule("1f1b", 2, 2), data[2:],
                optimizer=MOMENTUM, resume_from=directory, timeout=120)
    assert run.info["start_step"] == 2
    assert run.losses == pytest.approx(ref["losses"][2:], rel=RTOL, abs=ATOL)


def test_resume_into_one_rank_saving_over_the_checkpoint(halfway, tmp_path):
    directory, data, ref = halfway
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    run = train(small_mlp(), F.mse_loss, make_schedule("gpipe", 1, 2), data[2:],
                optimizer=MOMENTUM, resume_from=tmp_path, save_dir=tmp_path, timeout=120)
    assert run.losses == pytest.approx(ref["losses"][2:], rel=RTOL, abs=ATOL)
    assert os.listdir(tmp_path) == ["rank0.pt"]  # the two-rank files were replaced, not mixed
    state = merge_checkpoint(tmp_path)
    assert state["meta"]["step"] == 4 and state["meta"]["schedule"]["p"] == 1
    assert_close({k: state["model"][k] for k in ref["params"]}, ref["params"], "weight")


def test_resume_in_a_single_process(halfway):
    directory, data, ref = halfway
    model = small_mlp()
    opt = MOMENTUM(model.parameters())
    load_into(model, directory, optimizer=opt)
    losses = []
    for x, y in data[2:]:  # a plain training loop carries on where the pipeline stopped
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses == pytest.approx(ref["losses"][2:], rel=RTOL, abs=ATOL)


def test_adam_resumed_into_interleaved_matches_an_uninterrupted_run(tmp_path):
    data = mlp_batches(8, steps=4)
    kw = {"optimizer": "adam", "lr": 0.01, "timeout": 120}
    full = train(small_mlp(), F.mse_loss, make_schedule("1f1b", 2, 2), data, **kw)
    first = train(small_mlp(), F.mse_loss, make_schedule("1f1b", 2, 2), data[:2],
                  save_dir=tmp_path / "a", **kw)
    state = merge_checkpoint(tmp_path / "a")
    assert all(int(s["step"]) == 2 for s in state["optimizer"].values())  # Adam's own counts
    bounds = by_parameters(small_mlp(), 4).bounds  # four stages balanced by parameter count
    assert bounds == [0, 2, 3, 4, 6]
    second = train(small_mlp(), F.mse_loss, make_schedule("interleaved", 2, 2, v=2), data[2:],
                   bounds=bounds, resume_from=tmp_path / "a", save_dir=tmp_path / "b", **kw)
    assert first.losses + second.losses == pytest.approx(full.losses, rel=RTOL, abs=ATOL)
    again = merge_checkpoint(tmp_path / "b")
    assert again["meta"]["step"] == 4 and again["meta"]["bounds"] == bounds
    assert [r["stages"] for r in again["meta"]["ranks"]] == [[0, 2], [1, 3]]
    assert all(int(s["step"]) == 4 for s in again["optimizer"].values())


def test_tied_checkpoint_fills_both_names_and_loads_strictly(tmp_path):
    model, data = tiny_gpt(), token_batches(4, steps=2)
    run = train(model, gpt_loss, make_schedule("interleaved", 2, 2, v=2), data, save_dir=tmp_path,
                return_params=True, timeout=120)
    state = merge_checkpoint(tmp_path)
    torch.testing.assert_close(state["model"]["3.out.weight"], state["model"][TIED], atol=0, rtol=0)
    fresh = tiny_gpt()
    load_into(fresh, state)  # strict: every key of the tied model's state_dict is there
    assert fresh[3].out.weight is fresh[0].tok.weight  # still one tensor
    ref = reference(model, gpt_loss, data)
    assert_close({n: state["model"][n] for n in ref["params"]}, ref["params"], "weight")
    torch.testing.assert_close(fresh[0].tok.weight.detach(), run.params[TIED], atol=0, rtol=0)


def test_bad_checkpoints_raise_a_clear_error_before_any_process_starts(halfway, tmp_path,
                                                                      monkeypatch):
    directory, data, _ = halfway
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    sched = make_schedule("1f1b", 2, 2)

    def no_launch(*args, **kwargs):
        raise AssertionError("a rank was started before the checkpoint was checked")

    monkeypatch.setattr(minipipe.runtime, "launch", no_launch)

    def resume(model=None, optimizer=MOMENTUM):
        with pytest.raises(CheckpointError) as err:
            train(model or small_mlp(), F.mse_loss, sched, data[2:], optimizer=optimizer,
                  resume_from=tmp_path)
        return str(err.value)

    # the model does not fit: other depth, other width
    assert "written for a model of 6 layers, this one has 7" in resume(mlp(4 + 1, 16, 8, 8))
    wider = resume(mlp(4, 32, 8, 8))
    assert "'0.weight' is [16, 8] in the checkpoint, [32, 8] in the model" in wider
    with pytest.raises(CheckpointError, match="missing"):
        load_into(mlp(layers=5, width=16, d_in=8, d_out=8), tmp_path)
    # another optimizer than the one that wrote the state
    assert "holds SGD optimizer state, but this run uses Adam" in resume(optimizer="adam")
    # a file from another save
    other = torch.load(rank_file(tmp_path, 1), weights_only=True)
    other["meta"]["run"] = "another"
    atomic_save(other, rank_file(tmp_path, 1))
    assert "comes from another save than rank0.pt" in resume()
    # a truncated file
    path = rank_file(tmp_path, 1)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert "rank1.pt cannot be read: the file is truncated or corrupt" in resume()
    # a missing file, no checkpoint at all
    os.unlink(path)
    assert "rank1.pt is missing: the checkpoint was written by 2 ranks" in resume()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        merge_checkpoint(tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = rank_file(tmp_path, 0)
    atomic_save({"step": 1, "w": torch.ones(3)}, path)
    before = Path(path).read_bytes()

    def broken_save(obj, f, *args, **kwargs):  # writes half a file, then the "crash"
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == ["rank0.pt"]  # the temporary file is gone too
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_rank_whose_stages_hold_no_weights_still_trains():
    """Rank 1 holds only a Tanh: no optimizer there, and the step still matches."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    data = (torch.randn(4, 4), torch.randn(4, 4))
    result = train(model, F.mse_loss, make_schedule("gpipe", 2, 2), data, steps=2,
                   return_params=True)
    ref = reference(model, F.mse_loss, data, steps=2)
    assert result.losses == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    for name, value in ref["params"].items():
        torch.testing.assert_close(result.params[name], value, atol=1e-5, rtol=1e-4)
