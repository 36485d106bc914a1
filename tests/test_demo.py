"""The main job end to end on a tiny model: sweep -> landscapes -> one self-contained report."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from dpflat.cli import main
from dpflat.demo import run_demo
from dpflat.privacy import DP, NOT_DP_NONPRIVATE


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(str(out), epsilons=(2.0, 8.0), variants=("nonprivate", "dp"), train_size=192, epochs=1,
                   backbone="tiny-bert", data_dir=str(shared_data), grid=3, n_examples=16, progress=False)
    return out, res


def test_demo_writes_a_self_contained_report_with_the_sharpness_figure(demo_out):
    out, res = demo_out
    html = (out / "report.html").read_text()
    assert res["report"] == str(out / "report.html")
    assert "Sharpness and accuracy against the privacy budget" in html
    assert "<script src=" not in html  # plotly inlined: opens offline
    assert html.count("Plotly.newPlot") >= 4  # sharpness vs ε, contours, 3D, density, eigenvalue bars
    assert DP in html and NOT_DP_NONPRIVATE in html


def test_demo_results_table_has_landscape_columns_and_honest_epsilons(demo_out):
    out, _ = demo_out
    t = pd.read_parquet(out / "results.parquet")
    assert len(t) == 3  # nonprivate once, dp at two ε
    assert t["top_eigenvalue"].notna().all() and t["sam_sharpness"].notna().all()
    dp = t[t["variant"] == "dp"]
    assert (dp["epsilon"] <= dp["target_epsilon"] + 1e-9).all()
    assert t.loc[t["variant"] == "nonprivate", "epsilon"].isna().all()


def test_sharpness_figure_draws_one_line_per_variant_and_nonprivate_as_a_band(demo_out):
    from dpflat.report import sharpness_vs_epsilon

    out, _ = demo_out
    t = pd.read_parquet(out / "results.parquet")
    fig = sharpness_vs_epsilon(t, ("top_eigenvalue",))
    names = [tr.name for tr in fig.data]
    assert any(n.startswith("dp · " + DP) for n in names)
    band = next(tr for tr in fig.data if tr.name.startswith("nonprivate"))
    assert band.line.dash == "dash" and band.y[0] == band.y[1]
    line = next(tr for tr in fig.data if tr.name.startswith("dp "))
    assert sorted(line.x) == [2.0, 8.0]


def test_demo_is_resumable_and_report_cli(demo_out, capsys):
    out, _ = demo_out
    assert main(["report", str(out), "--title", "again"]) == 0
    assert re.search(r"<title>again</title>", (out / "report.html").read_text())
    assert main(["report", str(out / "nothing-here")]) == 2
    assert "dpflat: error:" in capsys.readouterr().err
