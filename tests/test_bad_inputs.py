"""Every bad input, fault and corruption: one clear line, the right exit status, nothing silently wrong.

A table of cases across ``train``, ``sweep``, ``landscape``, ``report``, ``audit`` and the
Python API. Each case runs in-process (``dpflat.cli.main``) on its own copy of one finished
tiny run, and asserts: the exit status, at most two stderr lines that name the input, no
traceback, and that no run folder or results row was left or changed wrongly.

``docs/BAD_INPUTS.md`` is generated from this table and the messages the cases printed:
``DPFLAT_WRITE_BAD_INPUTS_DOC=1 python -m pytest tests/test_bad_inputs.py`` rewrites it,
and ``test_doc_is_current`` fails when it is stale.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from dpflat.cli import main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BAD_INPUTS.md"
BASE = "base"  # the finished tiny run every case starts from (a copy of it)


def base_flags(out: Path, data: Path) -> list[str]:
    """A tiny-bert run on 64 SST-2 examples: 4 steps, a checkpoint every 2 (so two are kept)."""
    return ["--backbone", "tiny-bert", "--data-dir", str(data), "--train-size", "64", "--eval-size", "32",
            "--public-size", "32", "--max-length", "16", "--epochs", "1", "--batch-size", "16",
            "--physical-batch-size", "16", "--prefix-len", "2", "--prefix-init", "random", "--checkpoint-every", "2",
            "--no-progress", "--num-threads", "1", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_data) -> Path:
    """One finished tiny run (``runs/base``) and its results table, shared read-only by every case."""
    out = tmp_path_factory.mktemp("finished") / "runs"
    assert main(["train", *base_flags(out, shared_data), "--run-name", BASE]) == 0
    assert (out / BASE / "result.json").is_file() and (out / "results.parquet").is_file()
    return out


@dataclass
class Ctx:
    """One case's world: a private copy of the finished output folder."""

    tmp: Path
    out: Path
    data: Path
    mp: pytest.MonkeyPatch

    @property
    def run(self) -> Path:
        return self.out / BASE

    def flags(self, out: Path | None = None) -> list[str]:
        return base_flags(out or self.out, self.data)

    def train(self, *extra: str) -> list[str]:
        return ["train", *self.flags(), *extra]

    def sweep(self, *extra: str) -> list[str]:
        return ["sweep", *self.flags(), *extra]

    def cfg(self, **over):
        from dpflat.config import RunConfig

        cfg = RunConfig.load(self.run / "config.json").replace(train={"output_dir": str(self.out)})
        return cfg.replace(**over) if over else cfg

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def unfinish(self) -> None:
        """Turn the copy into an interrupted run: checkpoints left, no result or model."""
        for name in ("result.json", "model.safetensors", "last.safetensors", "ledger.json"):
            (self.run / name).unlink(missing_ok=True)


@dataclass
class Case:
    id: str
    what: str  # what is wrong, for the doc
    expect: str  # a piece of the message (or of the API error)
    argv: Callable[[Ctx], list[str]] | None = None  # a CLI case
    api: Callable[[Ctx], Any] | None = None  # a Python API case: must raise
    rc: int = 2
    table_may_change: bool = False  # a repair (rebuilt table) is the expected outcome
    new_folder_ok: bool = False  # a run that failed after real work keeps its folder (it resumes)
    needs_no_cuda: bool = False
    check: Callable[[Ctx], None] | None = None  # an extra assertion after the case


def js(obj: Any) -> str:
    return json.dumps(obj)


def _patch_run_file_writes(ctx: Ctx, write: Callable[..., None]) -> None:
    """Every atomic write of a run file (RunDir's and the checkpoints' LATEST) goes through ``write``."""
    from dpflat.runs import checkpoints, folder

    for mod in (folder, checkpoints):
        ctx.mp.setattr(mod, "atomic_write_text", write)


def _readonly(ctx: Ctx) -> None:
    """A read-only filesystem: every write of the results table or a run file fails with EROFS."""
    from dpflat.runs import table

    def refuse_table(output_dir, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(output_dir) / "results.parquet"))

    def refuse_file(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    ctx.mp.setattr(table, "modify_results", refuse_table)
    _patch_run_file_writes(ctx, refuse_file)


def _enospc_config(ctx: Ctx) -> None:
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    _patch_run_file_writes(ctx, full)


def _enospc_checkpoint(ctx: Ctx) -> None:
    """What a full disk looks like to torch.save: a RuntimeError, not an OSError."""
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    ctx.mp.setattr(torch, "save", full)
    ctx.mp.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))


def _enospc_best(ctx: Ctx) -> None:
    """What a full disk looks like to safetensors: its own SafetensorError, not an OSError."""
    import safetensors

    from dpflat.runs import folder

    real = folder.save_file

    def full(tensors, filename, *a, **k):
        if str(filename).endswith("best.safetensors.tmp"):
            Path(filename).write_bytes(b"partial")
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, filename, *a, **k)

    ctx.mp.setattr(folder, "save_file", full)
    ctx.mp.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))


def _enospc_latest(ctx: Ctx) -> None:
    """A full disk while the LATEST pointer is written: the error comes without a file name."""
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "LATEST.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    ctx.mp.setattr(Path, "write_text", full)


