"""End to end on a tiny model: run folder, results table, no retraining, crash resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpflat.privacy import DP, NOT_DP_NONPRIVATE
from dpflat.runs import RunDir, load_results
from dpflat.train import train
from tests.conftest import kill_training_at

REPO = Path(__file__).resolve().parents[1]


def test_dp_run_writes_everything_and_is_not_retrained(tiny_cfg):
    res = train(tiny_cfg)
    rd = RunDir(res["run_dir"])
    for f in ("config.json", "metrics.jsonl", "ledger.json", "model.safetensors", "result.json"):
        assert (rd.path / f).is_file(), f
    ledger = json.loads(rd.ledger_file.read_text())
    assert ledger["guarantee"] == DP and ledger["unaccounted_reads"] == 0
    assert 0 < ledger["epsilon"] <= tiny_cfg.privacy.epsilon
    assert ledger["steps"] == res["steps"] == 8  # 2 epochs x 128/32
    assert ledger["noise_multiplier"] > 0 and ledger["sample_rate"] == pytest.approx(0.25)
    assert {r["who"] for r in ledger["reads"]} == {"train/dp-sgd"}
    rows = [json.loads(x) for x in rd.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "eval_accuracy" in rows[3]
    table = load_results(tiny_cfg.train.output_dir)
    assert len(table) == 1 and table.iloc[0]["guarantee"] == DP
    mtime = rd.model_file.stat().st_mtime_ns
    t = time.time()
    again = train(tiny_cfg)  # finished: returned, not retrained
    assert time.time() - t < 5 and rd.model_file.stat().st_mtime_ns == mtime
    assert again["epsilon"] == res["epsilon"] and len(load_results(tiny_cfg.train.output_dir)) == 1


def test_nonprivate_run_claims_no_epsilon(tiny_cfg):
    cfg = tiny_cfg.replace(privacy={"enabled": False}, variant="nonprivate")
    res = train(cfg)
    assert res["guarantee"] == NOT_DP_NONPRIVATE and res["epsilon"] is None
    ledger = json.loads(Path(res["run_dir"], "ledger.json").read_text())
    assert ledger["claimed_epsilon"] is None and ledger["unaccounted_reads"] == 1


def test_resume_after_sigkill_gives_same_epsilon_and_one_row(tmp_path, make_cfg):
    over = {"train": {"epochs": 4, "checkpoint_every": 1}, "data": {"train_size": 256}}
    cfg = make_cfg(tmp_path / "killed", **over)
    ref_cfg = make_cfg(tmp_path / "clean", **over)
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    rd = RunDir.for_config(cfg)
    killed_at = kill_training_at(cfg_file, rd.path, 3)
    assert not rd.done, "the run must be unfinished after SIGKILL"
    assert 3 <= killed_at < 32
    res = train(cfg)  # resumes from the checkpoint
    ref = train(ref_cfg)  # never interrupted
    assert res["steps"] == ref["steps"] == 32
    assert res["epsilon"] == ref["epsilon"] and res["sigma"] == ref["sigma"]
    rows = [json.loads(x)["step"] for x in rd.metrics_file.read_text().splitlines()]
    assert rows == list(range(1, 33))  # no duplicated or missing steps in the log
    assert len(load_results(cfg.train.output_dir)) == 1


def test_a_resumed_dpflat_run_reports_what_its_setup_found(tmp_path, make_cfg):
    """The setup (kept layers, teacher) runs once, before the first checkpoint; a run resumed by a
    later process must still report it. It was lost (result.json held only ``info_precision``)."""
    from dpflat.config import apply_variant

    flat = {"layers_warmup_steps": 2, "layers_examples": 16, "n_drop": 1, "teacher_epochs": 0.5}
    cut = apply_variant(make_cfg(tmp_path / "cut"), "dpflat", "safe").replace(flat=flat)
    whole = apply_variant(make_cfg(tmp_path / "whole"), "dpflat", "safe").replace(flat=flat)
    seen: dict[str, list[str]] = {"cut": [], "resumed": [], "whole": []}
    part = train(cut, max_steps=2, on_phase=seen["cut"].append)
    assert not part.get("finished") and not RunDir(part["run_dir"]).done
    # a new call: the setup is not run again, its outcome comes from the checkpoint
    res = train(cut, on_phase=seen["resumed"].append)
    ref = train(whole, on_phase=seen["whole"].append)
    # the set-up phases the library names to its callback (a notebook's status line), in registry order
    assert seen["cut"] == seen["whole"] == ["data", "layers", "distill", "awp", "training"]
    assert seen["resumed"] == ["data", "training"]
    train(whole, on_phase=seen["whole"].append)  # finished: returned, no phase at all
    assert len(seen["whole"]) == 5
    keys = ("info_layers_keep", "info_layers_data", "info_teacher_accuracy", "info_teacher_steps")
    assert all(ref.get(k) is not None for k in keys), ref
    assert {k: res.get(k) for k in keys} == {k: ref.get(k) for k in keys}
    assert res["setup_s"] > 0


def test_a_resumed_run_reports_the_time_of_every_process(tiny_cfg):
    """A run finished by a second process reported that process's seconds only (a 2-hour study cell
    read 90 s): train_s and wall_s now add the earlier processes' time up to their last checkpoint."""
    cfg = tiny_cfg.replace(train={"checkpoint_every": 1})
    part = train(cfg, max_steps=2, on_step=lambda row: time.sleep(1.0))  # 2 slow steps, then "killed"
    assert not part.get("finished")
    res = train(cfg)  # the other 6 steps, fast
    assert res["processes"] == 2
    assert res["train_s"] >= 2.0 and res["wall_s"] >= res["train_s"]
    assert res["examples_per_s"] > 0  # this process's throughput, over its own train time


def test_a_run_trained_by_a_live_process_is_locked_and_a_stale_lock_is_taken_over(tiny_cfg):
    """Two notebooks or two sweeps must never write the same run folder at once."""
    import subprocess
    import sys

    from dpflat.runs import RunDir, RunLocked

    cfg = tiny_cfg.replace(train={"epochs": 1})
    rd = RunDir.for_config(cfg)
    rd.create(cfg)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (rd.path / ".lock").write_text(str(other.pid))
        with pytest.raises(RunLocked):
            train(cfg)
    finally:
        other.kill()
        other.wait()
    res = train(cfg)  # the holder is dead: its lock is stale
    assert res["finished"] and not (rd.path / ".lock").exists()
