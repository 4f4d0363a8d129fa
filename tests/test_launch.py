"""The launcher: errors come back with the rank and its traceback, hangs time out, nothing leaks.

Every test here starts real processes (spawn, gloo on CPU, ~2 s each on two cores) and checks
that afterwards no rank process is left, by PID and through ``multiprocessing``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from minipipe.runtime import reference, train
from minipipe.runtime.launch import PipelineTimeout, WorkerError, launch
from minipipe.schedules import Schedule, make_schedule

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")
STARTING = ("(no action started)", "building its stage")  # status before a rank really runs


def timed_out_after_start(run, timeouts=(8, 16, 32)) -> PipelineTimeout:
    """``run(timeout)`` must raise PipelineTimeout; retry longer while the ranks were still
    starting when it tripped (start-up takes seconds on a busy 2-core machine)."""
    for timeout in timeouts:
        start = time.perf_counter()
        with pytest.raises(PipelineTimeout) as err:
            run(timeout)
        assert time.perf_counter() - start < timeout + 10  # stopped soon after the timeout
        if not any(s in STARTING for s in err.value.status):
            return err.value
    pytest.fail(f"the ranks were still starting after {timeouts[-1]} s: {err.value.status}")


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_dead(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


# ------------------------------------------------------------------- rank functions


def my_pid(ctx) -> int:
    return os.getpid()


def fail_at(ctx, step: int, failing: int, pid_dir: str) -> None:
    """Every rank loops over steps in lockstep; rank ``failing`` raises at ``step``."""
    Path(pid_dir, str(ctx.rank)).write_text(str(os.getpid()))
    for k in range(10):
        ctx.status(f"step {k}")
        dist.barrier()
        if ctx.rank == failing and k == step:
            raise ValueError(f"rank {ctx.rank} fails on purpose at step {k}")


def recv_never_sent(ctx) -> None:
    """Rank 0 waits for a tensor that rank 1 never sends (rank 1 just sleeps)."""
    if ctx.rank == 0:
        ctx.status("waiting for a tensor from rank 1")
        dist.recv(torch.empty(4), src=1)
    else:
        ctx.status("sleeping, never sends")
        time.sleep(120)


def all_reduce_tag(ctx, tag: float) -> float:
    t = torch.tensor([tag])
    dist.all_reduce(t)
    time.sleep(0.5)  # keep both runs alive at the same time
    return float(t)


class FailOn(nn.Module):
    """Identity layer that raises at its ``call``-th forward on global rank ``rank``."""

    def __init__(self, rank: int, call: int) -> None:
        super().__init__()
        self.rank, self.call, self.calls = rank, call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_rank() == self.rank:
            if self.calls == self.call:
                raise RuntimeError(f"layer fails on purpose at forward call {self.call}")
            self.calls += 1
        return x


# --------------------------------------------------------------------------- errors


def test_pids_of_a_finished_run_are_gone():
    pids = launch(my_pid, 2)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert _wait_dead(pids) == []


def test_rank_error_names_the_rank_and_its_traceback(tmp_path):
    start = time.perf_counter()
    with pytest.raises(WorkerError) as err:
        launch(fail_at, 3, 2, 1, str(tmp_path))
    assert time.perf_counter() - start < 30
    assert err.value.rank == 1
    assert "fails on purpose at step 2" in err.value.worker_traceback
    assert "fail_at" in err.value.worker_traceback  # the frame that raised
    assert "rank 1 failed" in str(err.value)
    pids = [int(f.read_text()) for f in tmp_path.iterdir()]
    assert len(pids) == 3
    assert _wait_dead(pids) == [], "a rank outlived the failed run"


def test_layer_error_inside_train_reaches_the_caller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), FailOn(rank=1, call=2), nn.Linear(8, 8))
    data = (torch.randn(8, 8), torch.randn(8, 8))
    start = time.perf_counter()
    with pytest.raises(WorkerError) as err:  # m = 2: the third forward is step 1, micro-batch 0
        train(model, nn.functional.mse_loss, make_schedule("1f1b", 2, 2), data, steps=3,
              timeout=60)
    assert time.perf_counter() - start < 30
    assert err.value.rank == 1
    assert "fails on purpose at forward call 2" in err.value.worker_traceback
    assert "FailOn" in err.value.worker_traceback or "forward" in err.value.worker_traceback
    assert err.value.status[1].startswith("step 1")


# --------------------------------------------------------------------------- hangs


def test_hung_receive_trips_the_timeout_with_the_status_board():
    err = timed_out_after_start(lambda timeout: launch(recv_never_sent, 2, timeout=timeout))
    assert err.status == ["waiting for a tensor from rank 1", "sleeping, never sends"]
    assert "rank 0: waiting for a tensor from rank 1" in str(err)


def test_short_pg_timeout_turns_a_hang_into_a_worker_error():
    start = time.perf_counter()
    with pytest.raises(WorkerError) as err:
        launch(recv_never_sent, 2, timeout=60, pg_timeout=2)
    assert time.perf_counter() - start < 30
    assert err.value.rank == 0
    assert re.search(r"time[sd]? ?out", err.value.worker_traceback, re.IGNORECASE)


def test_unchecked_deadlocking_schedule_times_out_naming_each_rank():
    # rank 0 waits for the gradient of micro-batch 0 before it sends micro-batch 1;
    # rank 1 wants micro-batch 1 before it computes that gradient
    schedule = Schedule(["F0 B0 F1 B1", "F0 F1 B0 B1"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    data = (torch.randn(4, 8), torch.randn(4, 8))
    err = timed_out_after_start(lambda timeout: train(
        model, nn.functional.mse_loss, schedule, data, check_schedule=False, timeout=timeout))
    assert err.status == ["step 0: waiting to run B0", "step 0: waiting to run F1"]


# ----------------------------------------------------------------------- rendezvous


def test_two_launches_at_once_both_succeed():
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(tag: int) -> None:
        try:
            results[tag] = launch(all_reduce_tag, 2, float(tag), timeout=60)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in (1, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert results == {1: [2.0, 2.0], 10: [20.0, 20.0]}  # each run reduced only its own ranks


def _listening(pid: str = "self") -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` owns."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))  # host order words
                family = socket.AF_INET if size == 4 else socket.AF_INET6
                out.append((socket.inet_ntop(family, raw), int(port, 16)))
    return out


def rank_listeners(ctx) -> list[tuple[str, int]]:
    time.sleep(2.0)  # keep the store up while the caller looks
    return _listening()


def _non_loopback_ipv4() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.254.254.254", 1))  # no packet is sent: just picks an interface
        addr = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads sockets from /proc")
def test_rendezvous_listens_on_loopback_only():
    before = set(_listening())
    box: dict[str, object] = {}
    worker = threading.Thread(target=lambda: box.update(out=launch(rank_listeners, 2, timeout=60)))
    worker.start()
    deadline = time.monotonic() + 20
    mine: set = set()
    while worker.is_alive() and time.monotonic() < deadline and not mine:
        mine = set(_listening()) - before
        time.sleep(0.02)
    store = sorted(mine)
    other = _non_loopback_ipv4()
    if other and store:  # the store's port must not answer on another address of this host
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((other, store[0][1])) != 0, "the store answers on " + other
    worker.join(60)
    assert store, "saw no listening socket while the launch ran"
    assert all(addr in ("127.0.0.1", "::1") for addr, _ in store), store
    for rank, listeners in enumerate(box["out"]):  # gloo's own sockets, in every rank
        assert all(addr in ("127.0.0.1", "::1") for addr, _ in listeners), (rank, listeners)


# ------------------------------------------------------------- functions that travel


def test_lambda_and_local_class_travel_to_the_ranks():
    assert launch(lambda ctx, a: ctx.rank * a, 2, 10) == [0, 10]

    class Scale(nn.Module):  # defined in a function: cloudpickle ships it by value
        def __init__(self, width: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Scale(8), nn.Linear(8, 8), Scale(8))
    loss_fn = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731 - a lambda on purpose
    data = (torch.randn(8, 8), torch.randn(8, 8))
    result = train(model, loss_fn, make_schedule("1f1b", 2, 2), data, return_grads=True,
                   return_params=True, timeout=60)
    ref = reference(model, loss_fn, data)
    assert result.losses == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(result.grads[name], g, atol=1e-5, rtol=1e-4)


def test_zero_ranks_is_refused():
    with pytest.raises(ValueError, match="world_size"):
        launch(my_pid, 0)
