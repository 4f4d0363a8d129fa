"""Drive JupyterLab in headless Chromium: start a private server, open a notebook, run it.

Used by ``test_browser.py``. The server runs with its own config, data, settings and workspace
folders (nothing from ``~/.jupyter`` leaks in, nothing is written there), listens on 127.0.0.1
with a token, makes no network requests (news, update checks and the extension manager are
off), never saves a notebook (autosave off) and keeps its checkpoint copies in that private
folder, so the lesson files stay as they are and no ``.ipynb_checkpoints`` appears beside them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CHROMIUM = os.environ.get("MINIPIPE_CHROMIUM", "/usr/bin/chromium")

# Chromium as root in a container, offline: no sandbox, no GPU, no background traffic.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio",
]

# Lab plugins that would reach the network, pop up notifications over the notebook, or ask
# for server parts this server runs without (language servers, terminals).
_DISABLED_PLUGINS = [
    "@jupyterlab/apputils-extension:announcements",
    "@jupyterlab/extensionmanager-extension",
    "@jupyterlab/lsp-extension",
    "@jupyterlab/fileeditor-extension:language-server",
    "@jupyterlab/notebook-extension:language-server",
    "@jupyterlab/terminal-extension",
]

# User settings: never save (the notebook stays output-free), keep every cell in the DOM.
_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {
        "autosave": False, "confirmClosingDocument": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none", "recordTiming": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
}


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None if it can."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "jupyterlab is not installed"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class LabServer:
    """A running JupyterLab: its base URL, token, process and log file."""

    url: str
    token: str
    proc: subprocess.Popen
    log: Path

    def api(self, path: str) -> Any:
        """GET a Jupyter REST endpoint (``/api/...``) and decode its JSON."""
        req = urllib.request.Request(f"{self.url}{path}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)

    def lab_url(self, relpath: str) -> str:
        """URL that opens ``relpath`` (relative to the server root) in a fresh workspace."""
        return f"{self.url}/lab/tree/{relpath}?reset&token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> list[int]:
        """Stop the server, its kernels and their ranks; return the pids still alive (none).

        Kernels run in sessions of their own (jupyter_client starts them with setsid), so
        killing the server's process group would miss them: collect every descendant first,
        let the server shut down (SIGTERM: it stops its kernels), then kill whatever is left.
        """
        family = descendants(self.proc.pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while (alive := [p for p in family if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_lab(root: Path, home: Path, timeout: float = 60.0) -> LabServer:
    """Start JupyterLab serving ``root``; ``home`` (an empty folder) holds its private state."""
    token = os.urandom(16).hex()
    port = free_port()
    dirs = {name: home / name for name in ("config", "data", "runtime", "settings",
                                             "workspaces", "ipython", "checkpoints")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["config"] / "labconfig").mkdir(exist_ok=True)
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {name: True for name in _DISABLED_PLUGINS}}))
    (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"jpserver_extensions": {"jupyter_lsp": False}},
        # Opening a notebook makes a checkpoint copy: keep it out of the served folders.
        "FileCheckpoints": {"root_dir": str(dirs["checkpoints"])},
    }))
    for name, values in _SETTINGS.items():
        path = dirs["settings"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLBACKEND", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
    env.update(JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), IPYTHONDIR=str(dirs["ipython"]),
               JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    # The venv's bin first, so a kernelspec that says "python" finds this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False", "--ServerApp.disable_check_xsrf=False",
        "--ServerApp.terminals_enabled=False", "--ServerApp.allow_root=True",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={dirs['settings']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
    ]
    log = home / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", token, proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}:\n"
                               + server.log_tail())
        try:
            server.api("/api/status")
            return True
        except OSError:
            return False

    try:
        wait_for(ready, timeout, "JupyterLab to answer on /api/status")
    except BaseException:
        server.stop()
        raise
    return server


def clean_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --- in the page --------------------------------------------------------------------------

# JavaScript run in the page: the state of the open notebook, read from JupyterLab's own model
# (``window.jupyterapp`` exists because the server runs with expose_app_in_browser).
NOTEBOOK_STATE_JS = """
() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  panel.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const prompt = cell.node.querySelector('.jp-InputPrompt');
    const outputs = [];
    const n = cell.model.outputs.length;
    for (let k = 0; k < n; k++) {
      const o = cell.model.outputs.get(k).toJSON();
      outputs.push({type: o.output_type, name: o.name || null, ename: o.ename || null,
                    evalue: o.evalue || null,
                    text: o.output_type === 'stream' ? String(o.text).slice(0, 4000) :
                          (o.traceback ? o.traceback.join('\\n').slice(0, 4000) : null)});
    }
    cells.push({index: index, count: cell.model.executionCount,
                prompt: prompt ? prompt.textContent.trim() : '',
                source: cell.model.sharedModel.getSource().slice(0, 200), outputs: outputs});
  });
  return {kernel: kernel ? kernel.status : 'none',
          connection: kernel ? kernel.connectionStatus : 'none',
          dirty: panel.context.model.dirty, cells: cells};
}
"""

# Collects every error and stderr message the kernel publishes, whichever cell or widget
# callback it belongs to: exceptions raised in a widget callback never reach a cell's output
# (JupyterLab sends them to its log console), so the test listens on the kernel's IOPub.
WATCH_KERNEL_JS = """
() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const kernel = panel.sessionContext.session.kernel;
  window.__kernelErrors = window.__kernelErrors || [];
  if (window.__watching === kernel.id) return true;
  window.__watching = kernel.id;
  kernel.iopubMessage.connect((_, msg) => {
    const t = msg.header.msg_type;
    if (t === 'error') {
      window.__kernelErrors.push({type: 'error', text: msg.content.ename + ': ' +
        msg.content.evalue + '\\n' + (msg.content.traceback || []).join('\\n')});
    } else if (t === 'stream' && msg.content.name === 'stderr') {
      window.__kernelErrors.push({type: 'stderr', text: msg.content.text});
    }
  });
  kernel.statusChanged.connect((_, status) => {
    if (status === 'dead' || status === 'restarting' || status === 'autorestarting')
      window.__kernelErrors.push({type: 'kernel', text: 'kernel status: ' + status});
  });
  return true;
}
"""

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in IPython tracebacks


class NotebookPage:
    """One notebook open in JupyterLab in a Playwright page, with the checks the test needs."""

    def __init__(self, page: Any, server: LabServer, relpath: str, shots: Path) -> None:
        self.page, self.server, self.relpath, self.shots = page, server, relpath, shots
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def screenshot(self, name: str, locator: Any = None, margin: int = 12) -> Path:
        """Save the page, or the region of ``locator`` plus a margin, as ``shots/name``."""
        path = self.shots / name
        box = None
        if locator is not None:
            locator.scroll_into_view_if_needed()
            box = locator.bounding_box()
        if box is None:
            self.page.screenshot(path=str(path))
            return path
        view = self.page.viewport_size or {"width": 1400, "height": 1000}
        x, y = max(0.0, box["x"] - margin), max(0.0, box["y"] - margin)
        clip = {"x": x, "y": y, "width": min(box["width"] + 2 * margin, view["width"] - x),
                "height": min(box["height"] + 2 * margin, view["height"] - y)}
        self.page.screenshot(path=str(path), clip=clip)
        return path

    def state(self) -> dict | None:
        return self.page.evaluate(NOTEBOOK_STATE_JS)

    def open(self, timeout: float = 60.0) -> dict:
        """Load the notebook in a fresh workspace; return its state once the kernel is idle."""
        self.page.goto(self.server.lab_url(self.relpath), timeout=timeout * 1000)
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout * 1000)
        state = wait_for(lambda: (s := self.state()) and s["kernel"] == "idle" and s,
                         timeout, "the notebook's kernel to start and be idle")
        self.page.evaluate(WATCH_KERNEL_JS)
        # Hide the file browser so the screenshots show the notebook at full width.
        self.page.evaluate("() => { const s = window.jupyterapp.shell;"
                           " if (!s.leftCollapsed) s.collapseLeft(); }")
        return state

    def run_all_from_menu(self) -> None:
        """Run → Run All Cells, clicked like a user would."""
        self.page.get_by_role("menuitem", name="Run", exact=True).click()
        self.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    def wait_until_done(self, timeout: float) -> dict:
        """Wait until the run started, then until no cell is queued or running and the kernel
        is idle (stable for a second). Returns the notebook state."""
        wait_for(lambda: any(c["prompt"] != "[ ]:" for c in self.state()["cells"]), 20,
                 "Run All Cells to start the first cell")
        stable_since: list[float] = []

        def done() -> dict | None:
            s = self.state()
            busy = s["kernel"] != "idle" or any(c["prompt"] == "[*]:" for c in s["cells"])
            if s["kernel"] in ("dead", "unknown") or s["connection"] == "disconnected":
                raise AssertionError(f"the kernel died (status {s['kernel']}, connection "
                                     f"{s['connection']}) while running the notebook")
            if busy:
                stable_since.clear()
                return None
            stable_since.append(time.monotonic())
            return s if stable_since[-1] - stable_since[0] >= 1.0 else None

        try:
            return wait_for(done, timeout, "every cell to finish (kernel idle, no [*] prompt)")
        except TimeoutError as err:
            s = self.state()
            running = [f"cell {c['index']}: {c['source'][:80]!r}" for c in s["cells"]
                       if c["prompt"] == "[*]:"]
            ran = sum(c["count"] is not None for c in s["cells"])
            raise TimeoutError(f"{err}; {ran} of {len(s['cells'])} code cells done, kernel "
                               f"{s['kernel']}, still running or queued: {running}") from None

    def kernel_errors(self) -> list[dict]:
        return self.page.evaluate("() => window.__kernelErrors || []")


def _number(text: str | None) -> Any:
    """A widget readout as a number where it is one ("18" -> 18, "2.00" -> 2.0)."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def error_outputs(state: dict) -> list[str]:
    """Each error output, and each stderr stream that carries a traceback, as readable text."""
    found = []
    for cell in state["cells"]:
        for out in cell["outputs"]:
            text = ANSI.sub("", out.get("text") or "")
            if out["type"] == "error":
                found.append(f"cell {cell['index']} raised {out['ename']}: {out['evalue']}\n"
                             f"{text[-1500:]}\n--- cell source ---\n{cell['source']}")
            elif out["type"] == "stream" and out["name"] == "stderr" and "Traceback" in text:
                found.append(f"cell {cell['index']} printed a traceback to stderr:\n"
                             f"{text[-1500:]}")
    return found


