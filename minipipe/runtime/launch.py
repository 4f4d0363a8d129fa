"""Start ranks and collect their results: local spawn (notebooks, scripts) or torchrun.

``launch(fn, world_size)`` starts one process per rank with the *spawn* start method (the
macOS default, and safe in a Jupyter kernel), runs ``fn(ctx, *args)`` on each, and returns
the results in rank order. ``fn`` and its arguments travel with cloudpickle, so functions,
classes and schedules defined in a notebook cell reach the workers.

Rendezvous: the caller hosts the TCP store on a socket it binds to 127.0.0.1 with a port the
OS picks, so parallel runs never collide and nothing listens on the network. If a rank
raises, every rank is stopped and :class:`WorkerError` carries its traceback; if the run
outlives ``timeout``, :class:`PipelineTimeout` says what each rank was doing. Under
``torchrun`` (``RANK``/``WORLD_SIZE`` set) nothing is spawned: this process is one rank.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle
import torch
import torch.distributed as dist

__all__ = ["Context", "WorkerError", "PipelineTimeout", "launch", "choose_backend", "under_torchrun"]

_STATUS_LEN = 120  # bytes of status text per rank in the shared board
_SECONDARY = b"closed by peer"  # gloo's error on a rank whose peer went away first


class WorkerError(RuntimeError):
    """A rank raised; ``rank`` and ``worker_traceback`` say which and where."""

    def __init__(self, rank: int, worker_traceback: str, status: list[str] | None = None) -> None:
        self.rank, self.worker_traceback, self.status = rank, worker_traceback, status or []
        board = "".join(f"\n  rank {r}: {s}" for r, s in enumerate(self.status))
        super().__init__(
            f"rank {rank} failed; its traceback:\n{worker_traceback.rstrip()}"
            + (f"\nwhat each rank was doing:{board}" if board else ""))


class PipelineTimeout(RuntimeError):
    """The run took longer than its timeout; ``status`` holds each rank's last action."""

    def __init__(self, timeout: float, status: list[str]) -> None:
        self.status = status
        board = "".join(f"\n  rank {r}: {s}" for r, s in enumerate(status))
        super().__init__(
            f"no result after {timeout:.0f} s: the pipeline is probably hung (a receive whose "
            f"send never comes). What each rank was doing when it was stopped:{board}")


@dataclass
class Context:
    """What a rank knows about itself; passed as the first argument of the rank function.

    Attributes:
        rank, world_size: this process in the job. device: where it computes.
        backend: ``gloo`` or ``nccl``. staged: CUDA tensors go through host memory to gloo.
    """

    rank: int
    world_size: int
    device: torch.device
    backend: str
    staged: bool = False
    _board: Any = field(default=None, repr=False)

    def status(self, text: str) -> None:
        """Publish what this rank is doing (shown if the run fails or hangs)."""
        if self._board is not None:
            raw = text.encode()[: _STATUS_LEN - 1]
            start = self.rank * _STATUS_LEN
            self._board[start : start + _STATUS_LEN] = raw.ljust(_STATUS_LEN, b"\0")


