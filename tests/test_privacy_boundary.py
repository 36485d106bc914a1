"""Issue 26: what a run folder may say about a guarantee, and what a reader may conclude from it.

The default δ for a tiny N, a target ε the accountant cannot resolve, the release boundary of
every covered file (no private statistic in result.json, the results table or ledger.json),
``report`` of a copied output folder, and a forged but self-consistent ledger. The crash before
the first checkpoint is in ``test_privacy_honesty.py`` with the other kill -9 tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from dpflat import cli
from dpflat.accountants import from_ledger
from dpflat.config import ConfigError, PrivacyConfig
from dpflat.engine import epsilon_for
from dpflat.privacy import DP, NOT_DP_PAPER, PRIVATE_METRICS, UNKNOWN, valid_ledger
from dpflat.runs import RunDir, load_results
from dpflat.train import train

SHORT = {"train": {"epochs": 0.5}}  # 2 steps of the tiny config


@pytest.fixture(scope="module")
def dp_root(tmp_path_factory, shared_data) -> Path:
    """The output folder of one finished tiny DP run (8 steps), read-only for the tests below."""
    from conftest import tiny_run_config

    out = tmp_path_factory.mktemp("boundary") / "runs"
    train(tiny_run_config(out, shared_data), noise_seed=3)
    return out


def _only_run(root: Path) -> RunDir:
    (d,) = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return RunDir(d)


# --------------------------------------------------------------------------- 2. default δ for tiny N
def test_the_default_delta_keeps_the_one_over_n_rule_so_one_private_example_is_refused(tmp_path, shared_data,
                                                                                        capsys):
    with pytest.raises(ConfigError, match="at least 2 private examples"):
        PrivacyConfig().resolve_delta(1)  # 1/N^1.1 = 1 = 1/N
    assert PrivacyConfig().resolve_delta(2) < 1 / 2
    out = tmp_path / "runs"
    rc = cli.main(["train", "--backbone", "tiny-bert", "--data-dir", str(shared_data), "--train-size", "1",
                   "--batch-size", "1", "--eval-size", "16", "--public-size", "16", "--max-length", "16",
                   "--no-progress", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "N = 1" in err[0] and "--train-size" in err[0], err
    assert not out.exists()  # nothing left behind, not even the output folder


# --------------------------------------------------------------------------- 3. tiny ε
def test_a_target_epsilon_the_accountant_cannot_resolve_is_refused_and_no_claim_is_negative(tmp_path, make_cfg,
                                                                                              monkeypatch):
    import dpflat.train as train_mod

    monkeypatch.setattr(train_mod, "build_model", lambda *a, **k: pytest.fail("refused only after building a model"))
    with pytest.raises(ConfigError, match=r"cannot reach ε=0\.0001 .*<= 0"):
        train(make_cfg(tmp_path / "runs", privacy={"epsilon": 1e-4}))
    assert not (tmp_path / "runs").exists()
    # far below its resolution the RDP conversion goes below 0; the claim is then 0, never negative
    assert epsilon_for("rdp", 0.25, 160.0, 4, 0.0103) == 0.0
    # the cross-check of such a ledger (as main wrote it) reports, it does not divide by dp_accounting's ε = 0
    forged = {"mechanism": "dp-sgd", "guarantee": DP, "accountant": "rdp", "sample_rate": 0.25,
              "noise_multiplier": 160.0, "steps": 4, "delta": 0.0103, "epsilon": -0.00306, "n_private": 64}
    c = from_ledger(forged, names=("dp_accounting_rdp", "dp_accounting_pld"))
    assert c.epsilons == {"dp_accounting_rdp": 0.0, "dp_accounting_pld": 0.0}
    assert c.claim_above_pld is False and c.ledger_matches is False and "FAILED" in c.table()


# --------------------------------------------------------------------------- 4. report of a copy
def test_report_of_a_copied_output_folder_reads_the_copy_not_the_original(dp_root, tmp_path):
    from dpflat.report import build_report, checked_guarantees

    copy = tmp_path / "copy"
    shutil.copytree(dp_root, copy)
    rd = _only_run(copy)
    rd.ledger_file.unlink()
    table = load_results(copy)
    t = checked_guarantees(table, copy)
    assert t.iloc[0]["guarantee"] == UNKNOWN and math.isnan(t.iloc[0]["epsilon"])
    assert table.iloc[0]["run_dir"] == str(rd.path)  # beside the table, not the stored absolute path
    assert UNKNOWN in build_report(copy).read_text() and "1 runs, 0 of them (ε, δ)-DP" in (copy / "report.html").read_text()
    assert checked_guarantees(load_results(dp_root), dp_root).iloc[0]["guarantee"] == DP  # the original is untouched
    with pytest.raises(FileNotFoundError, match="no results table in"):
        load_results(tmp_path / "typo")  # a path that is no folder is not an empty table


# --------------------------------------------------------------------------- 5. covered files
def _release_names(ledger: dict) -> str:
    rel = ledger["release"]
    return " ".join(rel["covered"] + rel["private_diagnostics_not_covered"])


def _assert_boundary(rd: RunDir, table_row: dict) -> None:
    """No covered file of a DP run holds an overlap count or a batch-size statistic; every file is named."""
    ledger = json.loads(rd.ledger_file.read_text())
    result = json.loads(rd.result_file.read_text())
    assert ledger["guarantee"] == DP
    for shown in (result, table_row, ledger, result.get("info", {})):
        assert not [k for k in shown if "overlap" in k or k in ("batch_sizes", "queries", "info_queries")], shown
    assert all(set(r) == {"who", "how", "accounted"} for r in ledger["reads"] if r["accounted"]), ledger["reads"]
    private = rd.private_diagnostics()
    assert private["batch_sizes"]["steps"] == ledger["steps"] and private["batch_sizes"]["sum"] > 0
    assert any(r["accounted"] and r["examples"] == private["batch_sizes"]["sum"] for r in private["reads"])
    # the public throughput is the expected one: examples_per_s x train_s no longer gives the exact sum back
    if "examples_per_s" in result:
        expected = ledger["steps"] * ledger["sample_rate"] * ledger["n_private"]
        assert result["examples_per_s"] * result["train_s"] == pytest.approx(expected)
    rows = [json.loads(x) for x in rd.metrics_file.read_text().splitlines()]
    named = _release_names(ledger)
    for col in {k for r in rows for k in r} - {"step", "epoch", "epsilon", "z_norm"}:
        assert col.startswith("eval_") or col in PRIVATE_METRICS, col
    for col in PRIVATE_METRICS:
        assert col in named
    for p in rd.path.iterdir():
        assert (p.name.startswith("ckpt-") and "ckpt-*/" in named) or p.name in named, p.name


def test_no_covered_file_holds_a_private_statistic_and_the_boundary_names_every_file(dp_root, tmp_path, make_cfg):
    rd = _only_run(dp_root)
    _assert_boundary(rd, load_results(dp_root).iloc[0].to_dict())
    private = rd.private_diagnostics()
    assert set(private["split_overlap"]) >= {"train_test", "public_private", "val_private"}
    assert "split_overlap" not in json.loads(rd.ledger_file.read_text())
    # audit's Poisson test reads the batch sizes from the private diagnostics
    c = from_ledger(rd.path, names=("opacus_rdp",))
    assert c.poisson["steps"] == 8 and c.poisson["consistent"] is True
    # the black box: its per-step queries and clipped fraction are named, the total count is private
    from dpflat.blackbox import train as bb_train

    res = bb_train(make_cfg(tmp_path / "bb", variant="bb-dp", blackbox={"active": True, "prompt_dim": 8,
                                                                          "prompt_tokens": 2}, **SHORT), noise_seed=1)
    bb = RunDir(res["run_dir"])
    _assert_boundary(bb, load_results(tmp_path / "bb").iloc[0].to_dict())
    assert bb.private_diagnostics()["queries"] > 0
    assert {"clipped_fraction", "queries"} <= set(json.loads(bb.metrics_file.read_text().splitlines()[0]))


# --------------------------------------------------------------------------- 6. a forged ledger
def _forge_dp(ledger: dict) -> dict:
    """Every read flipped to accounted, the labels made to match: valid_ledger cannot tell."""
    d = {**ledger, "reads": [{**r, "accounted": True} for r in ledger["reads"]], "guarantee": DP,
         "unaccounted_reads": 0}
    d["epsilon"] = d["claimed_epsilon"] = d.pop("dpsgd_part_epsilon")
    return d


def test_a_forged_but_self_consistent_ledger_is_not_labelled_dp(tmp_path, make_cfg):
    from dpflat.report import build_report, checked_guarantees
    from dpflat.verify import derive_run

    out = tmp_path / "runs"
    res = train(make_cfg(out, variant="dp+awp-paper", flat={"awp": True, "awp_mode": "paper", "awp_epochs": 1.0},
                         **SHORT), noise_seed=2)
    rd = RunDir(res["run_dir"])
    forged = _forge_dp(json.loads(rd.ledger_file.read_text()))
    assert valid_ledger(forged) is not None  # self-consistent: the file alone cannot be caught
    rd.ledger_file.write_text(json.dumps(forged))
    t = checked_guarantees(load_results(out), out)
    assert t.iloc[0]["guarantee"] == NOT_DP_PAPER and math.isnan(t.iloc[0]["epsilon"])
    assert "paper mode" in derive_run(rd.path).reason
    assert "1 runs, 0 of them (ε, δ)-DP" in build_report(out).read_text()


def test_the_guarantee_is_derived_from_config_reads_and_mechanism(dp_root):
    """The same derivation catches a lowered ε, a changed mechanism and an extra 'accounted' read."""
    from dpflat.blackbox import loop
    from dpflat.privacy import MECHANISM_READ
    from dpflat.train import TRAIN_WHO
    from dpflat.verify import derive

    assert MECHANISM_READ == {"dp-sgd": TRAIN_WHO, "dpzero": loop.TRAIN_WHO}  # each mechanism's own read

    rd = _only_run(dp_root)
    led, cfg = json.loads(rd.ledger_file.read_text()), rd.config()
    ok = derive(led, cfg)
    assert ok.guarantee == DP and ok.epsilon == pytest.approx(led["epsilon"], rel=1e-9)
    low = {**led, "epsilon": led["epsilon"] / 2, "claimed_epsilon": led["epsilon"] / 2}
    assert derive(low, cfg).guarantee == UNKNOWN and valid_ledger(low) is not None
    assert derive({**led, "steps": led["steps"] // 2}, cfg).guarantee == UNKNOWN
    extra = {**led, "reads": led["reads"] + [{"who": "awp/paper-ascent", "how": "raw grad", "accounted": True}]}
    assert derive(extra, cfg).guarantee == NOT_DP_PAPER and valid_ledger(extra) is not None
    assert derive(led, cfg.replace(flat={"awp": True, "awp_mode": "paper"})).guarantee == NOT_DP_PAPER
    assert derive(None, cfg).guarantee == UNKNOWN and derive(led, None).guarantee == UNKNOWN


def test_the_analysis_label_uses_the_derived_guarantee(dp_root, tmp_path):
    """``landscape`` labels a run like ``report``: a lowered ε in ledger.json is not believed."""
    from dpflat.analysis import LoadedRun

    copy = tmp_path / "copy"
    shutil.copytree(dp_root, copy)
    rd = _only_run(copy)
    led = json.loads(rd.ledger_file.read_text())
    run = LoadedRun(rd.path, rd.config(), None, None, {})
    assert run.guarantee == DP and run.claimed_epsilon == pytest.approx(led["epsilon"])
    rd.ledger_file.write_text(json.dumps({**led, "epsilon": 0.1, "claimed_epsilon": 0.1}))
    run = LoadedRun(rd.path, rd.config(), None, None, {})
    assert run.guarantee == UNKNOWN and run.claimed_epsilon is None and "ε=" not in run.label