def _by_label(page: Any, root: Any, widget_class: str, label: str) -> Any:
    """The ipywidgets in ``root`` of ``widget_class`` (``widget-slider``, ...) labelled
    ``label``."""
    text = page.locator(".widget-label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
    return root.locator(f".{widget_class}").filter(has=text)


class ExplorerView:
    """The schedule explorer as rendered: controls, the chart (an <img> in an Output widget)
    and the figures panel (an HTML widget). ``index`` picks among several explorers."""

    def __init__(self, page: Any, index: int = 0) -> None:
        self.page = page
        dropdown = _by_label(page, page, "widget-dropdown", "schedule").nth(index)
        # The explorer's outer VBox: the nearest widget-vbox around its schedule dropdown.
        self.root = dropdown.locator("xpath=ancestor::div[contains(concat(' ', "
                                     "normalize-space(@class), ' '), ' widget-vbox ')][1]")
        # The cell output around it: what a screenshot of "the explorer" should frame.
        self.output = self.root.locator(
            "xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
            " ' jp-OutputArea-output ')][1]")
        self.schedule = self.root.locator(".widget-dropdown select").first
        self.image = self.root.locator(".widget-output img").first
        self.panel = self.root.locator(".widget-html-content").first

    def slider(self, label: str) -> Any:
        return _by_label(self.page, self.root, "widget-slider", label).first

    def snapshot(self) -> dict:
        """What the learner sees: the chart's bytes (its src, "" when there is no chart), the
        panel text and the schedule picked. Does not wait for anything to appear."""
        return self.root.evaluate("""root => {
          const img = root.querySelector('.widget-output img');
          const panel = root.querySelector('.widget-html-content');
          const select = root.querySelector('.widget-dropdown select');
          return {src: img ? img.getAttribute('src') : '', panel: panel ? panel.innerText : '',
                  schedule: select ? select.value : ''};
        }""")

    def control_values(self) -> dict[str, Any]:
        """Each slider's and dropdown's value as the page shows it, by label (hidden ones too)."""
        raw = self.root.evaluate("""root => {
          const out = {};
          root.querySelectorAll('.widget-slider, .widget-dropdown').forEach(w => {
            const label = w.querySelector('.widget-label');
            const select = w.querySelector('select');
            const readout = w.querySelector('.widget-readout');
            if (label) out[label.textContent.trim()] =
              select ? select.value : (readout ? readout.textContent.trim() : null);
          });
          return out;
        }""")
        return {label: _number(text) for label, text in raw.items()}

    def settle(self, notebook: NotebookPage, timeout: float = 30.0, quiet: float = 1.5) -> dict:
        """Wait until the kernel is idle and the chart and panel stayed the same for ``quiet``
        seconds (several control events queue several redraws); return the snapshot."""
        last: list[Any] = [None, 0.0]

        def settled() -> dict | None:
            now = self.snapshot()
            if notebook.state()["kernel"] != "idle" or now != last[0]:
                last[:] = [now, time.monotonic()]
                return None
            return now if time.monotonic() - last[1] >= quiet else None

        return wait_for(settled, timeout, "the explorer to settle (kernel idle, chart unchanged)")

    def panel_matches(self, html: str) -> bool:
        """True if the panel shows the same text as ``html`` would (whitespace aside)."""
        expected = self.page.evaluate(
            "h => { const d = document.createElement('div'); d.innerHTML = h;"
            " return d.textContent; }", html)
        return "".join(self.panel.text_content().split()) == "".join(expected.split())

    def wait_for_change(self, before: dict, timeout: float, what: str) -> dict:
        """Wait until both the chart and the panel differ from ``before``."""
        def changed() -> dict | None:
            now = self.snapshot()
            return now if now["src"] != before["src"] and now["panel"] != before["panel"] else None

        try:
            return wait_for(changed, timeout, what)
        except TimeoutError as err:
            now = self.snapshot()
            raise AssertionError(
                f"{err}: chart changed={now['src'] != before['src']}, "
                f"panel changed={now['panel'] != before['panel']}; panel now:\n{now['panel']}"
            ) from None