def under_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def choose_backend(world_size: int, backend: str = "auto") -> tuple[str, str, bool]:
    """Pick ``(backend, device_type, staged)`` for ``world_size`` ranks on this machine.

    ``auto``: NCCL with one GPU per rank when there are enough GPUs; gloo otherwise, with CUDA
    compute staged through host memory when there are GPUs but fewer than ranks (NCCL refuses
    two ranks on one GPU, and gloo cannot send CUDA tensors).
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, not {backend!r}")
    if backend == "nccl" and gpus < min(world_size, 1):
        raise ValueError("backend 'nccl' needs CUDA GPUs, and this machine has none")
    if backend == "nccl" or (backend == "auto" and gpus >= world_size):
        return "nccl", "cuda", False
    if backend == "auto" and gpus:
        return "gloo", "cuda", True
    return "gloo", "cpu", False


def _loopback_ifname() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)


def _die_with_parent(parent: int) -> None:
    """Exit if the launching process goes away (a killed kernel leaves no orphans)."""
    if sys.platform.startswith("linux"):
        try:  # PR_SET_PDEATHSIG: the kernel sends SIGKILL when the parent dies
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)
        except OSError:
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(rank: int, world_size: int, payload: bytes, port: int, backend: str,
            device_type: str, staged: bool, threads: int, pg_timeout: float,
            results: Any, board: Any, parent: int) -> None:
    _die_with_parent(parent)
    if device_type == "cpu":
        torch.set_num_threads(threads)
    status = "ok"
    try:
        device = torch.device("cpu")
        if device_type == "cuda":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=pg_timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        ctx = Context(rank, world_size, device, backend, staged, board)
        fn, args, kwargs = cloudpickle.loads(payload)
        out = cloudpickle.dumps(fn(ctx, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything goes back to the caller
        status, out = "error", traceback.format_exc().encode()
    results.put((status, rank, out, time.time()))
    if status == "ok" and dist.is_initialized():
        dist.destroy_process_group()
    if status == "error":
        os._exit(1)  # do not wait for peers blocked in a collective


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 3
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)


def _read_board(board: Any, world_size: int) -> list[str]:
    raw = bytes(board[:])
    return [raw[r * _STATUS_LEN:(r + 1) * _STATUS_LEN].split(b"\0")[0].decode(errors="replace")
            or "(no action started)" for r in range(world_size)]


def _run_torchrun(fn: Callable, args: tuple, kwargs: dict, backend: str, threads: int,
                  pg_timeout: float) -> list[Any]:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    name, device_type, staged = choose_backend(world_size, backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    fn, args, kwargs = cloudpickle.loads(cloudpickle.dumps((fn, args, kwargs)))  # as if spawned
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(name, timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        result = fn(Context(rank, world_size, device, name, staged), *args, **kwargs)
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, result)
        return gathered
    finally:
        if created:
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "auto",
           timeout: float = 300.0, pg_timeout: float | None = None, threads: int = 1,
           **kwargs: Any) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    Args:
        fn: the rank function; its first argument is a :class:`Context`.
        world_size: number of ranks to start.
        backend: ``auto``, ``gloo`` or ``nccl`` (see :func:`choose_backend`).
        timeout: seconds before the whole run is declared hung and stopped.
        pg_timeout: seconds a single receive or collective may block (default: ``timeout``).
        threads: intra-op threads per rank on CPU (1 keeps ranks from fighting over cores).

    Raises:
        WorkerError: a rank raised; carries its rank number and traceback.
        PipelineTimeout: the run outlived ``timeout``; carries each rank's last action.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pg_timeout = timeout if pg_timeout is None else pg_timeout
    if under_torchrun():
        return _run_torchrun(fn, args, kwargs, backend, threads, pg_timeout)
    name, device_type, staged = choose_backend(world_size, backend)
    payload = cloudpickle.dumps((fn, args, kwargs))
    spawn = mp.get_context("spawn")
    results = spawn.SimpleQueue()
    board = spawn.RawArray(ctypes.c_char, world_size * _STATUS_LEN)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))  # loopback only; the OS picks a free port
    listener.listen(world_size * 4)
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=pg_timeout),
                          wait_for_workers=False, master_listen_fd=listener.detach())

    env = {"GLOO_SOCKET_IFNAME": _loopback_ifname(), "NCCL_SOCKET_IFNAME": _loopback_ifname(),
           "OMP_NUM_THREADS": str(threads)}
    added = [k for k, val in env.items() if val is not None and k not in os.environ]
    procs = []
    try:
        for k in added:  # children inherit these at start
            os.environ[k] = env[k]  # type: ignore[assignment]
        for rank in range(world_size):
            proc = spawn.Process(
                target=_worker, daemon=True, name=f"minipipe-rank{rank}",
                args=(rank, world_size, payload, port, name, device_type, staged, threads,
                      pg_timeout, results, board, os.getpid()))
            proc.start()
            procs.append(proc)
        for k in added:
            os.environ.pop(k)
        return _collect(procs, results, board, world_size, timeout)
    finally:
        _stop(procs)
        del store  # owns the listening socket and closes it


def _collect(procs: list[Any], results: Any, board: Any, world_size: int,
             timeout: float) -> list[Any]:
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    reader = _QueueReader(results)
    while len(out) < world_size:
        item = reader.get(0.05)
        if item is not None:
            status, rank, data, when = item
            if status == "error":
                raise _first_failure(reader, (when, rank, data), board, world_size)
            out[rank] = cloudpickle.loads(data)
            continue
        for rank, proc in enumerate(procs):
            if rank not in out and proc.exitcode not in (None, 0) and reader.empty():
                time.sleep(0.2)  # its error message may still be on the way
                if reader.empty():
                    raise WorkerError(rank, f"rank {rank} died with exit code {proc.exitcode} "
                                            "(killed, or crashed in native code)\n",
                                      _read_board(board, world_size))
        if time.monotonic() > deadline:
            raise PipelineTimeout(timeout, _read_board(board, world_size))
    return [out[r] for r in range(world_size)]


def _first_failure(reader: "_QueueReader", first: tuple, board: Any, world_size: int) -> WorkerError:
    """The error that came first: when one rank fails, its peers often fail a moment later
    ("connection closed by peer"), and their report can arrive before the cause's; such
    consequences are passed over when a rank reports anything else."""
    status = _read_board(board, world_size)
    errors = [first]
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        item = reader.get(0.05)
        if item is not None and item[0] == "error":
            errors.append((item[3], item[1], item[2]))
    when, rank, data = min(errors, key=lambda e: (_SECONDARY in e[2], e[0]))
    return WorkerError(rank, data.decode(), status)


class _QueueReader:
    """Poll a SimpleQueue with a timeout (SimpleQueue.get blocks forever)."""

    def __init__(self, q: Any) -> None:
        self.q = q

    def empty(self) -> bool:
        return self.q.empty()

    def get(self, wait: float) -> Any:
        end = time.monotonic() + wait
        while self.q.empty():
            if time.monotonic() > end:
                return None
            time.sleep(0.005)
        return self.q.get()

