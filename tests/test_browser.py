"""The course as a learner meets it: lesson 02 in real JupyterLab, in headless Chromium.

What nbmake cannot see: widgets drawn by the JupyterLab frontend, a chart that redraws when a
control moves, ranks spawned from a kernel that JupyterLab started. A private JupyterLab on
127.0.0.1 opens ``notebooks/02_gpipe.ipynb``; the browser clicks Run → Run All Cells once (a
module fixture), then the tests check, in order: no cell has an error; the schedule explorer
follows its ``m`` slider (keyboard) and its schedule dropdown; an invalid setting is explained
without a stale chart; the lesson file is left as it was. Screenshots go to
``artifacts/browser/``. See docs/browser_test.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

import browser_helpers as bh

REPO = Path(__file__).resolve().parents[1]
# Another notebook with a schedule explorer can be checked the same way (e.g. while writing one):
# MINIPIPE_BROWSER_NOTEBOOK=/path/to/draft.ipynb; outside the repository its folder is served.
_TARGET = (REPO / os.environ.get("MINIPIPE_BROWSER_NOTEBOOK", "notebooks/02_gpipe.ipynb")).resolve()
ROOT = REPO if _TARGET.is_relative_to(REPO) else _TARGET.parent
NOTEBOOK = _TARGET.relative_to(ROOT).as_posix()
SHOTS = REPO / "artifacts" / "browser"
RUN_ALL_TIMEOUT = 150.0  # the lesson's budget is ~60 s; a busy 2-core machine can double it

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

_missing = bh.browser_missing() or (None if _TARGET.exists() else f"no notebook {_TARGET}")
if _missing:
    pytestmark.append(pytest.mark.skip(reason=f"browser test skipped: {_missing}"))


@contextlib.contextmanager
def evidence(nb: bh.NotebookPage, name: str):
    """On failure, save a screenshot, the browser console and the server log under ``name``."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            nb.screenshot(f"failure-{name}.png")
        (SHOTS / f"failure-{name}-console.log").write_text("\n".join(nb.console))
        (SHOTS / f"failure-{name}-jupyterlab.log").write_text(nb.server.log_tail(200_000))
        raise


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A private JupyterLab serving the repository; stopped with its kernels afterwards."""
    server = bh.start_lab(ROOT, tmp_path_factory.mktemp("jupyter-home"))
    yield server
    left = server.stop()
    assert not left, f"processes of JupyterLab survived it: {left}"


@pytest.fixture(scope="module")
def lesson(lab, tmp_path_factory):
    """The lesson open in Chromium (fresh profile) after Run → Run All Cells, clicked once.

    Yields ``(notebook_page, state_after_the_run, original_file_bytes, start_time)``;
    closes the browser.
    """
    from playwright.sync_api import sync_playwright

    bh.clean_dir(SHOTS)
    original, opened_at = (ROOT / NOTEBOOK).read_bytes(), time.time()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=bh.CHROMIUM, headless=True, args=bh.CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            nb = bh.NotebookPage(page, lab, NOTEBOOK, SHOTS)
            with evidence(nb, "run-all"):
                assert nb.open()["cells"], f"{NOTEBOOK} has no code cells"
                started = time.monotonic()
                nb.run_all_from_menu()
                state = nb.wait_until_done(RUN_ALL_TIMEOUT)
            print(f"\n{NOTEBOOK}: Run All Cells took {time.monotonic() - started:.1f} s "
                  f"in the browser; screenshots in {SHOTS}")
            nb.screenshot("01_after_run_all.png")
            yield nb, state, original, opened_at
        finally:
            context.close()


@pytest.fixture(scope="module")
def explorer(lesson):
    """The lesson's (first) schedule explorer, once it shows a chart."""
    nb = lesson[0]
    ex = bh.ExplorerView(nb.page)
    with evidence(nb, "explorer"):
        ex.root.wait_for(state="visible", timeout=20_000)
        ex.image.wait_for(state="visible", timeout=20_000)
    return ex


def test_every_cell_runs_without_error(lesson):
    nb, state, _, _ = lesson
    page = nb.page
    with evidence(nb, "cells"):
        errors = bh.error_outputs(state)
        assert not errors, "cells with error output:\n\n" + "\n\n".join(errors)
        skipped = [c["index"] for c in state["cells"] if c["count"] is None]
        assert not skipped, f"cells that never ran (the run stopped early?): {skipped}"
        rendered = page.locator(".jp-OutputArea-output[data-mime-type="
                                "'application/vnd.jupyter.stderr']", has_text="Traceback")
        assert rendered.count() == 0, "a traceback is rendered:\n" + rendered.first.inner_text()
        broken = page.locator(".jp-OutputArea-output", has_text="Error displaying widget")
        assert broken.count() == 0, "a widget failed to render: " + broken.first.inner_text()
        assert not _tracebacks(nb), "the kernel reported errors:\n" + "\n".join(_tracebacks(nb))
        assert nb.state()["kernel"] == "idle"