def _newer_config(ctx: Ctx) -> None:
    """The finished run's config.json as a newer dpflat writes it: one field this version does not know."""
    d = json.loads((ctx.run / "config.json").read_text())
    d["train"]["future_knob"] = 1
    (ctx.run / "config.json").write_text(json.dumps(d))


def _no_leftovers(name: str) -> Callable[[Ctx], None]:
    """A refused run into a new --output-dir leaves not even that folder (nor its parent) behind."""

    def check(ctx: Ctx) -> None:
        assert not (ctx.tmp / name).exists(), sorted(p.name for p in (ctx.tmp / name).rglob("*"))

    return check


def _no_tmp_files(ctx: Ctx) -> None:
    left = [p.name for p in ctx.out.rglob("*.tmp")]
    assert not left, left


def _frozen(ctx: Ctx, section: str, name: str, value: Any) -> None:
    setattr(getattr(ctx.cfg(), section), name, value)


def _truncate(p: Path, keep: int = 40) -> None:
    p.write_bytes(p.read_bytes()[:keep])


def _table_has_base(ctx: Ctx) -> None:
    import pandas as pd

    t = pd.read_parquet(ctx.out / "results.parquet")
    assert list(t["run_id"]) == [BASE]


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


def _api_train(ctx: Ctx, cfg, **kw):
    from dpflat.train import train

    return train(cfg, **kw)


def _api_sweep(ctx: Ctx, *args, **kw):
    from dpflat.sweep import sweep

    return sweep(ctx.cfg(), *args, progress=False, **kw)


