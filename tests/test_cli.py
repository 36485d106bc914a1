"""The CLI: every bad input is one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpflat.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base_args(tmp_path, shared_data):
    return ["train", "--backbone", "tiny-bert", "--data-dir", str(shared_data), "--train-size", "64",
            "--eval-size", "32", "--max-length", "16", "--epochs", "1", "--batch-size", "16",
            "--output-dir", str(tmp_path / "runs"), "--no-progress", "--prefix-len", "2"]


def _bad_sst2(tmp_path: Path, train_text: str) -> Path:
    root = tmp_path / "bad"
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "train.tsv").write_text(train_text)
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    return root


CASES = {
    "epsilon_zero": (["--epsilon", "0"], "epsilon must be > 0"),
    "epsilon_negative": (["--epsilon", "-1"], "epsilon must be > 0"),
    "delta_one": (["--delta", "1"], "delta must be in (0, 1)"),
    "delta_zero": (["--delta", "0"], "delta must be in (0, 1)"),
    "unknown_task": (["--task", "nope"], "unknown task 'nope'"),
    "missing_data_dir": (["--data-dir", "/nonexistent/dpflat-data"], "/nonexistent/dpflat-data"),
    "missing_model_dir": (["--backbone", "/nonexistent/model"], "does not exist"),
    "batch_larger_than_data": (["--batch-size", "1000"], "larger than the private training split"),
    "bad_mode": (["--awp-mode", "sometimes"], "argument --awp-mode: invalid choice: 'sometimes'"),
    "bad_device": (["--device", "tpu"], "device must be"),
    "bad_precision": (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    "bad_grad_sample_mode": (["--grad-sample-mode", "vmap"], "argument --grad-sample-mode: invalid choice: 'vmap'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, base_args, capsys):
    extra, expect = CASES[case]
    assert main(base_args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(("dpflat: error:", "dpflat train: error:")), err
    assert expect in err


@pytest.mark.parametrize(
    "content,expect",
    [
        ("text\tlabel\nfine\t1\n", "columns"),  # wrong column names
        ("sentence\tlabel\n", "no rows"),  # header only: empty split
        ("sentence\tlabel\nfine\t7\n", "label"),  # label outside the task's label set
    ],
)
def test_bad_files_are_one_line(content, expect, base_args, tmp_path, capsys):
    root = _bad_sst2(tmp_path, content)
    assert main(base_args + ["--data-dir", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dpflat: error:") and expect in err.lower(), err


def test_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "dpflat", "train", "--epsilon", "-3", "--output-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip() == "dpflat: error: epsilon must be > 0, got -3.0"


def test_help_lists_every_config_field(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--epsilon", "--delta", "--data-dir", "--output-dir", "--device", "--seed",
                 "--prefix-len", "--awp-gamma", "--n-drop", "--distill-lambda", "--physical-batch-size", "--dp"):
        assert flag in out, flag


def test_help_shows_each_default_once_and_every_flag_has_help(capsys):
    """Regression: ArgumentDefaultsHelpFormatter + our own text printed "(default: X) (default: None)"."""
    from dpflat.cli import _parser

    p = _parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sp in subs.items():
        for a in sp._actions:
            assert a.help, f"{name} {a.option_strings or a.dest} has no help"
            assert a.help.count("(default:") <= 1, (name, a.help)
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 8.0)" in out and "(default: 8.0) (default" not in out
    assert "--epsilon FLOAT" in out and "--awp-mode {safe,paper}" in out


def test_every_config_field_has_help_metadata_and_literal_flags_have_choices():
    from dataclasses import fields

    from dpflat.cli import _parser
    from dpflat.config import SECTIONS

    for sect, klass in SECTIONS.items():
        for f in fields(klass):
            assert f.metadata.get("help"), f"{sect}.{f.name} has no help metadata"
    train = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    by_dest = {a.dest: a for a in train._actions}
    assert by_dest["flat.awp_mode"].choices == ["safe", "paper"]
    assert by_dest["train.precision"].choices == ["auto", "fp32", "bf16"]
    assert by_dest["privacy.accountant"].choices == ["rdp", "prv"]
    assert by_dest["train.batch_size"].type is int and by_dest["privacy.delta"].type is float


def test_defaults_are_unchanged():
    """The help text moved into field metadata; every default stays what it was (the study regime's
    since issue 27: 8,000 examples, 8 epochs, batch 256, public 2,000, the auto head, no dropout)."""
    from dpflat.config import RunConfig

    d = RunConfig().to_dict()
    assert d["train"]["batch_size"] == 256 and d["train"]["epochs"] == 8.0 and d["train"]["lr"] == 2e-2 and d["train"]["checkpoint_every"] == 20
    assert {k: d["privacy"][k] for k in ("enabled", "epsilon", "delta", "max_grad_norm", "accountant",
                                         "grad_sample_mode", "poisson")} == {
        "enabled": True, "epsilon": 8.0, "delta": None, "max_grad_norm": 1.0, "accountant": "rdp",
        "grad_sample_mode": "hooks", "poisson": True}
    assert d["data"]["public_size"] == 2000 and d["data"]["train_size"] == 8000 and d["model"]["prefix_len"] == 16
    assert d["model"]["head"] == "auto" and d["model"]["head_dropout"] == 0.0 and d["model"]["backbone_dropout"] is False
    assert d["flat"]["teacher_epochs"] == 10.0
    assert d["flat"]["awp_gamma"] == 0.01 and d["flat"]["n_drop"] == 2 and d["model"]["prefix_init"] == "tokens"


def test_flags_override_variant_preset():
    from dpflat.cli import _parser, config_from_args

    ns = _parser().parse_args(["train", "--variant", "dpflat", "--mode", "paper", "--no-awp", "--epsilon", "3"])
    cfg = config_from_args(ns)
    assert cfg.variant == "dpflat-paper" and not cfg.flat.awp and cfg.flat.layers and cfg.flat.distill_mode == "paper"
    assert cfg.privacy.epsilon == 3.0


def test_a_closed_pipe_is_not_an_error():
    """`dpflat tasks | head -1`: the reader closes the pipe early; no error line, no traceback."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, dpflat.cli as c; time.sleep(0.5); sys.exit(c.main(['tasks']))"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err