def test_explorer_follows_its_controls(lesson, explorer):
    nb, ex, page = lesson[0], explorer, lesson[0].page
    with evidence(nb, "controls"):
        for label in ("p (ranks)", "m (micro-batches)"):
            assert ex.slider(label).count(), f"the explorer has no {label!r} slider"
        first = ex.settle(nb)
        assert first["src"].startswith("data:image/png"), f"no PNG chart: {first['src'][:60]}"
        assert "bubble" in first["panel"], f"the panel lacks the bubble: {first['panel']}"
        _check_panel_follows_controls(ex, "as the lesson left it")
        nb.screenshot("02_explorer_before.png", ex.output)

        # Keyboard on the m slider: focus its handle, step right (continuous_update=False
        # sliders commit on the keyboard's change event, as on a mouse release). Each step is
        # a change event and a redraw: wait for the last one. Two steps, or p for interleaved
        # (it needs m % p == 0).
        values = ex.control_values()
        steps = values["p (ranks)"] if first["schedule"] == "interleaved" else 2
        m_slider = ex.slider("m (micro-batches)")
        readout = m_slider.locator(".widget-readout")
        m_before = int(readout.inner_text())
        m_slider.locator(".noUi-handle").click()
        for _ in range(steps):
            page.keyboard.press("ArrowRight")
        ex.wait_for_change(first, 20, "the chart and panel to follow the m slider")
        after_m = ex.settle(nb)
        assert int(readout.inner_text()) == m_before + steps, f"{steps} steps right: m + {steps}"
        _check_panel_follows_controls(ex, "after moving m")
        nb.screenshot("03_explorer_after_m.png", ex.output)

        # Another schedule from the dropdown (a real <select>: choose an option as a user would).
        options = ex.schedule.locator("option").all_inner_texts()
        other = "1f1b" if "1f1b" in options and after_m["schedule"] != "1f1b" else \
            next(o for o in options if o not in (after_m["schedule"], "interleaved"))
        ex.schedule.select_option(other)
        ex.wait_for_change(after_m, 20, f"the chart and panel to show {other}")
        after_schedule = ex.settle(nb)
        assert after_schedule["schedule"] == other
        assert after_schedule["src"].startswith("data:image/png")
        assert "cannot run" not in after_schedule["panel"], after_schedule["panel"]
        _check_panel_follows_controls(ex, f"after picking {other}")
        nb.screenshot("04_explorer_after_schedule.png", ex.output)
        nb.screenshot("05_page.png")
        assert not _tracebacks(nb), "widget callbacks raised:\n" + "\n".join(_tracebacks(nb))


def test_invalid_setting_is_explained_without_a_stale_chart(lesson, explorer):
    nb, ex, page = lesson[0], explorer, lesson[0].page
    with evidence(nb, "invalid"):
        options = ex.schedule.locator("option").all_inner_texts()
        if "interleaved" not in options:
            pytest.skip("no interleaved schedule to make an invalid setting with")
        before = ex.settle(nb)
        values = ex.control_values()
        p, m = values["p (ranks)"], values["m (micro-batches)"]
        if m % p == 0:  # interleaved needs m % p == 0: step m once to break it
            ex.slider("m (micro-batches)").locator(".noUi-handle").click()
            page.keyboard.press("ArrowRight")
            before = ex.settle(nb)
        ex.schedule.select_option("interleaved")
        wait = bh.wait_for(lambda: "cannot run" in ex.snapshot()["panel"], 20,
                           "the panel to explain why interleaved cannot run")
        assert wait
        shown = ex.settle(nb)
        nb.screenshot("06_explorer_invalid_setting.png", ex.output)
        assert "multiple" in shown["panel"], shown["panel"]
        assert not _tracebacks(nb), "widget callbacks raised:\n" + "\n".join(_tracebacks(nb))
        assert shown["src"] == "", (
            "the panel says the setting cannot run, but the chart of the previous setting is "
            f"still shown (unchanged: {shown['src'] == before['src']})")


def test_the_lesson_file_is_left_as_it_was(lesson):
    _, _, original, opened_at = lesson
    path = ROOT / NOTEBOOK
    if path.read_bytes() != original:  # edited meanwhile by someone, or saved by this session?
        cells = json.loads(path.read_text())["cells"]
        saved = [i for i, c in enumerate(cells) if c.get("outputs") or c.get("execution_count")]
        assert not saved, f"the browser session saved {NOTEBOOK} with outputs (cells {saved})"
    checkpoints = path.parent / ".ipynb_checkpoints" / f"{path.stem}-checkpoint.ipynb"
    assert not checkpoints.exists() or checkpoints.stat().st_mtime < opened_at, (
        f"the session wrote {checkpoints}")


def _check_panel_follows_controls(ex: bh.ExplorerView, when: str) -> None:
    """The panel in the page must be the one the controls' current values give: the same
    explorer built here, in the test process, from the values the page shows."""
    from minipipe.course.widgets import schedule_explorer

    local = schedule_explorer()
    by_label = {c.description: name for name, c in local.controls.items()}
    shown = ex.control_values()
    values = {by_label[label]: value for label, value in shown.items() if label in by_label}
    local.update(**values)
    assert ex.panel_matches(local.html), (
        f"{when}: the figures panel does not match the controls {values}; the page shows:\n"
        f"{ex.panel.inner_text()}")


def _tracebacks(nb: bh.NotebookPage) -> list[str]:
    """Errors the kernel published anywhere (cells or widget callbacks); warnings pass."""
    return [bh.ANSI.sub("", e["text"])[-1500:] for e in nb.kernel_errors()
            if e["type"] in ("error", "kernel") or "Traceback" in e["text"]]
