"""Start ranks and collect their results: local spawn (notebooks, scripts) or torchrun.

``launch(fn, world_size)`` starts one process per rank with the *spawn* start method (the
macOS default, and safe in a Jupyter kernel), runs ``fn(ctx, *args)`` on each, and returns
the results in rank order. ``fn`` and its arguments travel with cloudpickle, so functions,
classes and schedules defined in a notebook cell reach the workers.

Rendezvous: the caller hosts the TCP store on a socket it binds to 127.0.0.1 with a port the
OS picks, so parallel runs never collide and nothing listens on the network. If a rank
raises, every rank is stopped and :class:`WorkerError` carries its traceback; if the run
outlives ``timeout``, :class:`PipelineTimeout` says what each rank was doing. A rank that
dies without a result (killed, crashed, ``os._exit``) is named with its exit code or signal
ahead of the peers that lose their connection to it; a rank frozen or stuck in one action is
named ahead of the peers that time out waiting for it. Under ``torchrun``
(``RANK``/``WORLD_SIZE`` set) nothing is spawned: this process is one rank.

The job travels in a file, not through the start-up pipe, so starting a rank never blocks on
a child that died during start-up (a script without an ``if __name__ == "__main__":`` guard).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle
import torch
import torch.distributed as dist

from .failures import GUARD, MainGuardError, PipelineTimeout, WorkerError, primary_cause, stuck_rank

__all__ = ["Context", "WorkerError", "PipelineTimeout", "MainGuardError", "launch",
           "choose_backend", "under_torchrun"]

_STATUS_LEN = 120  # bytes of status text per rank in the shared board
_START = threading.Lock()  # one launch's environment changes at a time
_watching: list[int] = []  # under torchrun: the agent this process watches
_LAUNCH_DIR = "MINIPIPE_LAUNCH_DIR"  # where a child reports a script without a main guard


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


def _die_with_parent(parent: int, deathsig: bool = True) -> None:
    """Exit if the launching process goes away (a killed kernel or torchrun agent leaves no
    orphans): PR_SET_PDEATHSIG on Linux, and a thread that watches the parent's pid."""
    if deathsig and sys.platform.startswith("linux"):
        try:  # PR_SET_PDEATHSIG: the kernel sends SIGKILL when the parent dies
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)
        except OSError:
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(rank: int, world_size: int, payload: str, port: int, backend: str,
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
        with open(payload, "rb") as f:
            fn, args, kwargs = cloudpickle.load(f)
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
            if hasattr(signal, "SIGCONT"):  # a stopped rank only acts on SIGTERM once continued
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGCONT)
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
    if not _watching:  # the agent killed (SIGKILL): this rank exits instead of living on
        _watching.append(os.getppid())
        _die_with_parent(os.getppid(), deathsig=False)  # the agent may start us from a thread
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
        WorkerError: a rank raised or died; carries its rank number and traceback (or exit
            code), the rank a frozen or stuck rank's peers waited on named first.
        PipelineTimeout: the run outlived ``timeout``; carries each rank's last action.
        MainGuardError: the calling script lacks ``if __name__ == "__main__":``.
    """
    if getattr(mp.current_process(), "_inheriting", False):  # a rank importing the script again
        where = os.environ.get(_LAUNCH_DIR)
        if where:  # tell the caller, which is watching this directory
            with contextlib.suppress(OSError):
                open(os.path.join(where, "unguarded"), "w").close()
        raise MainGuardError(GUARD)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pg_timeout = timeout if pg_timeout is None else pg_timeout
    if under_torchrun():
        return _run_torchrun(fn, args, kwargs, backend, threads, pg_timeout)
    name, device_type, staged = choose_backend(world_size, backend)
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
    launch_dir = tempfile.mkdtemp(prefix="minipipe-launch-")
    procs: list[Any] = []
    try:
        payload = os.path.join(launch_dir, "job.pkl")  # a file: a start never blocks on a pipe
        with open(payload, "wb") as f:
            cloudpickle.dump((fn, args, kwargs), f)
        _start(spawn, procs, world_size, threads, launch_dir,
               (world_size, payload, port, name, device_type, staged, threads, pg_timeout,
                results, board, os.getpid()))
        return _collect(procs, results, board, world_size, timeout, launch_dir)
    finally:
        _stop(procs)
        del store  # owns the listening socket and closes it
        shutil.rmtree(launch_dir, ignore_errors=True)


def _start(spawn: Any, procs: list[Any], world_size: int, threads: int, launch_dir: str,
           worker_args: tuple) -> None:
    """Start the ranks (appended to ``procs``) with the environment they must inherit; the
    caller's environment is restored however the start ends (a Jupyter kernel keeps it)."""
    env = {"GLOO_SOCKET_IFNAME": _loopback_ifname(), "NCCL_SOCKET_IFNAME": _loopback_ifname(),
           "OMP_NUM_THREADS": str(threads)}
    with _START:  # two launches from two threads never mix their environments
        saved = {k: os.environ.get(k) for k in (*env, _LAUNCH_DIR)}
        try:
            for k, val in env.items():
                if val is not None and k not in os.environ:  # the user's own setting wins
                    os.environ[k] = val
            os.environ[_LAUNCH_DIR] = launch_dir
            for rank in range(world_size):
                proc = spawn.Process(target=_worker, daemon=True, name=f"minipipe-rank{rank}",
                                     args=(rank, *worker_args))
                proc.start()
                procs.append(proc)
        finally:
            for k, val in saved.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val


def _collect(procs: list[Any], results: Any, board: Any, world_size: int, timeout: float,
             launch_dir: str) -> list[Any]:
    """Results by rank; the first failure (see :func:`_failure`) or a timeout raises."""
    out: dict[int, Any] = {}
    errors: list[tuple[float, int, bytes]] = []
    deadline = time.monotonic() + timeout
    reader = _QueueReader(results)
    while len(out) < world_size:
        _take(reader, out, errors, 0.05)
        ended = any(p.exitcode is not None for r, p in enumerate(procs) if r not in out)
        if errors or ended or os.path.exists(os.path.join(launch_dir, "unguarded")):
            _take(reader, out, errors, 0.5, full=True)  # the cause may report a moment later
            failure = primary_cause(procs, out, errors, _read_board(board, world_size),
                                    os.path.exists(os.path.join(launch_dir, "unguarded")))
            if failure is not None:
                raise failure
        if time.monotonic() > deadline:
            status = _read_board(board, world_size)
            raise PipelineTimeout(timeout, status, stuck_rank([p.pid for p in procs], status))
    return [out[r] for r in range(world_size)]


def _take(reader: "_QueueReader", out: dict, errors: list, wait: float, full: bool = False) -> None:
    """Read what the ranks sent, waiting up to ``wait`` s (all of it with ``full``)."""
    end = time.monotonic() + wait
    while True:
        item = reader.get(max(0.0, end - time.monotonic()))
        if item is None:
            return
        status, rank, data, when = item
        if status == "error":
            errors.append((when, rank, data))
        else:
            out[rank] = cloudpickle.loads(data)
        if not full and reader.empty():
            return


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
