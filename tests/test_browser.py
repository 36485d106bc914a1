"""The lessons as a learner meets them: JupyterLab in a real (headless) browser.

Opt-in (``pytest -m browser``; skipped by default and when a piece is missing). Why:
``test_notebooks`` proves the cells run and ``test_widgets`` proves the callbacks, but
only a browser shows that a widget is a *live control* that redraws its figure in the
page (a kernel busy elsewhere, a missing widget manager, a figure too wide to see).

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
    # draw the same figure): a new target ε first, then Train
    "05_ablations": [("ablation panel: the ε slider one step right, then the Train button", "slider;button:Train")],
}


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
    # every cell in the DOM (JupyterLab 4 renders only the visible ones by default), no news pop-up
    settings = root / "lab-settings"
    for ext, name, value in (("notebook-extension", "tracker", {"windowingMode": "none"}),
                             ("apputils-extension", "notification", {"fetchNews": "false"})):
        (settings / f"@jupyterlab/{ext}").mkdir(parents=True, exist_ok=True)
        (settings / f"@jupyterlab/{ext}" / f"{name}.jupyterlab-settings").write_text(json.dumps(value))
    port, token = _free_port(), "dpflat-browser-test"
    env = {**os.environ, "JUPYTER_PATH": str(root / "jupyter"), "PYTHONPATH": str(ROOT),
           "JUPYTERLAB_SETTINGS_DIR": str(settings)}
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


RUN_ALL = "() => window.jupyterapp.commands.execute('notebook:run-all-cells')"
# all code cells executed (an execution count) and the kernel idle; or an error output
STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext || !w.sessionContext.session) return {ready: false};
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const done = cells.every(c => c.model.executionCount !== null);
  const errors = document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
                 + ', .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]').length;
  const status = w.sessionContext.session.kernel ? w.sessionContext.session.kernel.status : 'none';
  return {ready: true, done, errors, status, n: cells.length};
}"""
# the code cells without an execution count (index and first line), for a failure message
PENDING = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .map((c, i) => [i, c]).filter(([i, c]) => c.model.type === 'code' && c.model.executionCount === null)
  .map(([i, c]) => i + ': ' + c.model.sharedModel.getSource().split('\\n')[0])"""
# scoped to the open notebook: earlier lessons stay open in other (hidden) tabs
FIGURES = "() => Array.from(window.jupyterapp.shell.currentWidget.node.querySelectorAll('.js-plotly-plot .main-svg')).map(e => e.innerHTML.length + ':' + e.innerHTML.slice(-400))"
MOVE = """(what) => {
  const out = window.jupyterapp.shell.currentWidget.node;
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


TEXT = "() => window.jupyterapp.shell.currentWidget.node.innerText"
# the ablation panel's status line ("training ...", "done: ...", "already trained, ...: ..."), or ""
STATUS = ("() => { const m = window.jupyterapp.shell.currentWidget.node.innerText"
          ".match(/^(training .*|done: .*|already trained.*)$/m); return m ? m[1] : ''; }")


@pytest.mark.parametrize("name", ["01_quickstart", "02_dp_tradeoffs", "03_flatness_landscapes",
                                  "04_sharpness_vs_epsilon", "05_ablations", "06_privacy_audit"])
def test_lesson_runs_in_jupyterlab_and_its_widgets_redraw(lab, browser, name):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{lab['url']}/lab/tree/{name}.ipynb?token={lab['token']}", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=120_000)
    deadline = time.time() + 120
    while not page.evaluate(STATE).get("ready") or page.evaluate(STATE).get("status") not in ("idle",):
        assert time.time() < deadline, "the kernel did not start"
        time.sleep(1)
    page.evaluate(RUN_ALL)
    deadline = time.time() + 900
    while True:
        st = page.evaluate(STATE)
        if st.get("done") and st.get("status") == "idle":
            break
        if time.time() > deadline:
            page.screenshot(path=str(_shots(lab) / f"{name}-stuck.png"))
            pytest.fail(f"{name}: cells still running after 15 min: {st}; not executed: {page.evaluate(PENDING)}")
        time.sleep(2)
    shots = _shots(lab)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    errors = page.evaluate("() => window.jupyterapp.shell.currentWidget.node"
                           ".querySelectorAll('[data-mime-type=\"application/vnd.jupyter.error\"]').length")
    assert errors == 0, f"{name}: {errors} cell error(s) in the page (screenshot {shots / (name + '.png')})"
    for what, how, *expect in ACTIONS.get(name, []):
        before, status0, text0 = page.evaluate(FIGURES), page.evaluate(STATUS), page.evaluate(TEXT)
        found = True
        for step in how.split(";"):  # a sequence of moves; the figure is compared after the last
            found = found and page.evaluate(MOVE, step)
            time.sleep(1)
        if not found:
            page.screenshot(path=str(shots / f"{name}-missing-control.png"))
        assert found, f"{name}: control not found in the page: {what}"
        deadline = time.time() + (300 if "Train" in how else 90)
        if expect:  # a control whose answer is text, not a figure: one more occurrence than before
            n0 = len(re.findall(expect[0], text0))
            while len(re.findall(expect[0], page.evaluate(TEXT))) <= n0:
                if time.time() > deadline:
                    page.screenshot(path=str(shots / f"{name}-no-answer.png"))
                    pytest.fail(f"{name}: the {what} did not show {expect[0]!r}")
                time.sleep(1)
        while not expect and page.evaluate(FIGURES) == before:
            if time.time() > deadline:
                page.screenshot(path=str(shots / f"{name}-no-redraw.png"))
                pytest.fail(f"{name}: moving the {what} did not redraw any figure "
                            f"({len(before)} figures in the page)")
            time.sleep(1)
        if "Train" in how:  # the figure changed when training began: wait for the run to finish
            deadline = time.time() + 300
            while not re.match(r"(done|already trained)", st := page.evaluate(STATUS)) or st == status0:
                assert time.time() < deadline, f"{name}: the panel's training did not finish within 5 min"
                time.sleep(2)
            time.sleep(2)  # the last figure update
        shot = re.sub(r"[^\w+-]", "_", how.replace(";", "+"))
        page.screenshot(path=str(shots / f"{name}-after-{shot}.png"), full_page=True)
    page.close()
