"""``torchrun -m minipipe run``: two "nodes" on this machine, and one node with two processes.

``python -m torch.distributed.run`` is ``torchrun`` without relying on the script's path.
Under torchrun nothing is spawned: each process is one rank, and rank 0 writes the report.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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
