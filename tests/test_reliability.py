"""Faults and bad inputs, one test per class: the rank that caused a failure is named, nothing
hangs, every bad input is refused before a process starts, and a save is all-or-nothing.

The multi-process tests start 1-2 gloo ranks on CPU (a few seconds each on two cores).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import minipipe.runtime.caller as caller
from minipipe import state
from minipipe.errors import ConfigError
from minipipe.runtime import reference, train
from minipipe.runtime.failures import PipelineTimeout, stuck_rank
from minipipe.runtime.launch import WorkerError, launch
from minipipe.schedules import make_schedule

ROOT = Path(__file__).resolve().parents[1]
SCHED = make_schedule("1f1b", 2, 2)


def small():
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(4))), (torch.randn(8, 8), torch.randn(8, 8))


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ------------------------------------------------- 1, 2: a dying rank is named, at once


def die(ctx, how: str, stamp: str) -> None:
    """Both ranks meet; then rank 1 dies and rank 0 waits for a tensor from it."""
    dist.barrier()
    if ctx.rank == 1:
        Path(stamp).write_text(str(time.time()))
        if how == "exit3":
            os._exit(3)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        ctypes.string_at(0)  # segfault
    dist.recv(torch.empty(4), src=1)


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
@pytest.mark.parametrize("how, code, says", [("exit3", 3, "exited with status 3"),
                                             ("sigkill", -9, "SIGKILL"),
                                             ("segfault", -11, "SIGSEGV")])
def test_a_dead_rank_is_named_with_its_exit_code_or_signal(tmp_path, how, code, says):
    stamp = tmp_path / "died"
    with pytest.raises(WorkerError) as err:
        launch(die, 2, how, str(stamp), timeout=60)
    assert time.time() - float(stamp.read_text()) < 5
    assert err.value.rank == 1 and err.value.exitcode == code
    assert str(err.value).startswith(f"rank 1 {'exited' if code > 0 else 'died'}") and says in str(err.value)


class ExitInForward(nn.Module):
    def forward(self, x):
        if dist.is_initialized():
            Path(os.environ["MINIPIPE_TEST_STAMP"]).write_text(str(time.time()))
            os._exit(0)
        return x


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
def test_a_rank_exiting_with_status_0_without_a_result_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPIPE_TEST_STAMP", str(tmp_path / "exited"))  # ranks inherit it
    model = nn.Sequential(nn.Linear(8, 8), ExitInForward())
    with pytest.raises(WorkerError) as err:
        train(model, F.mse_loss, make_schedule("gpipe", 1, 2), small()[1], timeout=120)
    assert time.time() - float((tmp_path / "exited").read_text()) < 5
    assert err.value.rank == 0 and err.value.exitcode == 0
    assert "exited with status 0 without returning a result" in str(err.value)


# ------------------------------------------------ a frozen or stuck rank is named, not its peer


def frozen(ctx, how: str) -> None:
    if ctx.rank == 1:
        ctx.status("step 0: running F0")
        if how == "sigstop":
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(120)  # stuck in one action
    ctx.status("step 0: waiting to run B0")
    dist.recv(torch.empty(4), src=1)


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
@pytest.mark.parametrize("how, says", [("sigstop", "rank 1 is stopped"),
                                       ("stuck", "rank 1 is stuck running one action")])
def test_a_frozen_rank_is_blamed_not_the_peer_that_timed_out_waiting(how, says):
    start = time.perf_counter()
    with pytest.raises(WorkerError) as err:
        launch(frozen, 2, how, timeout=60, pg_timeout=5)
    assert time.perf_counter() - start < 40
    assert err.value.rank == 1 and str(err.value).startswith(says), str(err.value)


def test_the_timeout_names_the_rank_the_others_wait_on():
    status = ["step 0: waiting to run B0", "step 0: running F1", "step 0: waiting to run F0"]
    assert stuck_rank([None] * 3, status)[0] == 1
    assert stuck_rank([None] * 2, ["step 0: waiting to run B0", "step 0: waiting to run F1"]) is None
    err = PipelineTimeout(5, status, stuck_rank([None] * 3, status))
    assert err.stuck == 1 and "rank 1 is stuck running one action" in str(err)
    assert "probably hung" in str(PipelineTimeout(5, status[::2]))


# ------------------------------------------ 3: a script without the main guard, said in seconds


def test_a_script_without_the_main_guard_is_named_in_seconds(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import torch.nn.functional as F
        import minipipe
        from minipipe.models import mlp, mlp_batch

        schedule = minipipe.make_schedule("1f1b", p=2, m=4)
        model, data = mlp(layers=6, width=256), mlp_batch(32)  # the job: > 64 KiB
        result = minipipe.train(model, F.mse_loss, schedule, data, steps=2, timeout=120)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=100, env=env)
    assert out.returncode != 0
    assert time.perf_counter() - start < 60  # start-up of the caller and two ranks, not 120 s
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("minipipe.runtime.failures.MainGuardError") and \
        'if __name__ == "__main__":' in last, out.stderr[-2000:]


# ------------------------------------------------------------ 4: a save is all-or-nothing


def _save(directory: Path, model: nn.Sequential, step: int) -> str:
    """A two-rank save of ``model`` written by :func:`state.save_rank` as ranks would, no
    processes; returns the staging directory (not yet committed)."""
    bounds = [0, 2, 4]
    meta = state.save_meta(model, SCHED, bounds, 1, step, "sgd")
    staging = state.begin_save(directory, meta["run"])
    names = state.param_names(list(model))
    for rank in (0, 1):
        part = list(model)[bounds[rank]:bounds[rank + 1]]
        worker = SimpleNamespace(
            params={names[id(q)]: q for layer in part for q in layer.parameters()}, opt=None,
            chunks={0: nn.Sequential(*part)}, sched=SCHED, rank=rank,
            job=SimpleNamespace(bounds=bounds), ctx=SimpleNamespace(rank=rank))
        state.save_rank(worker, staging, meta)
    return staging


class Crash(Exception):
    pass


def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    old, new = small()[0], small()[0]
    with torch.no_grad():
        for q in new.parameters():
            q.add_(1.0)
    steps = {}
    for n in itertools.count():  # crash at the n-th file-system operation of the commit
        d = tmp_path / f"run{n}"
        state.commit_save(d, _save(d, old, step=1), 2)
        (d / "rank2.pt").write_bytes(b"")  # an older, larger run's file: removed on commit
        staging = _save(d, new, step=2)
        calls = itertools.count()

        def crash_at(fn, n=n, calls=calls):
            def wrapped(*args, **kwargs):
                if next(calls) == n:
                    raise Crash
                return fn(*args, **kwargs)
            return wrapped

        with monkeypatch.context() as m:
            for mod, name in [(os, "replace"), (os, "unlink"), (os, "fsync"),
                              (state.shutil, "copyfile"), (state.shutil, "rmtree")]:
                m.setattr(mod, name, crash_at(getattr(mod, name)))
            try:
                state.commit_save(d, staging, 2)
                done = True
            except Crash:
                done = False
        merged = state.merge_checkpoint(d)  # the run ids of all files agree, or this raises
        step = merged["meta"]["step"]
        want = old if step == 1 else new
        for key, t in want.state_dict().items():
            assert torch.equal(merged["model"][key], t), (n, key)
        steps[n] = step
        state.begin_save(d, "next")  # a later save finishes or removes what was left
        assert state.merge_checkpoint(d)["meta"]["step"] == step
        left = [".saving-next", "rank0.pt", "rank1.pt"] + (["rank2.pt"] if step == 1 else [])
        assert sorted(os.listdir(d)) == left, n
        if done:
            break
    assert steps[n] == 2 and 1 in steps.values() and n > 6  # every point, both outcomes


class DieOnSave(nn.Linear):
    """Rank 1 dies while the ranks save (rank 0 may have written its file already)."""

    def state_dict(self, *args, **kwargs):
        if dist.is_initialized() and dist.get_rank() == 1:
            os._exit(1)
        return super().state_dict(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
def test_a_rank_dying_mid_save_leaves_the_previous_checkpoint_resumable(tmp_path):
    model, data = small()
    train(model, F.mse_loss, SCHED, data, save_dir=tmp_path, timeout=120)
    before = state.merge_checkpoint(tmp_path)
    dying = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), DieOnSave(8, 8), nn.Linear(8, 8))
    dying.load_state_dict(model.state_dict())
    with pytest.raises(WorkerError) as err:
        train(dying, F.mse_loss, SCHED, data, steps=2, save_dir=tmp_path, resume_from=tmp_path,
              timeout=120)
    assert err.value.rank == 1 and err.value.exitcode == 1
    resumed, _, step = state.prepare_resume(small()[0], tmp_path, "sgd")
    assert step == 1 and before["meta"]["run"] == state.merge_checkpoint(tmp_path)["meta"]["run"]
    for key, t in before["model"].items():
        assert torch.equal(resumed.state_dict()[key], t)


# ------------------------------------------- 5-7, 9, 10: bad inputs refused before any start


def _no_launch(*args, **kwargs):
    raise AssertionError("a rank was started for a configuration that cannot run")


def _layers(fn):
    return [nn.Linear(8, 8), Lambda(fn), nn.Linear(8, 8), nn.Linear(8, 8)]


BAD = {  # name: (changes to the call, what the one-line message says)
    "optimizer": ({"optimizer": "rmsprop"}, "optimizer must be 'sgd', 'adam' or a callable"),
    "lr": ({"lr": -0.1}, "lr must be a finite number >= 0"),
    "lr-nan": ({"lr": float("nan")}, "lr must be a finite number >= 0"),
    "threads": ({"threads": 0}, "threads must be >= 1"),
    "steps-0": ({"steps": 0}, "steps must be >= 1"),
    "steps--1": ({"steps": -1}, "steps must be >= 1"),
    "steps-float": ({"steps": 2.0}, "steps must be an int"),
    "dp": ({"dp": 0}, "dp must be >= 1"),
    "timeout": ({"timeout": 0}, "timeout must be a positive number"),
    "no-batches": ({"data": []}, "data holds no batches"),
    "empty-batch": ({"data": (torch.randn(0, 8), torch.randn(0, 8))}, "batch 0 has 0 samples"),
    "endless": ({"data": itertools.cycle([(torch.randn(8, 8), torch.randn(8, 8))])},
                "say how many steps to take from it with steps=N"),
    "checkpoint": ({"checkpoint": [4]}, "checkpoint must be True, False or a list of stages"),
    "int16": ({"model": _layers(lambda x: x.to(torch.int16))},
              "stage 0 outputs a torch.int16 tensor"),
    # tuples/dicts of tensors and any number of dimensions cross boundaries (issue 16)
    "not-a-tensor": ({"model": _layers(lambda x: [x, "text"])}, "stage 0 outputs a list"),
    "float8": ({"model": _layers(lambda x: x.to(torch.float8_e4m3fn))},
               "which the ranks cannot exchange"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_before_start_in_one_line(name, monkeypatch):
    monkeypatch.setattr(caller, "launch", _no_launch)
    model, data = small()
    kwargs = {"model": model, "data": data, "timeout": 60, **BAD[name][0]}
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        train(kwargs.pop("model"), F.mse_loss, SCHED, kwargs.pop("data"), **kwargs)
    assert time.perf_counter() - start < 1
    assert BAD[name][1] in str(err.value) and "\n" not in str(err.value)


def test_the_save_dir_must_be_a_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(caller, "launch", _no_launch)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        train(small()[0], F.mse_loss, SCHED, small()[1], save_dir=tmp_path / "file")


class Started(Exception):
    pass


def test_integer_like_numbers_are_ints_and_floats_are_not(monkeypatch):
    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(caller, "launch", started)
    schedule = make_schedule("1f1b", np.int64(2), np.int32(2))  # numpy integers are ints
    assert (schedule.p, schedule.m) == (2, 2) and type(schedule.p) is int
    with pytest.raises(Started):  # every check passed: the ranks would start now
        train(small()[0], F.mse_loss, schedule, small()[1], steps=np.int64(2), dp=np.int64(1))
    with pytest.raises(ValueError, match=r"m must be an int, got 2\.0 \(float\)"):
        make_schedule("1f1b", 2, 2.0)
    with pytest.raises(ValueError, match="v \\(chunks per rank\\) must be an int >= 1, got 0"):
        make_schedule("interleaved", 2, 4, v=0)


def test_an_endless_iterator_is_read_only_as_far_as_the_steps():
    model, (x, y) = small()
    taken = []
    stream = (taken.append(k) or (x, y) for k in itertools.count())  # never ends
    ref = reference(model, F.mse_loss, stream, steps=3)
    assert len(ref["losses"]) == 3 and taken == [0, 1, 2]


# -------------------------------------------- 8: a first stage without trainable weights trains


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_a_first_stage_without_trainable_weights_trains(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    data = itertools.cycle([(torch.randn(8, 8), torch.randn(8, 8))])  # endless: steps= takes 2
    run = train(model, F.mse_loss, make_schedule(name, 2, 2), data, steps=2, return_grads=True,
                timeout=120)
    ref = reference(model, F.mse_loss, data, steps=2)
    assert run.losses == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    for n, g in ref["grads"].items():
        torch.testing.assert_close(run.grads[n], g, atol=1e-5, rtol=1e-4)


# ------------------------------------------- 11: the caller's environment is always restored


def test_an_interrupted_start_restores_the_environment(monkeypatch):
    import multiprocessing.context

    keys = ["OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MINIPIPE_LAUNCH_DIR"]
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's own value is kept as it is

    def interrupted(self):
        assert os.environ["MINIPIPE_LAUNCH_DIR"]  # set for the child...
        raise KeyboardInterrupt

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        launch(lambda ctx: None, 2, timeout=10)
    assert {k: os.environ.get(k) for k in keys} == dict.fromkeys(keys) | {"OMP_NUM_THREADS": "7"}