def _setup_then(setup: Callable[[Ctx], Any], argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def run(ctx: Ctx) -> list[str]:
        setup(ctx)
        return argv(ctx)

    return run


def _latest_missing(ctx: Ctx) -> None:
    ctx.unfinish()
    for ck in ctx.run.glob("ckpt-*"):
        shutil.rmtree(ck)
    (ctx.run / "LATEST").write_text("ckpt-0000099")


def _other_config_folder(ctx: Ctx) -> None:
    """An unfinished run folder holding another config under the name 'other'."""
    (ctx.out / "other").mkdir()
    (ctx.out / "other" / "config.json").write_text(json.dumps(ctx.cfg(privacy={"epsilon": 1.0}).to_dict()))


CASES: list[Case] = [
    # ------------------------------------------------------------------ --config files
    Case("config_misspelt_section", "a misspelt section in --config", "unknown config section 'privac': did you mean 'privacy'?",
         lambda c: c.train("--config", str(c.write("c.json", js({"privac": {"epsilon": 3}}))))),
    Case("config_unknown_field", "an unknown field in --config", "unknown train field 'btch_size': did you mean 'batch_size'?",
         lambda c: c.train("--config", str(c.write("c.json", js({"train": {"btch_size": 3}}))))),
    Case("config_bool_as_string", '"enabled": "no" in --config', "privacy.enabled must be true or false, got 'no'",
         lambda c: c.train("--config", str(c.write("c.json", js({"privacy": {"enabled": "no"}}))))),
    Case("config_int_as_string", '"batch_size": "64" in --config', "train.batch_size must be a whole number, got '64'",
         lambda c: c.train("--config", str(c.write("c.json", js({"train": {"batch_size": "64"}}))))),
    Case("config_int_as_fraction", '"batch_size": 64.7 in --config', "train.batch_size must be a whole number, got 64.7",
         lambda c: c.train("--config", str(c.write("c.json", js({"train": {"batch_size": 64.7}}))))),
    Case("config_literal", "a Literal field out of its choices", "flat.awp_mode must be one of safe|paper, got 'sometimes'",
         lambda c: c.train("--config", str(c.write("c.json", js({"flat": {"awp_mode": "sometimes"}}))))),
    Case("config_optional_wrong_type", "an optional float given as text", "privacy.delta must be a finite number or null",
         lambda c: c.train("--config", str(c.write("c.json", js({"privacy": {"delta": "small"}}))))),
    Case("config_nan", "NaN for a float", "train.lr must be a finite number, got nan",
         lambda c: c.train("--config", str(c.write("c.json", '{"train": {"lr": NaN}}')))),
    Case("config_section_scalar", "a section that is not an object", "config section privacy must be an object",
         lambda c: c.train("--config", str(c.write("c.json", js({"privacy": 3}))))),
    Case("config_list", "a list-shaped --config", "must be a JSON object",
         lambda c: c.train("--config", str(c.write("c.json", js([1, 2]))))),
    Case("config_malformed", "malformed JSON", "is not valid JSON: Expecting property name",
         lambda c: c.train("--config", str(c.write("c.json", "{not json")))),
    Case("config_empty", "an empty --config file", "is not valid JSON",
         lambda c: c.train("--config", str(c.write("c.json", "")))),
    Case("config_not_utf8", "a binary --config", "is not UTF-8 text",
         lambda c: c.train("--config", str(c.write("c.json", b"\xff\xfe\x00\x81garbage")))),
    Case("config_directory", "--config naming a folder", "is a folder, not a JSON config file",
         lambda c: c.train("--config", str(c.tmp))),
    Case("config_missing", "--config naming no file", "does not exist",
         lambda c: c.train("--config", str(c.tmp / "nope.json"))),
    Case("config_variant_type", '"variant": 3', "variant must be a name, got 3",
         lambda c: c.train("--config", str(c.write("c.json", js({"variant": 3}))))),
    Case("config_variant_label", '"variant": "dpflat" over a plain DP config (it was only a label)',
         "variant 'dpflat' does not describe this config (its levels make it dp)",
         lambda c: c.train("--config", str(c.write("c.json", js({"variant": "dpflat"}))))),
    Case("config_variant_unknown", '"variant": "nope"', "unknown variant 'nope'",
         lambda c: c.train("--config", str(c.write("c.json", js({"variant": "nope"}))))),
    Case("variant_flag_mismatch", "--variant dp with --awp (filed as dp, trained with AWP)",
         "variant 'dp' does not describe this config (its levels make it dp+awp-safe)",
         lambda c: c.train("--variant", "dp", "--awp")),
    # ------------------------------------------------------------------ train flags
    Case("lr_huge", "--lr 1e30 (diverges to NaN)", "lr must be <= 100, got 1e+30", lambda c: c.train("--lr", "1e30")),
    Case("lr_nan", "--lr nan", "train.lr must be a finite number, got nan", lambda c: c.train("--lr", "nan")),
    Case("lr_zero", "--lr 0", "lr must be > 0, got 0.0", lambda c: c.train("--lr", "0")),
    Case("max_steps_negative", "--max-steps -3", "argument --max-steps: must be a whole number >= 1, got '-3'",
         lambda c: c.train("--max-steps", "-3")),
    Case("max_steps_zero", "--max-steps 0", "argument --max-steps: must be a whole number >= 1, got '0'",
         lambda c: c.train("--max-steps", "0")),
    Case("batch_size_fraction_flag", "--batch-size 64.7", "argument --batch-size: invalid int value: '64.7'",
         lambda c: c.train("--batch-size", "64.7")),
    Case("batch_size_zero", "--batch-size 0", "batch_size must be >= 1, got 0", lambda c: c.train("--batch-size", "0")),
    Case("num_threads_negative", "--num-threads -2", "num_threads must be >= 1, got -2",
         lambda c: c.train("--num-threads", "-2")),
    Case("epochs_negative", "--epochs -1", "epochs must be > 0, got -1.0", lambda c: c.train("--epochs", "-1")),
    Case("epsilon_inf", "--epsilon inf", "privacy.epsilon must be a finite number, got inf",
         lambda c: c.train("--epsilon", "inf")),
    Case("epsilon_tiny", "--epsilon 1e-4 (the σ search stopped at an ε < 0 and claimed it)",
         "cannot reach ε=0.0001 with q=0.25, 4 steps", lambda c: c.train("--epsilon", "1e-4", "--run-name", "fresh")),
    Case("epsilon_huge", "--epsilon 1e9 (printed Opacus' two-line warning and trained)",
         "cannot reach ε=1e+09 with q=0.25, 4 steps", lambda c: c.train("--epsilon", "1e9", "--run-name", "fresh")),
    Case("train_size_one", "--train-size 1 (the default δ = 1/N^1.1 was 1, labelled DP)",
         "DP needs at least 2 private examples, got N = 1",
         lambda c: c.train("--train-size", "1", "--batch-size", "1", "--run-name", "fresh")),
    Case("blackbox_sharpness", "--blackbox --sharpness-every 2 (was silently a no-op)",
         "the sharpness trajectory (--sharpness-every) needs white-box access",
         lambda c: c.train("--blackbox", "--sharpness-every", "2")),
    Case("refused_new_output_dir", "a refused run into an --output-dir that did not exist (it was left behind)",
         "cannot reach ε=0.0001", check=_no_leftovers("new"),
         argv=lambda c: ["train", *c.flags(c.tmp / "new" / "runs"), "--epsilon", "1e-4"]),
    Case("device_mps", "--device mps on a machine without MPS", "MPS is not available on this machine",
         lambda c: c.train("--device", "mps")),
    Case("device_cudafoo", "--device cudafoo", "device must be cpu, cuda[:N] or mps, got cudafoo",
         lambda c: c.train("--device", "cudafoo")),
    Case("device_cuda_absent", "--device cuda without CUDA", "CUDA is not available on this machine",
         lambda c: c.train("--device", "cuda"), needs_no_cuda=True),
    Case("keep_layers_empty", "--keep-layers ,", "keep_layers must name at least one layer",
         lambda c: c.train("--keep-layers", ",")),
    Case("keep_layers_text", "--keep-layers a,b", "keep_layers must be comma-separated layer numbers",
         lambda c: c.train("--keep-layers", "a,b")),
    Case("keep_layers_out_of_range", "--keep-layers 0,7 on a 3-layer backbone", "keep_layers [7] out of range: the backbone has 3 layers",
         lambda c: c.train("--keep-layers", "0,7")),
    Case("n_drop_all_layers", "--n-drop 3 on a 3-layer backbone (checked before any loading)", "n_drop=3 would remove every prefix",
         lambda c: c.train("--variant", "dp+layers", "--n-drop", "3")),
    Case("n_drop_vs_keep_layers", "--n-drop 2 with --keep-layers 0,1", "n_drop=2 would remove every prefix: 2 of the backbone's 3",
         lambda c: c.train("--layers", "--keep-layers", "0,1", "--n-drop", "2")),
    Case("awp_mode_choice", "--awp-mode sometimes", "argument --awp-mode: invalid choice: 'sometimes'",
         lambda c: c.train("--awp-mode", "sometimes")),
    Case("unknown_flag", "a misspelt flag", "unrecognized arguments: --epsilonn", lambda c: c.train("--epsilonn", "3")),
    Case("unknown_task", "--task nope (the folder made for it is removed)", "unknown task 'nope'",
         lambda c: c.train("--task", "nope")),
    # ------------------------------------------------------------------ run names and folders
    Case("run_name_traversal", "--run-name ../../x", "run_name must be a folder name, not a path",
         lambda c: c.train("--run-name", "../../x")),
    Case("run_name_dot", "--run-name .", "run_name must not be . or ..", lambda c: c.train("--run-name", ".")),
    Case("run_name_dotdot", "--run-name ..", "run_name must not be . or ..", lambda c: c.train("--run-name", "..")),
    Case("run_name_too_long", "--run-name of 300 characters", "run_name is 300 bytes long; the limit is 200",
         lambda c: c.train("--run-name", "x" * 300)),
    Case("run_name_results_table", "--run-name results.parquet", "run_name 'results.parquet' is reserved",
         lambda c: c.train("--run-name", "results.parquet")),
    Case("run_name_empty", "--run-name ''", "run_name must be a non-empty name", lambda c: c.train("--run-name", "")),
    Case("output_dir_is_file", "--output-dir naming a file", "is a file, not a folder: choose another --output-dir",
         lambda c: ["train", *c.flags(c.write("f", "x")), "--max-steps", "1"]),
    Case("output_dir_under_file", "--output-dir under a file", "a file is in the way; choose another --output-dir",
         lambda c: ["train", *c.flags(c.write("f", "x") / "sub"), "--max-steps", "1"]),
    Case("output_dir_read_only", "an output folder on a read-only filesystem", "Read-only file system; choose a writable --output-dir",
         _setup_then(_readonly, lambda c: c.train("--run-name", "fresh"))),
    Case("disk_full_config", "disk full when the run's config is written", "no space left on the device writing",
         _setup_then(_enospc_config, lambda c: c.train("--run-name", "fresh"))),
    Case("disk_full_best", "disk full while best.safetensors is written (a SafetensorError, exit 1)",
         "/runs/fresh/best.safetensors: free some space", new_folder_ok=True, check=_no_tmp_files,
         argv=_setup_then(_enospc_best, lambda c: c.train("--run-name", "fresh"))),
    Case("disk_full_latest", "disk full while the LATEST pointer is written (the message named no file)",
         "/runs/fresh/LATEST: free some space", new_folder_ok=True, check=_no_tmp_files,
         argv=_setup_then(_enospc_latest, lambda c: c.train("--run-name", "fresh"))),
    Case("disk_full_checkpoint", "disk full at the first checkpoint (torch.save: 'unexpected pos')",
         "no space left on the device writing", new_folder_ok=True,
         argv=_setup_then(_enospc_checkpoint, lambda c: c.train("--run-name", "fresh", "--checkpoint-every", "1",
                                                                 "--max-steps", "1"))),
    # ------------------------------------------------------------------ finished runs and their files
    Case("same_name_other_config", "the same --run-name with another ε on a finished run",
         "holds a run with a different config (privacy.epsilon: 8.0 there, 3.0 here)",
         lambda c: c.train("--run-name", BASE, "--epsilon", "3")),
    Case("same_name_other_config_no_resume", "the same, with --no-resume", "holds a run with a different config",
         lambda c: c.train("--run-name", BASE, "--epsilon", "3", "--no-resume")),
    Case("same_name_other_config_unfinished", "an unfinished folder with another config",
         "holds a run with a different config (privacy.epsilon: 1.0 there, 8.0 here)",
         _setup_then(_other_config_folder, lambda c: c.train("--run-name", "other"))),
    Case("finished_rerun_read_only", "a finished run re-run on a read-only filesystem: its stored row, nothing written",
         "", rc=0, argv=_setup_then(_readonly, lambda c: c.train("--run-name", BASE))),
    Case("run_config_newer", "the run folder's config.json has a field this version does not know (was 'corrupt')",
         "config.json was written by a newer dpflat (train.future_knob is unknown to this version)",
         _setup_then(_newer_config, lambda c: c.train("--run-name", BASE))),
    Case("run_config_corrupt", "the run folder's config.json is corrupt", "'s config.json is corrupt",
         _setup_then(lambda c: (c.run / "config.json").write_text("{garbage"), lambda c: c.train("--run-name", BASE))),
    Case("model_deleted_train", "a finished run whose model.safetensors was deleted (train)",
         "is finished but its model.safetensors is missing: retrain it with",
         _setup_then(lambda c: (c.run / "model.safetensors").unlink(), lambda c: c.train("--run-name", BASE))),
    Case("result_json_corrupt", "result.json is corrupt", "result.json is corrupt",
         _setup_then(lambda c: _truncate(c.run / "result.json", 10), lambda c: c.train("--run-name", BASE))),
    Case("results_table_truncated", "a truncated results.parquet: rebuilt from the run folders, said in one line",
         "rebuilt it from the 1 run folders' result.json", rc=0, table_may_change=True, check=_table_has_base,
         argv=_setup_then(lambda c: _truncate(c.out / "results.parquet"), lambda c: c.train("--run-name", BASE))),
    Case("latest_points_nowhere", "LATEST names a checkpoint that is missing, none earlier",
         "points to ckpt-0000099, which is missing, and no earlier checkpoint is left",
         _setup_then(_latest_missing, lambda c: c.train("--run-name", BASE))),
    # ------------------------------------------------------------------ sweep
    Case("sweep_variants_empty", "sweep --variants ,", "a sweep needs at least one variant (--variants)",
         lambda c: c.sweep("--variants", ",")),
    Case("sweep_epsilons_empty", "sweep --epsilons ''", "a sweep needs at least one epsilon (--epsilons)",
         lambda c: c.sweep("--variants", "dp", "--epsilons", "")),
    Case("sweep_seeds_empty", "sweep --seeds ,", "a sweep needs at least one seed (--seeds)",
         lambda c: c.sweep("--variants", "dp", "--seeds", ",")),
    Case("sweep_epsilons_text", "sweep --epsilons a,b", "--epsilons and --seeds take comma-separated numbers",
         lambda c: c.sweep("--epsilons", "a,b")),
    Case("sweep_unknown_variant", "sweep --variants dp,foo", "unknown variant 'foo'", lambda c: c.sweep("--variants", "dp,foo")),
    Case("sweep_unknown_mode", "sweep --modes sometimes", "unknown mode 'sometimes'",
         lambda c: c.sweep("--variants", "dpflat", "--modes", "sometimes")),
    Case("sweep_run_name", "sweep --run-name X over several cells", "--run-name names one run folder, but this sweep has 3 cells",
         lambda c: c.sweep("--variants", "nonprivate,dp", "--run-name", "x")),
    Case("sweep_n_drop", "sweep with --n-drop 3 on a 3-layer backbone", "n_drop=3 would remove every prefix",
         lambda c: c.sweep("--variants", "dp,dpflat", "--n-drop", "3")),
    Case("sweep_device", "sweep --device cudafoo", "device must be cpu, cuda[:N] or mps",
         lambda c: c.sweep("--device", "cudafoo")),
    Case("sweep_config_misspelt", "sweep --config with a misspelt section", "unknown config section 'trian'",
         lambda c: c.sweep("--config", str(c.write("c.json", js({"trian": {}}))))),
    Case("sweep_seed_negative", "sweep --seeds -1 (drew a progress bar before its error)",
         "seed must be a whole number >= 0, got -1", lambda c: c.sweep("--variants", "dp", "--seeds", "-1")),
    Case("sweep_refused_new_output_dir", "a refused sweep into an --output-dir that did not exist",
         "cannot reach ε=0.0001", check=_no_leftovers("new"),
         argv=lambda c: ["sweep", *c.flags(c.tmp / "new" / "runs"), "--variants", "dp", "--epsilons", "1e-4"]),
    Case("sweep_no_progress", "sweep --no-progress (still drew the sweep's bar): trains the cell, prints no bar",
         "", rc=0, table_may_change=True, new_folder_ok=True, argv=lambda c: c.sweep("--variants", "dp", "--epsilons", "8")),
    # ------------------------------------------------------------------ landscape
    Case("landscape_model_deleted", "landscape of a finished run whose model.safetensors was deleted",
         "is finished but its model.safetensors is missing: retrain it with",
         _setup_then(lambda c: (c.run / "model.safetensors").unlink(), lambda c: ["landscape", str(c.run)])),
    Case("landscape_model_truncated", "landscape with a truncated model.safetensors", "model.safetensors is corrupt",
         _setup_then(lambda c: _truncate(c.run / "model.safetensors"), lambda c: ["landscape", str(c.run)])),
    Case("landscape_not_a_run", "landscape of a folder that is not a run", "is not a run folder (no config.json)",
         lambda c: ["landscape", str(c.tmp)]),
    Case("landscape_missing", "landscape of a path that does not exist", "is not a run folder",
         lambda c: ["landscape", str(c.tmp / "nope")]),
    Case("landscape_unfinished", "landscape of an unfinished run", "is not finished: train it first",
         _setup_then(lambda c: c.unfinish(), lambda c: ["landscape", str(c.run)])),
    Case("landscape_config_corrupt", "landscape of a run whose config.json is corrupt", "'s config.json is corrupt",
         _setup_then(lambda c: (c.run / "config.json").write_text("[]"), lambda c: ["landscape", str(c.run)])),
    Case("landscape_grid", "landscape --grid 2", "argument --grid: must be a whole number in [3, 201], got '2'",
         lambda c: ["landscape", str(c.run), "--grid", "2"]),
    Case("landscape_grid_huge", "landscape --grid 100000 (died with MemoryError)",
         "argument --grid: must be a whole number in [3, 201], got '100000'",
         lambda c: ["landscape", str(c.run), "--grid", "100000"]),
    Case("landscape_config_newer", "landscape of a run whose config.json a newer dpflat wrote",
         "config.json was written by a newer dpflat", _setup_then(_newer_config, lambda c: ["landscape", str(c.run)])),
    # ------------------------------------------------------------------ report
    Case("report_table_truncated", "report over a truncated results.parquet: rebuilt, said in one line",
         "rebuilt it from the 1 run folders' result.json", rc=0, table_may_change=True, check=_table_has_base,
         argv=_setup_then(lambda c: _truncate(c.out / "results.parquet"), lambda c: ["report", str(c.out)])),
    Case("report_missing_folder", "report of a folder without runs", "no results table in",
         lambda c: ["report", str(c.tmp / "nope")]),
    # ------------------------------------------------------------------ audit
    Case("audit_device_cuda", "audit --device cuda without CUDA", "CUDA is not available on this machine",
         lambda c: ["audit", str(c.run), "--device", "cuda"], needs_no_cuda=True),
    Case("audit_device_mps", "audit --device mps", "MPS is not available", lambda c: ["audit", str(c.run), "--device", "mps"]),
    Case("audit_not_a_run", "audit of a folder that is not a run", "is not a run folder (no config.json)",
         lambda c: ["audit", str(c.tmp)]),
    Case("audit_unfinished", "audit of an unfinished run", "is not finished: train it first",
         _setup_then(lambda c: c.unfinish(), lambda c: ["audit", str(c.run)])),
    Case("audit_model_truncated", "audit with a truncated model.safetensors", "model.safetensors is corrupt",
         _setup_then(lambda c: _truncate(c.run / "model.safetensors"), lambda c: ["audit", str(c.run)])),
    Case("audit_model_deleted", "audit of a finished run whose model.safetensors was deleted",
         "is finished but its model.safetensors is missing: retrain it with",
         _setup_then(lambda c: (c.run / "model.safetensors").unlink(), lambda c: ["audit", str(c.run)])),
    Case("audit_bootstrap_zero", "audit --bootstrap 0", "argument --bootstrap: must be a whole number >= 1",
         lambda c: ["audit", str(c.run), "--bootstrap", "0"]),
    # ------------------------------------------------------------------ the command line itself
    Case("no_command", "no command", "the following arguments are required: COMMAND", lambda c: []),
    Case("unknown_command", "a misspelt command", "argument COMMAND: invalid choice: 'trian'", lambda c: ["trian"]),
    # ------------------------------------------------------------------ the Python API
    Case("api_from_dict_misspelt", "RunConfig.from_dict({'privac': ...})", "unknown config section 'privac'",
         api=lambda c: __import__("dpflat.config").config.RunConfig.from_dict({"privac": {"epsilon": 3}})),
    Case("api_typed_constructor", "TrainConfig(batch_size='64')", "train.batch_size must be a whole number, got '64'",
         api=lambda c: __import__("dpflat.config").config.TrainConfig(batch_size="64")),
    Case("api_bool_as_int", "PrivacyConfig(enabled=1)", "privacy.enabled must be true or false, got 1",
         api=lambda c: __import__("dpflat.config").config.PrivacyConfig(enabled=1)),
    Case("api_run_name_path", "TrainConfig(run_name='a/b')", "run_name must be a folder name, not a path",
         api=lambda c: __import__("dpflat.config").config.TrainConfig(run_name="a/b")),
    Case("api_train_max_steps", "train(cfg, max_steps=-3)", "max_steps must be a whole number >= 1, got -3",
         api=lambda c: _api_train(c, c.cfg(train={"run_name": "fresh"}), max_steps=-3)),
    Case("api_train_finished_other_config", "train() on a finished run name with another ε",
         "holds a run with a different config", api=lambda c: _api_train(c, c.cfg(privacy={"epsilon": 3.0}))),
    Case("api_sweep_empty_variants", "sweep(cfg, [], ...)", "a sweep needs at least one variant",
         api=lambda c: _api_sweep(c, [], [3.0], [0])),
    Case("api_sweep_run_name", "sweep() of several cells under one run_name", "--run-name names one run folder",
         api=lambda c: _api_sweep(c, ["dp"], [3.0, 8.0], [0])),
    Case("api_frozen_epsilon", "cfg.privacy.epsilon = nan after validation (trained with σ = 10)",
         "a validated config cannot be changed (privacy.epsilon)",
         api=lambda c: _frozen(c, "privacy", "epsilon", float("nan"))),
    Case("api_frozen_batch_size", "cfg.train.batch_size = -5 after validation (reached torch)",
         "a validated config cannot be changed (train.batch_size)", api=lambda c: _frozen(c, "train", "batch_size", -5)),
    Case("api_train_dict", "train({...}) with a dict (AttributeError): read as a config, checked by name",
         "privacy.epsilon must be a finite number, got 'x'", api=lambda c: _api_train(c, {"privacy": {"epsilon": "x"}})),
    Case("api_train_not_a_config", "train('config.json')", "a run needs a RunConfig (or its dict form), got a str",
         api=lambda c: _api_train(c, "config.json")),
    Case("api_epsilon_for_q", "epsilon_for with q > 1 ('math domain error')", "sample rate q must be in (0, 1], got 1.5",
         api=lambda c: __import__("dpflat.engine").engine.epsilon_for("rdp", 1.5, 1.0, 10, 1e-5)),
    Case("api_load_results_missing", "load_results of a path that does not exist (was an empty table)",
         "no results table in", api=lambda c: __import__("dpflat.runs").runs.load_results(c.tmp / "nope")),
]


def _snapshot(out: Path) -> dict[str, Any]:
    """Run folders (and their files) and the results table's bytes: what a failed case must not change."""
    if not out.exists():
        return {}
    snap: dict[str, Any] = {}
    for p in sorted(out.iterdir()):
        if p.name.startswith("results.parquet"):
            snap[p.name] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        elif p.is_dir():
            snap[p.name] = sorted(q.name for q in p.iterdir())
    return snap


MESSAGES: dict[str, tuple[int, str]] = {}


def _normalise(text: str, ctx: Ctx) -> str:
    return text.replace(str(ctx.tmp), "<tmp>").replace(str(ctx.data), "<data>")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, finished: Path, shared_data: Path, tmp_path: Path, monkeypatch, capsys):
    if case.needs_no_cuda and not _no_cuda():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "runs"
    shutil.copytree(finished, out)
    ctx = Ctx(tmp_path, out, shared_data, monkeypatch)
    if case.api is not None:
        before = _snapshot(out)
        with pytest.raises(Exception) as info:
            case.api(ctx)
        msg = str(info.value)
        assert msg.count("\n") == 0 and case.expect in msg, msg
        assert isinstance(info.value, (ValueError, OSError)), type(info.value)
        rc, err = 2, msg
    else:
        argv = case.argv(ctx)
        before = _snapshot(out)
        rc = main(argv)
        monkeypatch.undo()
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert rc == case.rc, (rc, err)
        assert "Traceback" not in captured.err and "Traceback" not in captured.out
        lines = err.splitlines()
        if case.rc == 0:
            assert len(lines) <= 1, err
        else:
            assert 1 <= len(lines) <= 2 and "error:" in lines[-1], err
        assert case.expect in err, err
    after = _snapshot(out)
    if not case.table_may_change:
        assert after.get("results.parquet") == before.get("results.parquet"), "the results table changed"
    new = set(after) - set(before) - {"results.parquet.lock"}
    if not case.new_folder_ok:
        assert not new, f"left behind: {new}"
    for name in set(before) & set(after) - {"results.parquet", "results.parquet.lock"}:
        assert before[name] == after[name], f"{name} changed: {before[name]} -> {after[name]}"
    if case.check:
        case.check(ctx)
    MESSAGES[case.id] = (rc, _normalise(err, ctx))


