"""The notebook suite: stored clean, and every notebook runs top to bottom.

Why both: a notebook saved with outputs leaks stale numbers (and bloats diffs), and a
notebook nobody executes rots silently when the library changes. Execution uses
papermill with tiny parameters (random tiny-BERT, 128 examples, one epoch), so the
whole suite runs in a few minutes on a CPU.

The kernel: a ``python3`` kernelspec pointing at *this* interpreter is written to a
temporary ``JUPYTER_PATH`` (searched first), so the notebooks run in the same venv as
the tests on a fresh clone, whatever other ``python3`` kernels a machine has.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "01_quickstart",
    "02_dp_tradeoffs",
    "03_flatness_landscapes",
    "04_sharpness_vs_epsilon",
    "05_ablations",
    "06_privacy_audit",
    "07_neighbouring_datasets",
]
NOTEBOOKS = [NB_DIR / f"{name}.ipynb" for name in EXPECTED]

# Small enough for seconds per run; every notebook reads these names.
TINY = {
    "backbone": "tiny-bert",
    "train_size": 128,
    "eval_size": 64,
    "public_size": 64,
    "max_length": 24,
    "prefix_len": 4,
    "batch_size": 32,
    "physical_batch_size": 32,
    "epochs": 1.0,
    "lr": 0.05,
    "progress": False,
    "flat": {"layers_warmup_steps": 2, "layers_examples": 32, "layers_directions": 1, "teacher_epochs": 0.5},
}
PER_NOTEBOOK: dict[str, dict] = {
    # ε around 1: the accountant (run at every step) is slowest at the small σ of large ε
    "01_quickstart": {"epsilon": 1.0, "attack_per_side": 64},
    "02_dp_tradeoffs": {"epsilons": [1.0]},
    "03_flatness_landscapes": {"epsilon": 1.0, "top_k": 2, "grid": 5, "n_examples": 16, "line_points": 5},
    "04_sharpness_vs_epsilon": {"variants": ["dp"], "epsilons": [1.0, 4.0], "seeds": [0],
                                "top_k": 1, "grid": 3, "n_examples": 16, "attack_per_side": 64},
    "05_ablations": {"epsilon": 1.0, "baseline_variants": ["dp"]},
    "06_privacy_audit": {"epsilon": 1.0, "attack_variants": ["dp", "dp+awp-paper"], "max_per_side": 64,
                         "n_bootstrap": 50, "audit_variants": ["dp"], "canaries": 16},
    # two runs per dataset: the figures need both clouds, the check needs one mechanism
    "07_neighbouring_datasets": {"epsilon": 1.0, "runs": 2, "nonprivate_runs": 1},
}


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """A ``python3`` kernelspec for this interpreter, found before any other."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (dpflat tests)",
        "language": "python",
        # tiny models gain nothing from a second thread, and on a busy machine two
        # spinning intra-op threads per kernel slow everything down (~2x measured)
        "env": {"OMP_NUM_THREADS": "1"},
    }))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
        yield "python3"
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def test_the_suite_is_complete():
    found = sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=EXPECTED)
def test_stored_clean_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(_code_cells(nb)):
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} has stored outputs (clear them before saving)"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "papermill needs a kernelspec"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is _code_cells(nb)[0], "one parameters cell, the first code cell"
    src = tagged[0].source
    assert "backbone" in src and "out_dir" in src and "out/notebooks/<size>" in src
    assert "GPU" in src, "the parameters cell gives the paper-scale (GPU) values"
    assert nb.cells[0].cell_type == "markdown" and sum(c.cell_type == "markdown" for c in nb.cells) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=EXPECTED)
