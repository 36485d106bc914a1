"""The lessons as a learner meets them: JupyterLab in a real (headless) browser.

Opt-in (``pytest -m browser``; skipped by default and when a piece is missing). Why:
``test_notebooks`` proves the cells run and ``test_widgets`` proves the callbacks, but
only a browser shows that a widget is a *live control* that redraws its figure in the
page (a kernel busy elsewhere, a missing widget manager, a figure too wide to see).

How a lesson is run, so that a failure is fast and says where:

* each lesson opens in a **fresh workspace** (``/lab/workspaces/<new name>/tree/<lesson>``), so no
  tab restored from the previous lesson can receive "run all";
* the test waits for **the notebook's own panel** (found by its path, never
  ``shell.currentWidget``) and its kernel session, and runs all cells only once that panel is the
  current one;
* errors are read from **the cell models** (an ``error`` output in ``cell.model.outputs``): JupyterLab 4
  renders a traceback as ``application/vnd.jupyter.stderr``, so counting ``vnd.jupyter.error`` nodes in
  the page saw none and a raising lesson was caught only by the 15-minute timeout. A failure names
  the cell (index and first line) and its exception, as soon as it appears
  (``test_a_raising_lesson_fails_within_a_minute_naming_its_cell`` checks that);
* every figure is **scrolled into view and screenshotted on its own** (a full-page screenshot of
  JupyterLab is one viewport at the end of the notebook).

Needs: Debian's ``chromium`` (``apt-get install -y chromium``; Playwright's own browser
download is not used), ``pip install playwright`` (the ``browser`` extra) and
``jupyterlab`` (the ``lab`` extra). Each notebook runs with the tiny parameters of
``test_notebooks``; one control per panel is moved and the figure must change;
screenshots go to ``$DPFLAT_SCREENSHOTS`` (default: the pytest tmp folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("DPFLAT_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
LESSONS = ["01_quickstart", "02_dp_tradeoffs", "03_flatness_landscapes", "04_sharpness_vs_epsilon", "05_ablations",
           "06_privacy_audit", "07_neighbouring_datasets"]

# notebook -> the controls to move: (description, JS that moves it in the page). Each JS
# runs in the page and returns true when it found its control.
ACTIONS: dict[str, list[tuple[str, ...]]] = {
    "02_dp_tradeoffs": [("σ slider: one step right (keyboard on its handle)", "slider")],
    "03_flatness_landscapes": [("viewer: the 'contour' view button (the notebook left it on 3d)", "button:contour")],
    "04_sharpness_vs_epsilon": [("explorer: the metric dropdown", "select:metric"),
                                # the runner draws no figure: its answer is its status line
                                ("sweep runner: 'Run missing cells' with every cell trained", "button:Run missing cells",
                                 r"nothing was missing: every cell was already trained")],
    # the notebook trained the panel's current configuration already (Train would read it back and
    # draw the same figure): a new target ε first, then Train (cell 11 left the panel in safe mode)
    "05_ablations": [("ablation panel: the ε slider one step right, then the Train button", "slider;button:Train")],
}


class LessonFailed(AssertionError):
    """A lesson that raised, stopped or hung: the message names the cell."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, shared_data):
    """A JupyterLab server on a free port over a folder of tiny-parameter notebooks."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the 'browser' extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    jlab = Path(sys.executable).parent / "jupyter-lab"
    if not jlab.is_file() and shutil.which("jupyter-lab") is None:
        pytest.skip("jupyterlab is not installed (the 'lab' extra)")
    import nbformat
    import papermill.parameterize as pz
    from papermill.iorw import load_notebook_node
    from test_notebooks import PER_NOTEBOOK, TINY

    root = tmp_path_factory.mktemp("lab")
    kernels = root / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (dpflat browser test)", "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    }))
    nbs = root / "notebooks"
    nbs.mkdir()
    for name, extra in PER_NOTEBOOK.items():
        nb = load_notebook_node(str(ROOT / "notebooks" / f"{name}.ipynb"))  # papermill's reader (tags metadata)
        params = {**TINY, **extra, "data_dir": str(shared_data), "out_dir": str(root / "out")}
        nbformat.write(pz.parameterize_notebook(nb, params), nbs / f"{name}.ipynb")
    # a lesson made to raise: 07 with a failing cell after its set-up (the fail-fast check)
    nb = nbformat.read(nbs / "07_neighbouring_datasets.ipynb", as_version=4)
    setup = next(i for i, c in enumerate(nb.cells) if "W.setup_notebook" in c.source)
    nb.cells.insert(setup + 1, nbformat.v4.new_code_cell('raise RuntimeError("a planted failure")'))
    nbformat.write(nb, nbs / "07_raises.ipynb")
    # every cell in the DOM (JupyterLab 4 renders only the visible ones by default), no news pop-up
    settings = root / "lab-settings"
    for ext, name, value in (("notebook-extension", "tracker", {"windowingMode": "none"}),
                             ("apputils-extension", "notification", {"fetchNews": "false"})):
        (settings / f"@jupyterlab/{ext}").mkdir(parents=True, exist_ok=True)
        (settings / f"@jupyterlab/{ext}" / f"{name}.jupyterlab-settings").write_text(json.dumps(value))
    port, token = _free_port(), "dpflat-browser-test"
    env = {**os.environ, "JUPYTER_PATH": str(root / "jupyter"), "PYTHONPATH": str(ROOT),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces")}
    cmd = [str(jlab) if jlab.is_file() else "jupyter-lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nbs}", "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
    try:
        yield {"url": url, "token": token, "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _shots(lab) -> Path:
    d = Path(os.environ.get("DPFLAT_SCREENSHOTS") or lab["root"] / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


# The notebook panel of a path, found among the main area's widgets (never "the current widget":
# a tab restored from another lesson can be current). Every page script below starts from it.
PANEL = """const panelOf = (path) => Array.from(window.jupyterapp.shell.widgets('main'))
  .find(w => w.context && w.context.path === path && w.content && w.sessionContext);"""
OPENED = "(path) => { " + PANEL + """
  const w = panelOf(path);
  if (!w) return {ready: false, why: 'no panel for ' + path};
  const s = w.sessionContext.session;
  if (!s || !s.kernel) return {ready: false, why: 'no kernel session yet'};
  w.node.setAttribute('data-dpflat-lesson', path);
  return {ready: true, status: s.kernel.status, id: w.id};
}"""
# make the lesson's panel the current one and run all its cells; false if another panel stays current
RUN_ALL = "(path) => { " + PANEL + """
  const app = window.jupyterapp, w = panelOf(path);
  app.shell.activateById(w.id);
  if (app.shell.currentWidget !== w) return false;
  app.commands.execute('notebook:run-all-cells');
  return true;
}"""
# the lesson's state from its cell models: code cells executed, errors (cell, first line, exception), kernel status
STATE = "(path) => { " + PANEL + """
  const w = panelOf(path);
  if (!w) return {gone: true};
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const out = {n: 0, done: 0, errors: [], pending: [], status: kernel ? kernel.status : 'none'};
  w.content.widgets.forEach((c, i) => {
    if (c.model.type !== 'code') return;
    const first = c.model.sharedModel.getSource().split('\\n')[0].slice(0, 80);
    out.n += 1;
    if (c.model.executionCount !== null) out.done += 1; else out.pending.push(i + ': ' + first);
    const outs = c.model.outputs;
    for (let k = 0; k < outs.length; k++) {
      const o = outs.get(k).toJSON();
      if (o.output_type === 'error')
        out.errors.push({cell: i, source: first, error: o.ename + ': ' + String(o.evalue).split('\\n')[0]});
    }
  });
  return out;
}"""
SHUTDOWN = "(path) => { " + PANEL + " const w = panelOf(path); return w ? w.sessionContext.shutdown() : null; }"


def _open(page, lab, name: str) -> str:
    """Open ``name`` in a fresh workspace and wait for its own panel and kernel; returns its path."""
    path = f"{name}.ipynb"
    ws = f"lesson-{re.sub(r'[^a-z0-9]', '', name.lower())}-{time.time_ns()}"  # a new workspace: nothing restored
    page.goto(f"{lab['url']}/lab/workspaces/{ws}/tree/{path}?reset&token={lab['token']}",
              wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=120_000)
    deadline, st = time.time() + 180, {}
    while not (st := page.evaluate(OPENED, path)).get("ready") or st.get("status") != "idle":
        if time.time() > deadline:
            raise LessonFailed(f"{name}: its panel or kernel never became ready ({st})")
        time.sleep(1)
    return path


def _run_lesson(page, lab, name: str, timeout: float = 900) -> dict:
    """Run every cell of the open lesson ``name``; return its final state, or raise ``LessonFailed``
    naming the cell as soon as a cell's model holds an error (or the kernel dies, or run-all stops)."""
    path = f"{name}.ipynb"
    if not page.evaluate(RUN_ALL, path):
        raise LessonFailed(f"{name}: its panel could not be made the current one to run it")
    t0, idle_since = time.time(), None
    while True:
        st = page.evaluate(STATE, path)
        if st.get("gone"):
            raise LessonFailed(f"{name}: its panel closed while running")
        if st["errors"]:
            e = st["errors"][0]
            _shot_cell(page, path, e["cell"], _shots(lab) / f"{name}-error-cell{e['cell']}.png")
            raise LessonFailed(f"{name}: cell {e['cell']} ({e['source']!r}) raised {e['error']} "
                               f"after {time.time() - t0:.0f} s")
        if st["status"] in ("dead", "unknown"):
            raise LessonFailed(f"{name}: the kernel is {st['status']}; not executed: {st['pending'][:3]}")
        if st["done"] == st["n"] and st["status"] == "idle":
            return st
        # idle with cells left and no error: run-all stopped (or never started); give it 30 s to resume
        idle_since = (idle_since or time.time()) if st["status"] == "idle" else None
        if idle_since and time.time() - idle_since > 30:
            raise LessonFailed(f"{name}: the kernel is idle but cells were not run: {st['pending'][:3]}")
        if time.time() - t0 > timeout:
            page.screenshot(path=str(_shots(lab) / f"{name}-stuck.png"))
            raise LessonFailed(f"{name}: cells still running after {timeout / 60:.0f} min; "
                               f"not executed: {st['pending'][:3]}")
        time.sleep(1)


