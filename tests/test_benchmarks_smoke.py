"""The benchmark scripts run end to end in their quick mode (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, timeout: float) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_vs_torch_quick_prints_a_table_and_losses_agree():
    out = _run("bench_vs_torch.py", 170)  # the script itself asserts the losses agree
    assert "paired ratio" in out
    row = next(line for line in out.splitlines() if line.startswith("mlp-tiny 1f1b p=2 m=4"))
    assert row.split()[-1] == "yes"  # torch ran the actions in minipipe's order


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_launch_quick_prints_its_tables():
    out = _run("bench_launch.py", 170)
    assert "launch() of a no-op" in out and "first step ends" in out
    assert "interleaved" in out  # the simulator table
