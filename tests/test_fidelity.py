"""Evaluation protocol: selection on val, test read once at the end; the prompt head under DP;
the paper preset; the fidelity benchmark's tiny mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dpflat.train import LOSS_KEY
import pytest
import torch

import dpflat.session as session_mod
import dpflat.train as train_mod
from dpflat.config import (PAPER_DROPPED_LAYERS, RunConfig, apply_preset, apply_variant, paper_keep_layers)
from dpflat.runs import TEST_PREDICTIONS, RunDir

ROOT = Path(__file__).resolve().parents[1]


class _Sentinel(torch.utils.data.Dataset):
    """The test split behind a gate: every read is counted, reads before ``open`` are violations."""

    def __init__(self, ds):
        self.ds, self.reads, self.early, self.open = ds, 0, 0, False

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        self.early += not self.open
        return self.ds[i]


@pytest.mark.parametrize("variant", ["dp", "dpflat"])
def test_selection_never_reads_the_test_split(make_cfg, tmp_path, monkeypatch, variant):
    cfg = apply_variant(make_cfg(tmp_path / "runs"), variant).replace(
        data={"val_size": 48}, flat={"layers_warmup_steps": 2, "layers_examples": 16, "n_drop": 1,
                                     "teacher_epochs": 0.5})
    gate: dict = {}
    real_prepare, real_finish = session_mod.prepare_data, session_mod.Session.finish

    def prepare(c, tokenizer=None, extra_private=None):
        card, splits, tokd = real_prepare(c, tokenizer, extra_private)
        gate["test"] = _Sentinel(tokd["eval"])
        gate["n_test"], gate["val"] = len(tokd["eval"]), tokd["val"]
        return card, splits, {**tokd, "eval": gate["test"]}

    def finish(*args, **kw):
        gate["test"].open = True  # the end of training: from here the test split may be read, once
        return real_finish(*args, **kw)

    monkeypatch.setattr(session_mod, "prepare_data", prepare)
    monkeypatch.setattr(session_mod.Session, "finish", finish)
    res = train_mod.train(cfg)
    s = gate["test"]
    assert s.early == 0, "test split read before the end of training"
    assert s.reads == gate["n_test"] == res["n_eval"]  # read exactly once
    assert res["accuracy"] == res["test_accuracy"] and res["eval_loss"] == res["test_loss"]
    assert res["n_val"] == 48 and 0 <= res["val_accuracy"] <= 1
    rd = RunDir(res["run_dir"])
    evals = [r for r in rd.metrics() if "eval_accuracy" in r]
    assert evals and all(r["eval_n"] == 48 for r in evals)  # selection evaluations: the val split
    with np.load(rd.path / TEST_PREDICTIONS) as z:
        assert len(z["correct"]) == gate["n_test"] and z["correct"].mean() == pytest.approx(res["accuracy"])
    for k in ("wall_s", "setup_s", "examples_per_s", "peak_mem_mb"):
        assert res[k] > 0 or (k == "setup_s" and res[k] >= 0)
    overlap = rd.private_diagnostics()["split_overlap"]  # private: functions of the private split (issue 26)
    assert overlap["train_test"] >= 0 and "public_private" in overlap and not any("overlap" in k for k in res)
    assert json.loads(rd.result_file.read_text())["test_accuracy"] == res["test_accuracy"]


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_prompt_head_trains_under_dp(make_cfg, tmp_path, backbone):
    cfg = make_cfg(tmp_path / "runs", model={"backbone": backbone, "head": "prompt"}, data={"val_size": 32})
    res = train_mod.train(cfg)
    assert res["finished"] and res["guarantee"] == "(ε, δ)-DP" and np.isfinite(res["test_loss"])
    state = RunDir(res["run_dir"]).load_model_state()
    assert set(state) == {"prefix.embedding.weight", "prefix.keep_mask"}  # the MLM head stays frozen
    steps = [r for r in RunDir(res["run_dir"]).metrics() if LOSS_KEY in r]  # the private training loss
    assert len(steps) == res["steps"] and all(np.isfinite(r[LOSS_KEY]) for r in steps)


def test_paper_preset_sets_every_listed_value():
    cfg = apply_preset(RunConfig().replace(data={"task": "sst2"}), "paper")
    m, p, t, f, d = cfg.model, cfg.privacy, cfg.train, cfg.flat, cfg.data
    assert (m.backbone, m.prefix_len, m.head) == ("roberta-base", 50, "prompt")
    assert p.max_grad_norm == 0.1 and p.enabled
    assert (t.batch_size, t.epochs, t.lr, t.optimizer) == (1024, 30.0, 5e-5, "adamw")
    assert f.awp and f.awp_mode == "paper" and f.awp_gamma == 1e-4 and f.awp_epochs == 15.0
    assert f.distill and f.distill_mode == "paper" and f.distill_lambda == 0.01 and not f.distill_squared
    assert not f.layers  # the authors' hand-picked layers replace our selector
    assert m.keep_layer_ids() == [i for i in range(12) if i not in (11, 5, 10)]
    assert d.max_length == 256 and d.train_size is None
    assert cfg.variant == "dpflat-paper"
    for task, drop in [("qnli", (11, 10, 9)), ("qqp", (11, 10, 9)), ("mnli", (1, 4, 9)), ("trec", (1, 4, 9))]:
        keep = apply_preset(RunConfig().replace(data={"task": task}), "paper").model.keep_layer_ids()
        assert keep == [i for i in range(12) if i not in drop] and paper_keep_layers(task) == ",".join(map(str, keep))
    assert set(PAPER_DROPPED_LAYERS) == {"sst2", "qnli", "qqp"}
    # a chosen variant keeps its levels: the dp baseline gets the values, not AWP/distill/layers
    dp = apply_preset(apply_variant(RunConfig(), "dp"), "paper")
    assert dp.variant == "dp" and not (dp.flat.awp or dp.flat.distill) and dp.model.keep_layers is None
    assert dp.privacy.max_grad_norm == 0.1 and dp.model.head == "prompt"


def test_cli_preset_flag_and_overrides():
    from dpflat.cli import _parser, config_from_args

    ns = _parser().parse_args(["train", "--preset", "paper", "--task", "qnli", "--backbone", "tiny-roberta",
                               "--epochs", "2"])
    cfg = config_from_args(ns)
    assert cfg.model.backbone == "tiny-roberta" and cfg.train.epochs == 2  # flags win over the preset
    assert cfg.model.keep_layers == paper_keep_layers("qnli") and cfg.train.batch_size == 1024
    sw = config_from_args(_parser().parse_args(["sweep", "--preset", "paper"]))
    assert sw.variant == "custom" and sw.privacy.max_grad_norm == 0.1  # a sweep's cells choose variants


def test_bench_fidelity_tiny(tmp_path, shared_data):
    """The benchmark end to end in its tiny mode: a full table, then a PARTIAL one for a larger grid."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fidelity

    out, results = tmp_path / "runs", tmp_path / "RESULTS.md"
    common = ["--tiny", "--output-dir", str(out), "--data-dir", str(shared_data), "--tasks", "sst2",
              "--epsilons", "8", "--results", str(results)]
    bench_fidelity.main(common + ["--seeds", "0"])
    text = results.read_text()
    assert "PARTIAL" not in text and "| sst2 | nonprivate | ∞ |" in text
    for v in ("dp+awp-safe", "dp+layers-safe", "dp+distill-safe", "dpflat-safe"):
        assert f"| sst2 | {v} | 8 | (ε, δ)-DP |" in text
    assert "![paired differences to dp, 95% intervals](fidelity_study.png)" in text
    assert (tmp_path / "fidelity_study.png").read_bytes()[:4] == b"\x89PNG"  # the forest plot beside the markdown
    row = next(l for l in text.splitlines() if l.startswith("| sst2 | dpflat-safe | 8 |"))
    assert "crosses 0" in row or "[" in row  # a paired interval vs dp
    cells = row.split("|")
    assert cells[10].strip() != "—" and cells[11].strip() != "—"  # top eigenvalue and SAM sharpness measured
    assert cells[12].strip() == "no"  # dpflat keeps fewer prefix layers: not dp's parameter space
    bench_fidelity.main(common + ["--seeds", "0,1", "--report-only"])
    assert "PARTIAL (6 of 12 cells finished)" in results.read_text()