def test_enough_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 60


# --------------------------------------------------------------------------- faults in checkpoints
def _copy_unfinished(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    shutil.copytree(finished, out)
    for name in ("result.json", "model.safetensors", "last.safetensors", "ledger.json"):
        (out / BASE / name).unlink(missing_ok=True)
    return out


def _nan_weights(f: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(f))
    save_file({k: torch.full_like(v, math.nan) for k, v in t.items()}, str(f))


@pytest.mark.parametrize("fault", ["truncated_trainable", "nan_trainable", "garbage_state"])
def test_corrupt_checkpoint_is_named_and_the_previous_one_used(fault, finished, shared_data, tmp_path, capsys):
    out = _copy_unfinished(finished, tmp_path)
    run = out / BASE
    assert [p.name for p in sorted(run.glob("ckpt-*"))] == ["ckpt-0000002", "ckpt-0000004"]  # the last two kept
    assert (run / "LATEST").read_text().strip() == "ckpt-0000004"
    bad = run / "ckpt-0000004" / ("state.pt" if fault == "garbage_state" else "trainable.safetensors")
    {"truncated_trainable": _truncate, "nan_trainable": _nan_weights,
     "garbage_state": lambda f: f.write_bytes(b"\x80\x04garbage")}[fault](bad)
    assert main(["train", *base_flags(out, shared_data), "--run-name", BASE]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{bad}" in err and "resuming from the previous checkpoint" in err, err
    res = json.loads((run / "result.json").read_text())
    assert res["steps"] == 4 and res["finished"]
    assert all(math.isfinite(v) for v in (res["accuracy"], res["eval_loss"]))
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(run / "model.safetensors")).values())