def test_every_parameter_is_visible_to_papermill(path):
    """papermill silently skips assignments it cannot parse (multi-line values, '=' in a comment)."""
    import re

    import papermill as pm

    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = {m.group(1) for m in re.finditer(r"^(\w+)\s*=", cell.source, flags=re.M)}
    assert assigned == set(pm.inspect_notebook(str(path)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=EXPECTED)
def test_notebook_runs_end_to_end(path, python3_kernel, shared_data, tmp_path):
    import papermill as pm

    params = {**TINY, **PER_NOTEBOOK[path.stem], "data_dir": str(shared_data), "out_dir": str(tmp_path / "out")}
    declared = pm.inspect_notebook(str(path))
    unknown = set(params) - set(declared)
    assert not unknown, f"{path.name} has no parameters {sorted(unknown)}"
    pm.execute_notebook(
        str(path), str(tmp_path / path.name), parameters=params, kernel_name=python3_kernel,
        cwd=str(NB_DIR), progress_bar=False, log_output=False, execution_timeout=600,
    )
    ran = nbformat.read(tmp_path / path.name, as_version=4)
    errors = [o for c in _code_cells(ran) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # 07 keeps its many tiny runs apart from the other lessons' results table (04's explorer reads that one)
    table = tmp_path / "out" / ("neighbours" if path.stem == "07_neighbouring_datasets" else "") / "results.parquet"
    assert table.is_file(), "the runs went to the out_dir parameter"
    if path.stem == "07_neighbouring_datasets":  # every repeat is its own run: D′, D′ + r, D′ + r* (DP), 2 non-DP
        import pandas as pd

        p = PER_NOTEBOOK[path.stem]
        runs = pd.read_parquet(table)
        assert len(runs) == 3 * p["runs"] + 2 * p["nonprivate_runs"]
        assert not (tmp_path / "out" / "results.parquet").exists()
    if path.stem == "04_sharpness_vs_epsilon":  # section 3 trained the black-box variants there too
        import pandas as pd

        variants = set(pd.read_parquet(tmp_path / "out" / "results.parquet")["variant"])
        assert {"bb-dp", "bb-dpflat-safe"} <= variants
    attacked = {"01_quickstart": {"dp", "dpflat-safe"}, "04_sharpness_vs_epsilon": {"nonprivate", "dp"}}.get(path.stem)
    if attacked:  # the attacker beside the cost: every run the figure shows was attacked, by default
        import pandas as pd

        runs = pd.read_parquet(tmp_path / "out" / "results.parquet")
        runs = runs[runs["variant"].isin(attacked)]
        assert set(runs["variant"]) == attacked and runs["mia_advantage"].notna().all()
        assert (runs["mia_per_side"] == PER_NOTEBOOK[path.stem]["attack_per_side"]).all()


def test_make_lab_opens_a_git_ignored_working_copy_so_a_run_lesson_leaves_the_repository_clean(tmp_path):
    """``make lab`` opens the lessons from a copy (``lab/``, git-ignored), never from ``notebooks/``.

    Why: JupyterLab autosaves outputs into the notebook it runs; opened in place, one lesson run by a
    learner failed ``test_stored_clean_with_a_parameters_cell``. Here a repository with this checkout's
    Makefile, .gitignore and lessons gets its working copy, a lesson "run" there (outputs saved as
    JupyterLab saves them, a checkpoint folder, runs under out/), and ``git status`` stays empty.
    """
    import shutil
    import subprocess

    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs make and git")
    root = NB_DIR.parent
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    for f in ("Makefile", ".gitignore", "pyproject.toml"):
        shutil.copy(root / f, repo / f)
    for f in [*NOTEBOOKS, NB_DIR / "README.md"]:
        shutil.copy(f, repo / "notebooks" / f.name)
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True).stdout  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lessons")
    make = lambda *a: subprocess.run(["make", "-s", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731

    # the command `make lab` runs opens the copy, not notebooks/
    dry = make("-n", "lab").stdout
    opens = [ln for ln in dry.splitlines() if "jupyter lab" in ln]
    assert opens and all(" lab/" in ln and "notebooks" not in ln for ln in opens), dry

    make("lab-folder")
    lab = repo / "lab"
    assert sorted(p.name for p in lab.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert git("check-ignore", "lab/01_quickstart.ipynb").strip() == "lab/01_quickstart.ipynb"

    # a lesson run in the lab, saved as JupyterLab saves it: outputs and execution counts in the copy
    ran = lab / NOTEBOOKS[0].name
    nb = nbformat.read(ran, as_version=4)
    for i, cell in enumerate(_code_cells(nb), start=1):
        cell.execution_count = i
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {i}\n")]
    nbformat.write(nb, ran)
    (lab / ".ipynb_checkpoints").mkdir()
    shutil.copy(ran, lab / ".ipynb_checkpoints" / "01_quickstart-checkpoint.ipynb")
    (repo / "out" / "notebooks" / "quick" / "some_run").mkdir(parents=True)
    (repo / "out" / "notebooks" / "quick" / "results.parquet").write_bytes(b"rows")

    assert git("status", "--porcelain", "--untracked-files=all") == ""
    for path in (repo / "notebooks").glob("*.ipynb"):  # the committed lessons: still stored clean
        assert all(c.get("outputs") == [] for c in _code_cells(nbformat.read(path, as_version=4))), path.name

    # a second `make lab` keeps the learner's copy (their outputs and edits), and says when notebooks/ is newer
    os.utime(repo / "notebooks" / NOTEBOOKS[0].name, None)
    os.utime(ran, (1, 1))
    note = make("lab-folder").stdout
    assert nbformat.read(ran, as_version=4) == nb and "newer than your copy" in note
