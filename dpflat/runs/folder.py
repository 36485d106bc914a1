"""One run's folder: ``RunDir`` is the only reader and writer of the files in it.

Why one owner: a run folder is read by the table, the report, the widgets, the analysis,
the attacks and the audits, and written by the training session and by them. With every
path and every read and write here (the names in ``names.py``), a file's format, its
crash-safe write and its one-line error on corruption exist once, and a test
(``tests/test_run_files.py``) keeps other modules from opening run files themselves.
Every write is atomic (``_io.atomic_write_text`` and friends), except the two append-only
logs (metrics and the sharpness trajectory), whose cut last line readers skip or a resume
truncates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, RunConfig, UnknownName, identity_dict
from ..privacy import valid_ledger
from . import checkpoints
from ._io import RunFolderError, atomic_write_text, os_error, prepare_output_dir, retrain_hint, short, write_error
from .names import (AUDIT, AXIS_SURFACE, BEST, CANARIES, CONFIG, LANDSCAPE, LANDSCAPE_DIR, LAST, LEDGER, LOCK, METRICS,
                    MIA, MODEL, PRIVATE_DIAGNOSTICS, RESULT, SHARPNESS, SURFACE, TEST_PREDICTIONS)

if TYPE_CHECKING:  # pragma: no cover
    from landscape import Surface


def run_id(cfg: RunConfig) -> str:
    """Readable and unique: variant, task, ε, seed, plus a hash of the whole config."""
    d = identity_dict(cfg.to_dict())
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
    def for_config(cls, cfg: RunConfig) -> RunDir:
        return cls(Path(cfg.train.output_dir) / (cfg.train.run_name or run_id(cfg)))

    @classmethod
    def finished_in(cls, root: str | Path) -> list[RunDir]:
        """The run folders directly under ``root`` that hold a result, by name."""
        return [cls(f.parent) for f in sorted(Path(root).glob(f"*/{RESULT}"))]

    # --- files
    config_file = property(lambda self: self.path / CONFIG)
    metrics_file = property(lambda self: self.path / METRICS)
    ledger_file = property(lambda self: self.path / LEDGER)
    result_file = property(lambda self: self.path / RESULT)
    model_file = property(lambda self: self.path / MODEL)
    landscape_dir = property(lambda self: self.path / LANDSCAPE_DIR)
    landscape_file = property(lambda self: self.path / LANDSCAPE_DIR / LANDSCAPE)
    predictions_file = property(lambda self: self.path / TEST_PREDICTIONS)
    sharpness_file = property(lambda self: self.path / SHARPNESS)
    mia_file = property(lambda self: self.path / MIA)
    canaries_file = property(lambda self: self.path / CANARIES)
    audit_file = property(lambda self: self.path / AUDIT)
    best_file = property(lambda self: self.path / BEST)
    last_file = property(lambda self: self.path / LAST)
    private_file = property(lambda self: self.path / PRIVATE_DIAGNOSTICS)

    @property
    def done(self) -> bool:
        return self.result_file.is_file()

    def create(self, cfg: RunConfig) -> bool:
        """Make the folder (or check that it holds this same config); True when this call made it.

        The output folders this call had to make are remembered (``made_parents``): a run refused
        before any work removes them again when they are still empty.
        """
        self.made_parents = prepare_output_dir(self.path.parent)
        made = not self.path.exists()
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            raise os_error(e, self.path) from None
        if not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a folder: choose another --run-name")
        if self.config_file.exists():
            self.check_config(cfg)
            return made
        try:
            atomic_write_text(self.config_file, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        except BaseException:
            if made:
                self.remove_if_bare()
            raise
        return made

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse to mix runs: the folder must hold ``cfg`` (up to where/how it runs), finished or not."""
        old = identity_dict(self.config().to_dict())
        new = identity_dict(cfg.to_dict())
        if old != new:
            diff = _first_difference(old, new)
            raise FileExistsError(f"{self.path} holds a run with a different config ({diff}); "
                                  "choose another --run-name (or leave it out)")

    def remove_if_bare(self) -> None:
        """Remove the folder when it holds nothing but its config (a run that failed before any work)."""
        try:
            names = {p.name for p in self.path.iterdir()}
        except OSError:
            return
        if names <= {CONFIG, CONFIG + ".tmp", LOCK}:
            shutil.rmtree(self.path, ignore_errors=True)
        for parent in getattr(self, "made_parents", []):  # innermost first; only while empty
            try:
                parent.rmdir()
            except OSError:
                break

    @contextmanager
    def removed_on_failure(self, made: bool) -> Iterator[None]:
        """A run that this call created and that fails before writing anything leaves no folder behind."""
        try:
            yield
        except BaseException:
            if made:
                self.remove_if_bare()
            raise

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive training of this run; a lock left by a killed process is taken over."""
        f = self.path / LOCK
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
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a run folder (no config.json)")
        try:
            return RunConfig.load(self.config_file)
        except UnknownName as e:  # a field or section this version does not know: a newer dpflat wrote it
            raise RunFolderError(f"{self.path}'s config.json was written by a newer dpflat ({e.name} is unknown "
                                 "to this version): upgrade dpflat to use this run folder") from None
        except ConfigError as e:
            raise RunFolderError(f"{self.path}'s config.json is corrupt ({str(e).removeprefix(str(self.config_file) + ': ')}): "
                                 "move the folder away, or run under another --run-name") from None

    # --- metrics
    def log(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        return _json_lines(self.metrics_file)

    def start_fresh(self) -> None:
        """A run that starts from step 0 without a checkpoint: what an earlier attempt wrote goes.

        Why: its metrics rows, best-on-val parameters and outputs belong to a trajectory that is
        not continued (a killed attempt, or ``--no-resume``); kept, they would be duplicated rows
        and a stale best.safetensors. Checkpoints go when step 0's is saved (``save_checkpoint``).
        """
        for f in (self.metrics_file, self.best_file, self.last_file, self.model_file, self.result_file,
                  self.ledger_file, self.private_file, self.predictions_file):
            f.unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to work a resume will redo)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    # --- checkpoints (the format: checkpoints.py)
    def save_checkpoint(self, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        checkpoints.save(self.path, step, trainable, state)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return checkpoints.listed(self.path)

    def latest_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest checkpoint that reads back whole and finite; None when there is none to resume."""
        return checkpoints.latest(self.path)

    # --- what the session writes: parameters, ledger, private diagnostics, result
    def save_best(self, params: dict[str, torch.Tensor]) -> None:
        """The best-on-val parameters so far (private state: they come from the trajectory)."""
        self._save_tensors(self.best_file, params)

    def drop_best(self) -> None:
        self.best_file.unlink(missing_ok=True)

    def best_params(self) -> dict[str, torch.Tensor] | None:
        return load_file(str(self.best_file)) if self.best_file.exists() else None

    def save_last(self, params: dict[str, torch.Tensor]) -> None:
        self._save_tensors(self.last_file, params)

    def save_model(self, params: dict[str, torch.Tensor]) -> None:
        """The released parameters (the selected ones)."""
        self._save_tensors(self.model_file, params)

    def write_ledger(self, public: dict[str, Any]) -> None:
        self._write_json(self.ledger_file, public)

    def write_private_diagnostics(self, d: dict[str, Any]) -> None:
        self._write_json(self.private_file, d)

    def write_result(self, d: dict[str, Any]) -> None:
        self._write_json(self.result_file, d)

    def save_test_predictions(self, arrays: dict[str, Any]) -> None:
        """Per-example test arrays (``idx``, ``correct``, ...) for paired statistics (``dpflat.stats``)."""
        tmp = self.path / (TEST_PREDICTIONS + ".tmp.npz")
        np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, self.predictions_file)

    # --- what the diagnostics write: sharpness trajectory, landscape, MIA, canary audit
    def clear_trajectory(self) -> None:
        """A fresh run: a trajectory left by a killed attempt is stale."""
        self.sharpness_file.unlink(missing_ok=True)

    def append_trajectory(self, row: dict[str, Any]) -> None:
        with open(self.sharpness_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_trajectory(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resume measures the later ones again)."""
        f = self.sharpness_file
        if f.is_file():
            keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(f, "".join(ln + "\n" for ln in keep))

    def write_landscape(self, summary: dict[str, Any]) -> None:
        self.landscape_dir.mkdir(parents=True, exist_ok=True)
        self._write_json(self.landscape_file, summary, sort_keys=False, default=_plain)

    def save_surface(self, surface: Surface, name: str = SURFACE) -> Path:
        """Store a ``landscape.Surface`` under ``landscape/``; returns its ``.npz`` path."""
        npz, _ = surface.save(self.landscape_dir / name)
        return npz

    @staticmethod
    def axis_surface_name(axes: str, grid: int, n_examples: int, seed: int) -> str:
        """The name under ``landscape/`` of a surface along ``axes`` ("eigen", "interp") with these settings."""
        return AXIS_SURFACE.format(axes=axes, grid=grid, n_examples=n_examples, seed=seed)

    def cached_surface(self, name: str) -> Surface | None:
        """A surface stored under ``landscape/`` by that name (``save_surface``); None when there is none."""
        if not (self.landscape_dir / name).with_suffix(".json").is_file():
            return None
        return self.load_surface(name)

    def write_mia(self, d: dict[str, Any]) -> Path:
        self._write_json(self.mia_file, d)
        return self.mia_file

    def write_canaries(self, record: dict[str, Any]) -> None:
        """The canaries of an audit run (made before the run's folder: the run reads them as private data)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.canaries_file, json.dumps(record))

    def write_audit(self, d: dict[str, Any]) -> None:
        self._write_json(self.audit_file, d, sort_keys=False)

    # --- reads for analysis and display (one reader per file kind)
    def load_model_state(self) -> dict[str, torch.Tensor]:
        """The selected parameters of a finished run; a missing or corrupt file is one line with the way out."""
        if not self.model_file.is_file():
            raise RunFolderError(f"{self.path} is finished but its model.safetensors is missing: {retrain_hint(self.path)}")
        try:
            return load_file(str(self.model_file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a cut file
            raise RunFolderError(f"{self.model_file} is corrupt ({short(e)}): {retrain_hint(self.path)}") from None

    def ledger(self) -> dict[str, Any] | None:
        """ledger.json when present and well-formed, else None (the guarantee is then unknown)."""
        try:
            return valid_ledger(json.loads(self.ledger_file.read_text()))
        except (OSError, ValueError):
            return None

    def ledger_as_written(self) -> dict[str, Any]:
        """ledger.json as the run wrote it, not validated: an audit reports what the run claimed."""
        return json.loads(self.ledger_file.read_text())

    def private_diagnostics(self) -> dict[str, Any] | None:
        """private_diagnostics.json (batch sizes, read counts, overlaps); None when absent or unreadable."""
        d = _json_or_none(self.private_file)
        return d if isinstance(d, dict) else None

    def mia(self) -> dict[str, Any] | None:
        """mia.json (a membership-inference attack's result, ``dpflat.mia``); None when absent or unreadable."""
        d = _json_or_none(self.mia_file)
        return d if isinstance(d, dict) else None

    def landscape(self) -> dict[str, Any] | None:
        """The landscape analysis summary; None when not analysed or unreadable."""
        return _json_or_none(self.landscape_file)

    def load_surface(self, name: str = SURFACE) -> Surface:
        """A ``landscape.Surface`` stored under ``landscape/`` (the analysis' own, or a cached view)."""
        from landscape import Surface

        return Surface.load(self.landscape_dir / name)

    def trajectory(self) -> list[dict[str, Any]]:
        """The rows of ``sharpness.jsonl`` (empty when the run did not record one)."""
        f = self.sharpness_file
        return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []

    def test_correct(self) -> Any:
        """Per-example test correctness (0/1 float64, in test-row order), or None if not saved."""
        if not self.predictions_file.is_file():
            return None
        with np.load(self.predictions_file) as z:
            order = np.argsort(z["idx"], kind="stable") if "idx" in z else slice(None)
            return np.asarray(z["correct"], dtype=np.float64)[order] if "correct" in z else None

    def canary_record(self) -> dict[str, Any] | None:
        """canaries.json of a canary-audit run (``dpflat.audit``); None for other runs."""
        f = self.canaries_file
        return json.loads(f.read_text()) if f.is_file() else None

    def canaries(self) -> set[int]:
        """Train rows a canary audit (``dpflat.audit``) added to this run; empty for other runs."""
        rec = self.canary_record()
        return set(rec["rows"]) if rec is not None else set()

    def result(self) -> dict[str, Any] | None:
        if not self.done:
            return None
        try:
            res = json.loads(self.result_file.read_text())
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{self.result_file} is corrupt ({short(e)}): {retrain_hint(self.path)}") from None
        if not isinstance(res, dict) or "run_id" not in res:
            raise RunFolderError(f"{self.result_file} is not a run result: {retrain_hint(self.path)}")
        return res

    # --- the two ways a file is written
    def _write_json(self, path: Path, obj: Any, *, sort_keys: bool = True, default: Any = str) -> None:
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default))

    def _save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        except Exception as e:  # noqa: BLE001 - a full disk is a SafetensorError (neither OSError nor RuntimeError)
            tmp.unlink(missing_ok=True)
            raise write_error(e, path) from None
        os.replace(tmp, path)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log; a line cut by a kill is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _plain(x: Any) -> Any:
    """numpy and torch values as JSON numbers and lists (the landscape summary holds them)."""
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    return str(x)


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for sect in sorted(set(old) | set(new)):
        a, b = old.get(sect), new.get(sect)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    return f"{sect}.{k}: {a.get(k)!r} there, {b.get(k)!r} here"
        elif a != b:
            return f"{sect}: {a!r} there, {b!r} here"
    return "same values"  # pragma: no cover


__all__ = ["RunDir", "RunLocked", "run_id"]
