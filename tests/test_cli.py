"""The command line (``python -m minipipe``) and the stand-in benchmark, run as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import minipipe.__main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def minipipe(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minipipe", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_run_writes_json_plot_and_trace(tmp_path):
    out = minipipe("run", "--model", "mlp", "--schedule", "1f1b", "--stages", "2",
                   "--microbatches", "4", "--check", "--json", "run.json", "--plot", "run.png",
                   "--trace", "trace.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "1f1b: p=2 m=4" in out.stdout and "passed" in out.stdout

    report = json.loads((tmp_path / "run.json").read_text())
    assert report["config"]["schedule"] == "1f1b" and report["config"]["m"] == 4
    assert len(report["losses"]) == len(report["step_times"]) == 3
    assert report["step_time_median"] > 0
    for which in ("measured", "predicted"):
        assert 0 <= report["bubble"][which]["fraction"] < 1
    assert set(report["bubble"]["predicted"]["from_mean_times"]) == {"t_f", "t_b"}
    peaks = report["peak_activation_bytes"]
    assert peaks["observed"] == peaks["predicted"] and len(peaks["observed"]) == 2
    assert report["messages"] == {"measured": 8, "predicted": 8}  # 2(p − 1)m
    check = report["check"]
    assert check["passed"] is True and check["max_abs_grad_diff"] <= 1e-4

    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert len(events) == 2 * 2 * 4  # p ranks × m micro-batches × (F, B)
    assert {e["tid"] for e in events} == {0, 1} and all(e["ph"] == "X" for e in events)


@pytest.mark.parametrize("args, says", [
    (["--stages", "0"], "p >= 1"),
    (["--schedule", "interleaved", "--stages", "2", "--microbatches", "3"], "multiple"),
    (["--schedule", "2f2b"], "invalid choice"),
    (["--microbatches", "4", "--batch", "10"], "multiple of 4"),
    (["--stages", "8", "--layers", "2"], "at least 8 layers"),
    (["--tie"], "--model gpt"),
    (["--schedule", "gpipe", "--chunks", "2"], "interleaved"),
    (["--schedule", "interleaved", "--chunks", "0"], "v (chunks per rank) must be an int >= 1"),
    (["--batch", "0"], "batch 0 has 0 samples"),
    (["--json", "no/such/folder/run.json"], "does not exist"),
    (["--plot", "."], "is a directory"),
], ids=["no-stages", "interleaved-m", "unknown-schedule", "batch", "layers", "tie", "chunks",
        "chunks-0", "batch-0", "json-folder", "plot-directory"])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, says):
    out = minipipe("run", *args, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minipipe: error:"), out.stderr
    assert says in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_grade_delegates_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("minipipe.course.grade")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "minipipe.course.grade", fake)
    assert cli.main(["grade", "--exercise", "bubble"]) == 3
    assert seen == [["--exercise", "bubble"]]


def test_grade_without_the_grader_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "minipipe.course.grade", None)  # import fails as if it were absent
    assert cli.main(["grade"]) == 2
    assert "minipipe: error:" in capsys.readouterr().err


def test_standin_benchmark_quick_smoke():  # ~10 s on an idle 2-core machine
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_standin_bubble.py"),
                          "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("gpipe", "1f1b"))]
    assert [r[:3] for r in rows] == [["gpipe", "2", "4"], ["1f1b", "2", "4"]]
    for row in rows:  # measured and closed-form bubble of the step, in percent
        measured, formula = (float(x.rstrip("%")) for x in row[7:9])
        assert formula == 20.0 and 0 < measured < 100


def test_output_check_is_safe_when_every_torchrun_process_makes_it_at_once(tmp_path):
    """Under torchrun every process checks ``--json`` before starting: the check must not
    create (and then remove) the file itself, or one process removes what another made."""
    from concurrent.futures import ThreadPoolExecutor

    from minipipe.__main__ import _check_writable
    from minipipe.errors import ConfigError

    path = str(tmp_path / "run.json")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _check_writable("--json", path), range(200)))
    assert not list(tmp_path.iterdir())  # nothing left behind
    (tmp_path / "old.json").write_text("{}")
    _check_writable("--json", str(tmp_path / "old.json"))
    assert (tmp_path / "old.json").read_text() == "{}"  # an existing file is kept as it is
    if os.path.isdir("/proc"):
        with pytest.raises(ConfigError, match="cannot be written"):
            _check_writable("--json", "/proc/run.json")
