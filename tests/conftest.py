"""Shared fixtures: the offline data folder and small, fast run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
import torch

from dpflat.config import DataConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# CI: the same hypothesis examples on every run (a red CI must be reproducible); locally
# they vary, which is how new counter-examples are found.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# One thread: the tests use tiny models, where threading costs more than it gains, and
# on a shared 2-core machine two threads per process made tiny runs 5-10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"offline data not found at {SHARED_DATA}")
    return SHARED_DATA


def tiny_run_config(out: Path, data_dir: Path, **over) -> RunConfig:
    """A DP run on tiny-bert and 128 SST-2 examples: a few seconds end to end."""
    cfg = RunConfig(
        data=DataConfig(task="sst2", data_dir=str(data_dir), max_length=24, train_size=128, eval_size=64,
                        public_size=64),
        model=ModelConfig(backbone="tiny-bert", prefix_len=4, prefix_init="random"),
        privacy=PrivacyConfig(epsilon=8.0),
        train=TrainConfig(epochs=2, batch_size=32, physical_batch_size=16, lr=0.05, output_dir=str(out),
                          checkpoint_every=1, progress=False, eval_every=4),
        variant="dp",
    )
    return cfg.replace(**over) if over else cfg


@pytest.fixture
def tiny_cfg(tmp_path, shared_data):
    return tiny_run_config(tmp_path / "runs", shared_data)


@pytest.fixture
def make_cfg(shared_data):
    """Factory: ``make_cfg(out_dir, **section_overrides)`` -> a tiny run config."""
    return lambda out, **over: tiny_run_config(out, shared_data, **over)


def kill_training_at(cfg_file: Path, run_dir: Path, step: int, *args: str, timeout: float = 240.0,
                     poll: float = 0.02, env: dict[str, str] | None = None) -> int:
    """Train ``cfg_file`` with ``python -m dpflat train --config`` in a child process (``args``: more
    flags) and SIGKILL it once its latest checkpoint is at ``step`` or later; returns that step.

    What the crash-resume tests share: the child must still be running when it is killed (a run
    that finished first fails the test), and it is never left behind.
    """
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "dpflat", "train", "--config", str(cfg_file), *args],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = Path(run_dir) / "LATEST"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if latest.exists() and int(latest.read_text().strip().split("-")[1]) >= step:
                break
            assert proc.poll() is None, "training finished before it could be killed"
            time.sleep(poll)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    return int(latest.read_text().strip().split("-")[1])