def _shot_cell(page, path: str, index: int, file: Path) -> None:
    cell = page.locator(f'[data-dpflat-lesson="{path}"] .jp-Cell').nth(index)
    try:
        cell.scroll_into_view_if_needed(timeout=5_000)
        cell.screenshot(path=str(file), timeout=10_000)
    except Exception:  # noqa: BLE001 - the screenshot is a help, the failure message is the result
        page.screenshot(path=str(file))


def _shoot_figures(page, path: str, name: str, shots: Path, tag: str = "") -> list[Path]:
    """Scroll to every figure of the lesson and screenshot it on its own; each must be drawn (non-empty box)."""
    figs = page.locator(f'[data-dpflat-lesson="{path}"] .js-plotly-plot')
    files = []
    for i in range(figs.count()):
        fig = figs.nth(i)
        fig.scroll_into_view_if_needed(timeout=10_000)
        page.wait_for_timeout(300)  # plotly redraws when it enters the view
        box = fig.bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100, f"{name}: figure {i} is not drawn ({box})"
        f = shots / f"{name}{tag}-figure{i:02d}.png"
        fig.screenshot(path=str(f))
        files.append(f)
    return files


FIGURES = ("(path) => Array.from(document.querySelectorAll('[data-dpflat-lesson=\"' + path + '\"] .js-plotly-plot "
           ".main-svg')).map(e => e.innerHTML.length + ':' + e.innerHTML.slice(-400))")
