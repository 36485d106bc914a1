"""Run folders: config, metrics, ledger, checkpoints, and the results table.

Crash safety: every file is written to a temporary name and moved into place with
``os.replace`` (atomic on POSIX), and a checkpoint becomes current only when the
``LATEST`` pointer moves to it, so a run killed at any instant leaves either the old
or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .config import RunConfig

RESULTS = "results.parquet"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_id(cfg: RunConfig) -> str:
    """Readable and unique: variant, task, ε, seed, plus a hash of the whole config."""
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("output_dir", "run_name", "progress", "device", "num_threads")}
    if d["train"].get("precision") == "auto":  # the default: run ids from before the field stay valid
        d["train"].pop("precision")
    h = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
    eps = f"eps{cfg.privacy.epsilon:g}" if cfg.privacy.enabled else "nonpriv"
    return f"{cfg.variant}_{cfg.data.task}_{eps}_s{cfg.train.seed}_{h}"


class RunLocked(RuntimeError):
    """Another live process is training this run (two notebooks, two sweeps)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDir:
    """One run's folder and everything written into it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: RunConfig) -> "RunDir":
        return cls(Path(cfg.train.output_dir) / (cfg.train.run_name or run_id(cfg)))

    # --- files
    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    ledger_file = property(lambda self: self.path / "ledger.json")
    result_file = property(lambda self: self.path / "result.json")
    model_file = property(lambda self: self.path / "model.safetensors")

    @property
    def done(self) -> bool:
        return self.result_file.is_file()

    def create(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config_file.exists():
            old = RunConfig.load(self.config_file).to_dict()
            new = cfg.to_dict()
            for k in ("output_dir", "progress", "device", "num_threads"):
                old["train"].pop(k, None)
                new["train"].pop(k, None)
            if old != new:
                raise FileExistsError(f"{self.path} holds a run with a different config; choose another --run-name")
        else:
            atomic_write_text(self.config_file, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive training of this run; a lock left by a killed process is taken over."""
        f = self.path / ".lock"
        for _ in range(2):
            try:
                fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                try:
                    pid = int(f.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RunLocked(f"{self.path} is being trained by process {pid}") from None
                f.unlink(missing_ok=True)
        else:  # pragma: no cover - lost a race twice
            raise RunLocked(f"{self.path} is being trained by another process")
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield
        finally:
            f.unlink(missing_ok=True)

    def config(self) -> RunConfig:
        return RunConfig.load(self.config_file)

    # --- metrics
    def log(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to work a resume will redo)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))

    # --- checkpoints
    def save_checkpoint(self, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        ck = self.path / f"ckpt-{step:07d}"
        tmp = self.path / f".ckpt-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(ck, ignore_errors=True)
        os.replace(tmp, ck)
        atomic_write_text(self.path / "LATEST", ck.name)
        for old in self.path.glob("ckpt-*"):
            if old.name != ck.name:
                shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        ptr = self.path / "LATEST"
        if not ptr.exists():
            return None
        ck = self.path / ptr.read_text().strip()
        if not (ck / "state.pt").exists():
            return None
        trainable = load_file(str(ck / "trainable.safetensors"))
        state = torch.load(ck / "state.pt", weights_only=False)
        return trainable, state

    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def load_model_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.model_file))

    def result(self) -> dict[str, Any] | None:
        return json.loads(self.result_file.read_text()) if self.done else None


def append_result(output_dir: str | Path, row: dict[str, Any]) -> Path:
    """Upsert one run's row (keyed by ``run_id``) into ``results.parquet`` of the output root."""
    import pandas as pd

    path = Path(output_dir) / RESULTS
    new = pd.DataFrame([row])
    if path.exists():
        old = pd.read_parquet(path)
        old = old[old["run_id"] != row["run_id"]]
        new = pd.concat([old, new], ignore_index=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent sweeps must not share a temp file
    new.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_results(output_dir: str | Path):
    import pandas as pd

    path = Path(output_dir) / RESULTS
    if not path.exists():
        return pd.DataFrame()
    return pd.read_parquet(path)

TEST_PREDICTIONS = "test_predictions.npz"


def finish_run(cfg: RunConfig, rd: RunDir, metric: str, ledger, final: dict[str, Any], best_step: int,
               steps: int, keep_layers: str, info: dict[str, Any], *, val: dict[str, Any] | None = None,
               test_examples: dict[str, Any] | None = None, cost: dict[str, float] | None = None,
               overlap: dict[str, int] | None = None) -> dict[str, Any]:
    """Write a finished run's ``result.json`` and its row of the results table; return the row.

    One place for the row's columns, so white-box and black-box runs land in the same
    table the same way (the ledger decides the guarantee and whether an ε is claimed).
    ``final`` is the test split's evaluation (``accuracy`` = test accuracy); ``val`` the
    selected model on the validation split; ``test_examples`` the per-example test
    arrays, saved as ``test_predictions.npz`` for paired statistics (``dpflat.stats``).
    """
    val = val or {}
    cost = cost or {}
    if test_examples:
        import numpy as np

        tmp = rd.path / (TEST_PREDICTIONS + ".tmp.npz")
        np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in test_examples.items()})
        os.replace(tmp, rd.path / TEST_PREDICTIONS)
    row = {
        "run_id": rd.path.name,
        "run_dir": str(rd.path),
        "variant": cfg.variant,
        "task": cfg.data.task,
        "metric": metric,
        "seed": cfg.train.seed,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "epsilon": ledger.claimed_epsilon,
        "epsilon_spent": ledger.epsilon,
        "delta": ledger.delta,
        "sigma": ledger.noise_multiplier,
        "sample_rate": ledger.sample_rate,
        "steps": steps,
        "guarantee": ledger.guarantee,
        "accuracy": final["accuracy"],  # the test split's
        "eval_loss": final["loss"],  # alias of test_loss for readers of older tables
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "val_accuracy": val.get("accuracy", float("nan")),
        "val_loss": val.get("loss", float("nan")),
        "n_val": val.get("n", 0),
        "best_step": best_step,
        "n_private": ledger.n_private,
        "n_eval": final["n"],
        "keep_layers": keep_layers,
        "finished": True,
        **{k: float(cost[k]) for k in ("wall_s", "setup_s", "train_s", "examples_per_s", "peak_mem_mb") if k in cost},
        **{f"overlap_{k}": int(v) for k, v in (overlap or {}).items()},
        **{f"info_{k}": v for k, v in info.items() if isinstance(v, (int, float, str, bool))},
    }
    rd.write_json(rd.result_file, {**row, "info": info})
    append_result(cfg.train.output_dir, row)
    return row


__all__ = [
    "finish_run", "RESULTS", "TEST_PREDICTIONS", "RunDir", "RunLocked", "append_result", "atomic_write_text", "load_results", "run_id"]