def test_bench_fidelity_record_outlives_the_run_folders(tmp_path, shared_data):
    """Run folders die with the machine; the committed record keeps finished cells: a fresh
    output dir skips them and prints the same table (paired intervals included)."""
    import shutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fidelity
    from _cells import CellRecord

    out, rec, res1, res2 = tmp_path / "runs", tmp_path / "cells.jsonl", tmp_path / "R1.md", tmp_path / "R2.md"
    common = ["--tiny", "--data-dir", str(shared_data), "--tasks", "sst2", "--epsilons", "8", "--seeds", "0",
              "--record", str(rec)]
    bench_fidelity.main(common + ["--output-dir", str(out), "--results", str(res1)])
    assert len(CellRecord(rec).cells()) == 7 and all(CellRecord(rec).correct(i) is not None for i in CellRecord(rec).cells())
    # the dp+distill cell's safe teacher by itself: the same teacher (its val accuracy), no private data read
    rows = {r["variant"]: r for r in CellRecord(rec).rows()}
    t = rows[bench_fidelity.TEACHER]
    assert t["val_accuracy"] == rows["dp+distill-safe"]["info_teacher_val_accuracy"] and t["info_teacher_cached"]
    assert any(l.startswith(f"| sst2 | {bench_fidelity.TEACHER} | 8 | reads no private data |")
               for l in res1.read_text().splitlines())
    shutil.rmtree(out)  # another machine: only the record is left, and the data lies elsewhere
    moved = tmp_path / "data_elsewhere"
    moved.symlink_to(shared_data, target_is_directory=True)
    fresh = tmp_path / "fresh"
    bench_fidelity.main([x if x != str(shared_data) else str(moved) for x in common]
                        + ["--output-dir", str(fresh), "--results", str(res2)])
    assert not fresh.exists() or not any(p.is_dir() for p in fresh.iterdir())  # nothing was trained again

    def table(p):
        return [l for l in p.read_text().splitlines() if l.startswith("| sst2 |")]

    assert table(res1) == table(res2) and "PARTIAL" not in res2.read_text()
    assert len(CellRecord(rec).cells()) == 7  # nothing recorded twice