MOVE = """([path, what]) => {
  const out = document.querySelector('[data-dpflat-lesson="' + path + '"]');
  if (!out) return false;
  if (what === 'slider') {
    const h = out.querySelector('.widget-slider .noUi-handle, .widget-hslider .noUi-handle, .widget-slider .slider-handle');
    if (!h) return false; h.scrollIntoView(); h.focus();
    h.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight', keyCode: 39, bubbles: true}));
    h.dispatchEvent(new KeyboardEvent('keyup', {key: 'ArrowRight', keyCode: 39, bubbles: true}));
    return true;
  }
  if (what.startsWith('button:')) {
    const label = what.slice(7);
    const b = Array.from(out.querySelectorAll('button')).find(e => e.textContent.trim() === label);
    if (!b) return false; b.scrollIntoView(); b.click(); return true;
  }
  if (what.startsWith('select:')) {
    const desc = what.slice(7);
    const box = Array.from(out.querySelectorAll('.widget-dropdown')).find(e => e.textContent.trim().startsWith(desc));
    const s = box && box.querySelector('select');
    if (!s || s.options.length < 2) return false;
    s.scrollIntoView();
    s.selectedIndex = (s.selectedIndex + 1) % s.options.length;
    s.dispatchEvent(new Event('change', {bubbles: true}));
    return true;
  }
  return false;
}"""
TEXT = "(path) => document.querySelector('[data-dpflat-lesson=\"' + path + '\"]').innerText"
# the ablation panel's status line ("training ...", "done: ...", "already trained, ...: ..."), or ""
STATUS = ("(path) => { const m = document.querySelector('[data-dpflat-lesson=\"' + path + '\"]').innerText"
          ".match(/^(training .*|done: .*|already trained.*)$/m); return m ? m[1] : ''; }")


