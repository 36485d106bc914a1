"""Run folders and the results table: one locked writer, checkpoints kept two deep, no bare folders left."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dpflat.config import RunConfig
from dpflat.runs import (RESULTS, RunDir, RunFolderError, append_result, ensure_result, load_results,
                         update_result)


def _state(step):
    return {"step": step, "optimizer": {"state": {}}, "best": {"accuracy": 0.5, "step": step}}


def test_checkpoints_keep_the_last_two_and_drop_an_abandoned_trajectory(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    for step in (1, 2, 3):
        rd.save_checkpoint(step, {"w": torch.ones(2) * step}, _state(step))
    assert [c.name for c in rd.checkpoints()] == ["ckpt-0000002", "ckpt-0000003"]
    trainable, state = rd.latest_checkpoint()
    assert state["step"] == 3 and float(trainable["w"][0]) == 3
    rd.save_checkpoint(1, {"w": torch.ones(2)}, _state(1))  # --no-resume: a new trajectory from step 1
    assert [c.name for c in rd.checkpoints()] == ["ckpt-0000001"]


def test_nan_checkpoint_falls_back_and_says_which_file(tmp_path, capsys):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    rd.save_checkpoint(1, {"w": torch.ones(2)}, _state(1))
    rd.save_checkpoint(2, {"w": torch.tensor([1.0, float("nan")])}, _state(2))
    _, state = rd.latest_checkpoint()
    assert state["step"] == 1
    err = capsys.readouterr().err
    assert "ckpt-0000002/trainable.safetensors holds non-finite weights" in err


def test_nan_optimizer_state_is_refused(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    rd.save_checkpoint(1, {"w": torch.ones(2)}, {**_state(1), "optimizer": {"m": torch.tensor([float("inf")])}})
    with pytest.raises(RunFolderError, match="state.pt holds non-finite values"):
        rd.latest_checkpoint()


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    assert rd.latest_checkpoint() is None


def test_create_refuses_another_config_and_a_failure_leaves_no_bare_folder(tmp_path):
    cfg = RunConfig().replace(train={"output_dir": str(tmp_path), "run_name": "x"})
    rd = RunDir.for_config(cfg)
    assert rd.create(cfg) is True
    with pytest.raises(FileExistsError, match=r"privacy.epsilon: 8.0 there, 3.0 here"):
        rd.create(cfg.replace(privacy={"epsilon": 3.0}))
    assert rd.create(cfg.replace(train={"device": "cpu", "num_threads": 1})) is False  # where/how: same run
    with pytest.raises(RuntimeError):
        with rd.removed_on_failure(True):
            raise RuntimeError("boom")
    assert not rd.path.exists()


def test_removed_on_failure_keeps_a_folder_with_work_in_it(tmp_path):
    cfg = RunConfig().replace(train={"output_dir": str(tmp_path), "run_name": "x"})
    rd = RunDir.for_config(cfg)
    rd.create(cfg)
    rd.log({"step": 1})
    with pytest.raises(KeyboardInterrupt):
        with rd.removed_on_failure(True):
            raise KeyboardInterrupt
    assert rd.metrics_file.exists()


def test_ensure_result_writes_only_when_the_row_differs(tmp_path):
    row = {"run_id": "a", "accuracy": 0.5, "epsilon": None, "finished": True}
    append_result(tmp_path, row)
    before = (tmp_path / RESULTS).stat().st_mtime_ns
    ensure_result(tmp_path, dict(row))
    assert (tmp_path / RESULTS).stat().st_mtime_ns == before
    ensure_result(tmp_path, {**row, "accuracy": 0.6})
    assert load_results(tmp_path)["accuracy"].tolist() == [0.6]


def test_update_result_adds_columns_to_an_existing_row_only(tmp_path):
    assert update_result(tmp_path, "a", {"top_eigenvalue": 1.0}) is None  # no table
    append_result(tmp_path, {"run_id": "a", "accuracy": 0.5})
    append_result(tmp_path, {"run_id": "b", "accuracy": 0.7})
    row = update_result(tmp_path, "a", {"top_eigenvalue": 2.0})
    assert row["top_eigenvalue"] == 2.0 and row["accuracy"] == 0.5
    assert update_result(tmp_path, "zzz", {"top_eigenvalue": 2.0}) is None
    t = load_results(tmp_path).set_index("run_id")
    assert t.loc["a", "top_eigenvalue"] == 2.0 and pd.isna(t.loc["b", "top_eigenvalue"]) and len(t) == 2


def test_rebuild_skips_unreadable_result_files(tmp_path, capsys):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "result.json").write_text(json.dumps({"run_id": "good", "accuracy": 1.0, "info": {}}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text("{")
    (tmp_path / RESULTS).write_bytes(b"")
    assert load_results(tmp_path)["run_id"].tolist() == ["good"]
    assert "rebuilt it from the 1 run folders" in capsys.readouterr().err