def test_bench_fidelity_public_part_pairs_each_size_with_its_own_dp(tmp_path, shared_data):
    """The public part: per public size, dp, dp+distill and the safe teacher alone, in a table of its
    own (a public size moves the private split, so main's dp is no baseline for it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fidelity
    from _cells import CellRecord

    rec, res = tmp_path / "cells.jsonl", tmp_path / "R.md"
    bench_fidelity.main(["--tiny", "--parts", "public", "--data-dir", str(shared_data), "--tasks", "sst2",
                         "--epsilons", "8", "--seeds", "0", "--record", str(rec), "--output-dir",
                         str(tmp_path / "runs"), "--results", str(res)])
    rows = {r["variant"]: r for r in CellRecord(rec).rows()}
    for n in bench_fidelity.TINY_PUBLIC_SIZES:
        t = rows[f"{bench_fidelity.TEACHER} [public={n}]"]
        assert t["guarantee"] == "reads no private data"
        assert t["val_accuracy"] == rows[f"dp+distill[public={n}]"]["info_teacher_val_accuracy"]
    lines = res.read_text().splitlines()
    assert not any(l.startswith("| sst2 |") and "[public=" in l for l in lines)  # not paired with main's dp
    for n in bench_fidelity.TINY_PUBLIC_SIZES:
        row = next(l for l in lines if l.startswith(f"| {n} | 1 |")).split("|")
        assert all(c.strip() != "—" for c in row[3:8]), row  # three accuracies, two paired intervals


def test_cell_record_round_trip(tmp_path):
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _cells import CellRecord

    rec = CellRecord(tmp_path / "c.jsonl")
    corr = (np.arange(873) % 3 == 0).astype(float)
    assert rec.add("a", {"accuracy": 0.5, "val_accuracy": float("nan")}, corr)
    assert not rec.add("a", {"accuracy": 0.9}, None)  # the first record of a run id stays
    assert rec.rows() == [{"cell": "a", "accuracy": 0.5, "val_accuracy": None}]
    assert np.array_equal(rec.correct("a"), corr) and rec.correct("b") is None
    (tmp_path / "c.jsonl").write_text("<<<<<<< HEAD\n")
    with pytest.raises(ValueError, match="merge conflict"):
        rec.cells()


def _bench_args(shared_data, **over):
    import argparse

    d = dict(tiny=False, data_dir=str(shared_data), output_dir="/nonexistent", num_threads=1, grid="study",
             tasks=list(STUDY_TASKS), epsilons=[3.0, 8.0], seeds=[0, 1, 2, 3, 4], parts=["main", "selector", "lambda",
                                                                                     "gamma"])
    d.update(over)
    return argparse.Namespace(**d)


#: the study grid's tasks (benchmarks/bench_fidelity.py's default)
STUDY_TASKS = ("sst2", "mpqa")


def test_the_committed_study_record_matches_the_grid(shared_data):
    """Run ids hash the whole config: a changed default silently orphans every recorded cell
    (the benchmark would train the grid again and the table would lose them). Fail instead."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fidelity
    from _cells import CellRecord

    rec = CellRecord(ROOT / "benchmarks" / "fidelity_study_cells.jsonl")
    if not rec.path.is_file():
        pytest.skip("no study record committed yet")
    cells = bench_fidelity.grid(_bench_args(shared_data))
    grid = {bench_fidelity.cell_key(c) for c in cells} | {bench_fidelity.teacher_key(c) for c in cells}
    orphans = sorted(rec.cells() - grid)
    assert not orphans, (f"{len(orphans)} recorded fidelity cells are no longer in the grid (a config default "
                         f"changed their run ids), e.g. {orphans[:2]}: restart the table or keep the old default")


def test_the_old_defaults_table_is_rebuilt_from_its_record_alone(tmp_path, shared_data):
    """The 2026-12-05 table (old defaults) stays readable: its record alone prints all 70 cells."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fidelity

    out = tmp_path / "R.md"
    bench_fidelity.main(["--grid", "old", "--tasks", "sst2,qnli", "--results", str(out), "--output-dir",
                         str(tmp_path / "none"), "--data-dir", str(shared_data)])
    text = out.read_text()
    assert "the old defaults" in text and "PARTIAL" not in text and not (tmp_path / "none").exists()
    rows = [l for l in text.splitlines() if l.startswith(("| sst2 |", "| qnli |"))]
    assert len(rows) == 14 and all("| 5 |" in r for r in rows)  # 2 tasks x (nonprivate + 3 variants x 2 ε), 5 seeds