@pytest.mark.parametrize("name", LESSONS)
def test_lesson_runs_in_jupyterlab_and_its_widgets_redraw(lab, browser, name):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    shots = _shots(lab)
    try:
        path = _open(page, lab, name)
        _run_lesson(page, lab, name)
        figures = _shoot_figures(page, path, name, shots)
        assert figures, f"{name}: no figure in the page"
        for what, how, *expect in ACTIONS.get(name, []):
            before, status0, text0 = page.evaluate(FIGURES, path), page.evaluate(STATUS, path), page.evaluate(TEXT, path)
            found = True
            for step in how.split(";"):  # a sequence of moves; the figure is compared after the last
                found = found and page.evaluate(MOVE, [path, step])
                time.sleep(1)
            if not found:
                page.screenshot(path=str(shots / f"{name}-missing-control.png"))
            assert found, f"{name}: control not found in the page: {what}"
            deadline = time.time() + (300 if "Train" in how else 90)
            if expect:  # a control whose answer is text, not a figure: one more occurrence than before
                n0 = len(re.findall(expect[0], text0))
                while len(re.findall(expect[0], page.evaluate(TEXT, path))) <= n0:
                    if time.time() > deadline:
                        page.screenshot(path=str(shots / f"{name}-no-answer.png"))
                        pytest.fail(f"{name}: the {what} did not show {expect[0]!r}")
                    time.sleep(1)
            while not expect and page.evaluate(FIGURES, path) == before:
                if time.time() > deadline:
                    page.screenshot(path=str(shots / f"{name}-no-redraw.png"))
                    pytest.fail(f"{name}: moving the {what} did not redraw any figure "
                                f"({len(before)} figures in the page)")
                time.sleep(1)
            if "Train" in how:  # the figure changed when training began: wait for the run to finish
                deadline = time.time() + 300
                while not re.match(r"(done|already trained)", st := page.evaluate(STATUS, path)) or st == status0:
                    assert time.time() < deadline, f"{name}: the panel's training did not finish within 5 min"
                    time.sleep(2)
                time.sleep(2)  # the last figure update
            shot = re.sub(r"[^\w+-]", "_", how.replace(";", "+"))
            _shoot_figures(page, path, name, shots, tag=f"-after-{shot}")
        errors = page.evaluate(STATE, path)["errors"]  # a callback of a control may have raised
        assert not errors, f"{name}: {errors}"
    finally:
        try:
            page.evaluate(SHUTDOWN, f"{name}.ipynb")  # the next lesson gets the CPU
        except Exception:  # noqa: BLE001 - the page may be gone after a failure
            pass
        page.close()


def test_a_raising_lesson_fails_within_a_minute_naming_its_cell(lab, browser):
    """A lesson with a cell that raises is reported as soon as the error is in that cell's model: the cell's
    index, its first line and the exception; not after the 15-minute timeout (JupyterLab 4 renders tracebacks
    as ``vnd.jupyter.stderr``: the old check, counting ``vnd.jupyter.error`` nodes, never saw one)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _open(page, lab, "07_raises")
        t0 = time.time()
        with pytest.raises(LessonFailed) as e:
            _run_lesson(page, lab, "07_raises")
        took = time.time() - t0
        msg = str(e.value)
        assert "raise RuntimeError" in msg and "RuntimeError: a planted failure" in msg and re.search(r"cell \d+", msg)
        assert took < 60, f"took {took:.0f} s to report the failure"
    finally:
        page.evaluate(SHUTDOWN, "07_raises.ipynb")
        page.close()