def test_every_checkpoint_corrupt_is_one_line_and_no_silent_restart(finished, shared_data, tmp_path, capsys):
    out = _copy_unfinished(finished, tmp_path)
    for ck in (out / BASE).glob("ckpt-*"):
        _truncate(ck / "trainable.safetensors")
    assert main(["train", *base_flags(out, shared_data), "--run-name", BASE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no earlier good checkpoint is left" in err[-1] and "--no-resume" in err[-1], err
    assert not (out / BASE / "result.json").exists()


def test_latest_missing_falls_back_to_an_earlier_checkpoint(finished, shared_data, tmp_path, capsys):
    out = _copy_unfinished(finished, tmp_path)
    shutil.rmtree(out / BASE / "ckpt-0000004")
    assert main(["train", *base_flags(out, shared_data), "--run-name", BASE]) == 0
    err = capsys.readouterr().err
    assert "points to ckpt-0000004, which is missing; resuming from ckpt-0000002" in err, err
    assert json.loads((out / BASE / "result.json").read_text())["steps"] == 4


# --------------------------------------------------------------------------- the results table
def _append_rows(out: str, who: int, n: int) -> None:
    from dpflat.runs import append_result

    for i in range(n):
        append_result(out, {"run_id": f"p{who}-{i}", "accuracy": float(i), "variant": "dp", "seed": who})


def test_three_processes_appending_concurrently_lose_no_row(tmp_path):
    import pandas as pd

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(str(tmp_path), w, 8)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    t = pd.read_parquet(tmp_path / "results.parquet")
    assert sorted(t["run_id"]) == sorted(f"p{w}-{i}" for w in range(3) for i in range(8))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_corrupt_table_is_rebuilt_from_run_folders(tmp_path, capsys):
    from dpflat.runs import append_result, load_results

    for name, acc in (("a", 0.5), ("b", 0.75)):
        (tmp_path / name).mkdir()
        row = {"run_id": name, "accuracy": acc, "variant": "dp", "finished": True}
        (tmp_path / name / "result.json").write_text(json.dumps({**row, "info": {"x": 1}}))
        append_result(tmp_path, row)
    (tmp_path / "results.parquet").write_bytes(b"PAR1 this is not a parquet file")
    t = load_results(tmp_path)
    assert sorted(t["run_id"]) == ["a", "b"] and dict(zip(t["run_id"], t["accuracy"])) == {"a": 0.5, "b": 0.75}
    assert "rebuilt it from the 2 run folders' result.json" in capsys.readouterr().err
    assert len(load_results(tmp_path)) == 2  # written back: reads cleanly now


def test_rerunning_a_finished_run_does_not_rewrite_the_table(finished, shared_data, tmp_path, capsys):
    out = tmp_path / "runs"
    shutil.copytree(finished, out)
    before = (out / "results.parquet").stat().st_mtime_ns, (out / "results.parquet").read_bytes()
    time.sleep(0.01)
    assert main(["train", *base_flags(out, shared_data), "--run-name", BASE]) == 0
    assert ((out / "results.parquet").stat().st_mtime_ns, (out / "results.parquet").read_bytes()) == before


# --------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_imports_exits_130_without_traceback(tmp_path):
    """SIGINT while ``python -m dpflat`` imports torch: exit 130 and one line, no traceback.

    The signal is sent once ``-X importtime`` shows ``dpflat.cli`` imported (from there on the
    command imports numpy, pandas, datasets and transformers for about a second, under the CLI's
    own handler), not after a fixed sleep: on a loaded machine a sleep can fire before Python has
    installed its SIGINT handler (the child then dies with -2).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "dpflat", "tasks"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:  # import-time lines arrive as each module finishes importing
        seen.append(line)
        if re.search(r"\|\s+dpflat\.cli$", line.rstrip()):
            p.send_signal(signal.SIGINT)
            break
    out, rest = p.communicate(timeout=120)
    err = "".join(line for line in seen[-1:] + rest.splitlines(keepends=True) if not line.startswith("import time:"))
    if p.returncode == 0:
        pytest.skip("the command finished before the signal (a very fast machine)")
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("dpflat: interrupted"), err


def test_sigterm_during_training_exits_143_with_one_line_and_resumes(tmp_path, shared_data):
    """SIGTERM (``kill``, a scheduler's time limit) exited 143 with no message; now it unwinds like
    Ctrl-C: the lock is released, one line says what to do, and the same command resumes."""
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "dpflat", "train", *base_flags(out, shared_data), "--run-name", "term",
            "--epochs", "50", "--checkpoint-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((out / "term").glob("ckpt-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)  # training has begun: the step-0 checkpoint is written before the first step
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("dpflat: terminated (SIGTERM); run the same command"), err
    assert not (out / "term" / ".lock").exists()
    step = int((out / "term" / "LATEST").read_text().strip().removeprefix("ckpt-"))
    rc = main(["train", *base_flags(out, shared_data), "--run-name", "term", "--epochs", "50", "--checkpoint-every",
               "1", "--max-steps", str(step + 1)])  # the same command resumes (and stops one step later)
    assert rc == 0 and json.loads((out / "term" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "train", "--epsilon", "-3", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "dpflat: error: epsilon must be > 0, got -3.0"


# --------------------------------------------------------------------------- docs/BAD_INPUTS.md
def render_doc() -> str:
    lines = ["# Bad inputs, faults and corruptions", "",
             "Generated by `tests/test_bad_inputs.py` from its table of cases and the messages they printed",
             "(`DPFLAT_WRITE_BAD_INPUTS_DOC=1 python -m pytest tests/test_bad_inputs.py` rewrites it; a test",
             "fails when it is stale). Each case runs on a copy of one finished tiny run; `<tmp>` is that copy's",
             "folder. Every case also checks: no traceback, at most two lines, and no run folder or results row",
             "left or changed wrongly. Exit status 2 is a bad input, 0 a repaired fault.", "",
             "| case | what is wrong | exit | message |", "|---|---|---|---|"]
    for c in CASES:
        rc, msg = MESSAGES[c.id]
        msg = msg.replace("|", "\\|").replace("\n", " <br> ") or "(no message: the command's output is printed)"
        lines.append(f"| `{c.id}` | {c.what.replace('|', chr(92) + '|')} | {rc} | {msg} |")
    lines += ["", "Also covered by their own tests: a truncated, NaN or garbage checkpoint is named and the previous",
              "one used; every checkpoint corrupt is one line with `--no-resume` advice; `LATEST` pointing to a",
              "missing checkpoint falls back to the earlier one; three processes appending to one results table",
              "lose no row; a corrupt table is rebuilt from the run folders; re-running a finished run does not",
              "rewrite the table; Ctrl-C during the imports exits 130 without a traceback; SIGTERM during training",
              "exits 143 with one line and the run resumes; `--debug` shows the traceback.", ""]
    return "\n".join(lines)


def test_doc_is_current():
    if any(c.id not in MESSAGES for c in CASES):  # a -k selection, or CUDA cases skipped on a GPU machine
        pytest.skip("run the whole file on a machine without CUDA to check docs/BAD_INPUTS.md")
    text = render_doc()
    if os.environ.get("DPFLAT_WRITE_BAD_INPUTS_DOC"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/BAD_INPUTS.md is stale: DPFLAT_WRITE_BAD_INPUTS_DOC=1 python -m pytest tests/test_bad_inputs.py")
