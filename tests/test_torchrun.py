"""``torchrun -m minipipe run``: two "nodes" on this machine, and one node with two processes;
and no rank outlives a killed torchrun agent.

``python -m torch.distributed.run`` is ``torchrun`` without relying on the script's path.
Under torchrun nothing is spawned: each process is one rank, and rank 0 writes the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
RUN = ["-m", "minipipe", "run", "--model", "mlp", "--schedule", "1f1b", "--stages", "2",
       "--microbatches", "4", "--check"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """Wait for every process; kill them all if one overruns. Returns (exit code, output)."""
    out = []
    try:
        for proc in procs:
            text, _ = proc.communicate(timeout=timeout)
            out.append((proc.returncode, text))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def assert_check_passed(report: Path) -> None:
    data = json.loads(report.read_text())
    assert data["info"]["world_size"] == 2
    assert data["check"]["passed"] is True and data["check"]["max_abs_grad_diff"] <= 1e-4
    assert data["messages"]["measured"] == 8


def test_two_nodes_on_one_machine(tmp_path):
    port = str(free_port())
    procs = [start(tmp_path, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                   "--master-addr", "127.0.0.1", "--master-port", port,
                   *RUN, "--json", f"node{node}.json")
             for node in (0, 1)]
    results = finish(procs)
    for node, (code, text) in enumerate(results):
        assert code == 0, f"node {node} failed:\n{text[-3000:]}"
    assert "passed" in results[0][1]
    assert_check_passed(tmp_path / "node0.json")
    assert not (tmp_path / "node1.json").exists()  # only rank 0 writes


def test_one_node_two_processes(tmp_path):
    port = str(free_port())
    (code, text), = finish([start(tmp_path, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                  "--master-port", port, *RUN, "--json", "run.json")])
    assert code == 0, text[-3000:]
    assert text.count("check against single-process training") == 1  # rank 0 prints, once
    assert_check_passed(tmp_path / "run.json")


NAPPER = '''
import os, time
from pathlib import Path
from minipipe.runtime.launch import launch

def napper(ctx):
    Path(f"pid{ctx.rank}").write_text(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    launch(napper, 2, timeout=200)
'''


def test_killing_the_torchrun_agent_leaves_no_orphan_ranks(tmp_path):
    (tmp_path / "napper.py").write_text(NAPPER)
    agent = start(tmp_path, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                  "--master-port", str(free_port()), "napper.py")
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(pids) < 2 and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.2)
            pids = [int(f.read_text()) for f in sorted(tmp_path.glob("pid*")) if f.read_text()]
        assert len(pids) == 2, "the ranks did not start"
        os.kill(agent.pid, signal.SIGKILL)  # the agent dies without stopping its workers
        agent.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "ranks outlived the torchrun agent"
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
        agent.communicate()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
