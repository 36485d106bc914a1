"""Landscape analysis of run folders (dpflat.analysis) and the `landscape` CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dpflat import analysis
from dpflat.cli import main
from dpflat.config import apply_variant
from dpflat.train import train


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, shared_data):
    from tests.conftest import tiny_run_config

    out = tmp_path_factory.mktemp("runs")
    base = tiny_run_config(out, shared_data)
    dp = train(base)
    nonpriv = train(apply_variant(base, "nonprivate"))
    return out, dp, nonpriv


def test_analyze_run_writes_results_next_to_run_and_into_table(finished_runs):
    out, dp, _ = finished_runs
    s = analysis.analyze_run(dp["run_dir"], top_k=2, grid=5, n_examples=32, progress=False)
    assert len(s["eigenvalues"]) == 2 and s["eigenvalues"][0] >= s["eigenvalues"][1]
    assert s["top_eigenvalue"] == pytest.approx(s["eigenvalues"][0])
    assert s["guarantee"] == dp["guarantee"] and "ε=" in s["label"]
    # the surface centre is the model's own loss on the same subset
    run = analysis.load_run(dp["run_dir"])
    batches = analysis.analysis_batches(run, 32)
    import landscape as ls

    surf = analysis.load_surface(dp["run_dir"])
    assert surf.losses.shape == (5, 5)
    assert surf.center_loss == pytest.approx(ls.dataset_loss(run.model, analysis.ce_loss, batches), rel=1e-5)
    dens = analysis.load_density(dp["run_dir"])
    assert dens.mean * dens.n == pytest.approx(dens.trace_estimate)
    row = pd.read_parquet(out / "results.parquet").set_index("run_id").loc[dp["run_id"]]
    assert row["top_eigenvalue"] == pytest.approx(s["top_eigenvalue"])
    assert np.isfinite(row["sam_sharpness"]) and row["sam_sharpness"] >= 0


def test_analysis_is_cached_unless_settings_change(finished_runs):
    _, dp, _ = finished_runs
    a = analysis.analyze_run(dp["run_dir"], top_k=2, grid=5, n_examples=32, progress=False)
    f = analysis.SUBDIR
    mtime = (__import__("pathlib").Path(dp["run_dir"]) / f / "landscape.json").stat().st_mtime_ns
    b = analysis.analyze_run(dp["run_dir"], top_k=2, grid=5, n_examples=32, progress=False)
    assert a == b
    assert (__import__("pathlib").Path(dp["run_dir"]) / f / "landscape.json").stat().st_mtime_ns == mtime


def test_nonprivate_label_never_shows_an_epsilon(finished_runs):
    _, _, nonpriv = finished_runs
    run = analysis.load_run(nonpriv["run_dir"])
    assert "ε=" not in run.label and "not DP" in run.label


def test_landscape_cli(finished_runs, capsys):
    _, _, nonpriv = finished_runs
    assert main(["landscape", nonpriv["run_dir"], "--top-k", "1", "--grid", "3", "--n-examples", "16",
                 "--no-surface"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["guarantee"].startswith("not DP") and printed["top_eigenvalue"] > 0


def test_landscape_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["landscape", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpflat: error:")
    assert main(["landscape", str(tmp_path), "--grid", "1"]) == 2


def test_paired_accuracy_difference_reads_both_runs_on_the_same_examples(finished_runs):
    """B - A on the test split: a run against itself is exactly 0 with a zero-width interval."""
    from dpflat import widgets as W

    _, dp, nonpriv = finished_runs
    same = W.paired_accuracy_difference(dp["run_dir"], dp["run_dir"], n_boot=50)
    assert same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0
    d = W.paired_accuracy_difference(dp["run_dir"], nonpriv["run_dir"], n_boot=200)
    assert d["difference"] == pytest.approx(d["accuracy_b"] - d["accuracy_a"])
    assert d["ci_low"] <= d["difference"] <= d["ci_high"] and d["n"] == len(analysis.example_correct(dp["run_dir"]))


def test_run_folder_reads_go_through_rundir(tmp_path):
    """RunDir's readers: a corrupt landscape summary reads as "not analysed", predictions come back
    in test-row order, an empty trajectory file is no trajectory."""
    from dpflat.runs import RunDir

    rd = RunDir(tmp_path / "run")
    rd.landscape_dir.mkdir(parents=True)
    assert rd.landscape() is None and rd.trajectory() == [] and rd.test_correct() is None and rd.ledger() is None
    rd.landscape_file.write_text("{cut")
    assert rd.landscape() is None
    rd.landscape_file.write_text(json.dumps({"top_eigenvalue": 2.0}))
    assert rd.landscape() == {"top_eigenvalue": 2.0}
    rd.sharpness_file.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert [r["step"] for r in rd.trajectory()] == [1, 2]
    np.savez(rd.predictions_file, idx=np.array([2, 0, 1]), correct=np.array([1, 0, 1]))
    assert rd.test_correct().tolist() == [0.0, 1.0, 1.0]
    rd.ledger_file.write_text(json.dumps({"guarantee": "(ε, δ)-DP"}))  # no mechanism or reads: not a ledger
    assert rd.ledger() is None and rd.canaries() == set()
    rd.canaries_file.write_text(json.dumps({"rows": [5, 3, 5]}))
    assert rd.canaries() == {3, 5}


def test_regrouped_analysis_gives_the_padded_figures(finished_runs, tmp_path):
    """The analysis regroups its subset by length and cuts the padding (cost only): every
    figure equals the padded batches' up to float summation order."""
    import shutil

    _, dp, _ = finished_runs
    run = analysis.load_run(dp["run_dir"])
    padded, grouped = analysis.analysis_batches(run, 48, regroup=None), analysis.analysis_batches(run, 48, regroup=8)
    positions = lambda bl: sum(b["input_ids"].numel() for b in bl)  # noqa: E731
    assert positions(grouped) < positions(padded) and sum(len(b["labels"]) for b in grouped) == 48
    figs = {}
    for mode in (None, 8):
        d = tmp_path / f"r{mode}"
        shutil.copytree(dp["run_dir"], d)
        figs[mode] = analysis.analyze_run(d, top_k=2, grid=3, n_examples=48, density=False, progress=False,
                                          regroup=mode)
        assert figs[mode]["settings"] == figs[None]["settings"]  # not part of the cache key: same figures
    a, b = figs[None], figs[8]
    for k in ("top_eigenvalue", "hessian_trace", "sam_sharpness", "surface_center_loss"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k
    assert np.allclose(analysis.load_surface(tmp_path / "r8").losses, analysis.load_surface(tmp_path / "rNone").losses,
                       rtol=1e-5, atol=1e-7)


def test_surfaces_along_eigenvectors_and_towards_a_reference_are_computed_and_cached_by_the_library(
        finished_runs, monkeypatch):
    """``axis_surface`` (what the notebook's surface viewer shows): the top-2 eigenvector axes and the
    line to the non-private model, on the eval subset, cached in the run folder through RunDir."""
    import landscape as ls
    from dpflat.runs import RunDir

    _, dp, nonpriv = finished_runs
    kw = dict(grid=3, n_examples=16, seed=0)
    eig = analysis.axis_surface(dp["run_dir"], "eigen", **kw)
    assert eig.losses.shape == (3, 3) and np.isfinite(eig.losses).all()
    assert [d["kind"] for d in eig.settings["directions"]] == ["eigen", "eigen"]
    # the centre is the model's own loss on the analysis subset (the eval split: no private read)
    run = analysis.load_run(dp["run_dir"])
    centre = ls.dataset_loss(run.model, analysis.ce_loss, analysis.analysis_batches(run, 16))
    assert eig.center_loss == pytest.approx(centre, rel=1e-5)
    # eigen-directions scaled to the random direction's norm: the loss grows away from θ along them
    assert eig.losses.max() >= eig.center_loss - 1e-6

    inter = analysis.axis_surface(dp["run_dir"], "interp", reference=nonpriv["run_dir"], **kw)
    assert [d["kind"] for d in inter.settings["directions"]][0] == "interpolation"
    assert inter.coords[0][0] == pytest.approx(-0.5) and inter.coords[0][-1] == pytest.approx(1.5)
    assert analysis.axis_surface(nonpriv["run_dir"], "interp", reference=nonpriv["run_dir"], **kw) is None
    assert analysis.axis_surface(dp["run_dir"], "interp", **kw) is None  # no reference, no line

    # cached through RunDir: read back without loading the model again
    rd = RunDir(dp["run_dir"])
    assert rd.cached_surface(rd.axis_surface_name("eigen", 3, 16, 0)) is not None
    assert rd.cached_surface(rd.axis_surface_name("eigen", 5, 16, 0)) is None
    monkeypatch.setattr(analysis, "load_run", lambda *a, **k: pytest.fail("recomputed a cached surface"))
    again = analysis.axis_surface(dp["run_dir"], "eigen", **kw)
    assert np.array_equal(again.losses, eig.losses)
    with pytest.raises(ValueError, match="axes must be one of"):
        analysis.axis_surface(dp["run_dir"], "sideways")
