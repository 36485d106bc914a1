"""Run folders: config, metrics, ledger, checkpoints, and the results table.

Crash safety: every file is written to a temporary name and moved into place with
``os.replace`` (atomic on POSIX), and a checkpoint becomes current only when the
``LATEST`` pointer moves to it, so a run killed at any instant leaves either the old
or the new checkpoint, never half of one. The previous checkpoint is kept too: a
checkpoint that reads back truncated or non-finite is reported (which file) and the
one before it is used.

The results table has one writer (:func:`modify_results`): a file lock around
read-modify-replace, so concurrent sweeps lose no row; a table that no longer reads
(truncated, disk full) is rebuilt from the run folders' ``result.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig, UnknownName, identity_dict, warn
from .privacy import PRIVATE_DIAGNOSTICS

RESULTS = "results.parquet"
TEST_PREDICTIONS = "test_predictions.npz"
#: seconds a writer waits for the results table's lock before giving up with one line
LOCK_TIMEOUT = 300.0
LANDSCAPE_COLUMNS = ("top_eigenvalue", "hessian_trace", "sam_sharpness")  # join a run's row when analysed


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is (corrupt file, missing checkpoint); one line with the way out."""


def retrain_hint(path: Path) -> str:
    return f"retrain it with `python -m dpflat train --config {path / 'config.json'} --no-resume`"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then move into place; a failed write names ``path`` and leaves no .tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError as e:  # a full disk fails at close, with no file name on the error
        tmp.unlink(missing_ok=True)
        raise _write_error(e, path) from None
    os.replace(tmp, path)


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
    def for_config(cls, cfg: RunConfig) -> "RunDir":
        return cls(Path(cfg.train.output_dir) / (cfg.train.run_name or run_id(cfg)))

    # --- files
    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    ledger_file = property(lambda self: self.path / "ledger.json")
    result_file = property(lambda self: self.path / "result.json")
    model_file = property(lambda self: self.path / "model.safetensors")
    landscape_dir = property(lambda self: self.path / "landscape")
    landscape_file = property(lambda self: self.path / "landscape" / "landscape.json")
    predictions_file = property(lambda self: self.path / TEST_PREDICTIONS)
    sharpness_file = property(lambda self: self.path / "sharpness.jsonl")
    mia_file = property(lambda self: self.path / "mia.json")
    canaries_file = property(lambda self: self.path / "canaries.json")
    best_file = property(lambda self: self.path / "best.safetensors")
    last_file = property(lambda self: self.path / "last.safetensors")
    #: private statistics of a finished run (batch sizes, read counts, split overlaps): not covered
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
            raise _os_error(e, self.path) from None
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
        old = _comparable(self.config().to_dict())
        new = _comparable(cfg.to_dict())
        if old != new:
            diff = _first_difference(old, new)
            raise FileExistsError(f"{self.path} holds a run with a different config ({diff}); "
                                  "choose another --run-name (or leave it out)")

    def finished_result(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The stored result of a finished run of ``cfg``, its row made sure of; None when not finished."""
        if not self.done:
            return None
        self.check_config(cfg)
        if not self.model_file.is_file():
            raise RunFolderError(f"{self.path} is finished but its model.safetensors is missing: "
                                 f"{retrain_hint(self.path)}")
        res = self.result()
        ensure_result(cfg.train.output_dir, {k: v for k, v in res.items() if k != "info"})
        return res

    def remove_if_bare(self) -> None:
        """Remove the folder when it holds nothing but its config (a run that failed before any work)."""
        try:
            names = {p.name for p in self.path.iterdir()}
        except OSError:
            return
        if names <= {"config.json", "config.json.tmp", ".lock"}:
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
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out

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

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))

    # --- checkpoints
    def save_checkpoint(self, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        ck = self.path / f"ckpt-{step:07d}"
        tmp = self.path / f".ckpt-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "state.pt")
        except (OSError, RuntimeError) as e:  # a full disk reads "unexpected pos 64 vs 0" from torch.save
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(e, tmp.parent / ck.name) from None
        shutil.rmtree(ck, ignore_errors=True)
        os.replace(tmp, ck)
        atomic_write_text(self.path / "LATEST", ck.name)
        # keep this one and the newest earlier one (the fallback when this one reads back corrupt);
        # later-numbered ones belong to an abandoned trajectory (--no-resume) and go
        older = [c for c in self.checkpoints() if _ckpt_step(c) < step]
        keep = {ck.name, older[-1].name} if older else {ck.name}
        for old in self.checkpoints():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return sorted((p for p in self.path.glob("ckpt-*") if p.is_dir() and _ckpt_step(p) >= 0), key=_ckpt_step)

    def latest_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest checkpoint that reads back whole and finite; None when there is none to resume.

        A corrupt one (truncated file, NaN weights) is named on stderr and the previous
        one is used; with no good one left, or ``LATEST`` pointing to nothing, the run
        stops with one line rather than silently starting over.
        """
        ptr = self.path / "LATEST"
        cks = self.checkpoints()
        if not ptr.exists():
            if not cks:
                return None
            name = cks[-1].name  # killed between the checkpoint's move and the pointer's
        else:
            name = ptr.read_text().strip()
        ck = self.path / name
        candidates = [c for c in cks if _ckpt_step(c) < _ckpt_step(ck)][::-1]
        if _ckpt_step(ck) < 0 or not ck.is_dir():
            if not candidates:
                raise RunFolderError(f"{ptr} points to {name}, which is missing, and no earlier checkpoint is left: "
                                     f"{retrain_hint(self.path)} (or restore {name})")
            warn(f"{ptr} points to {name}, which is missing; resuming from {candidates[0].name}")
        else:
            candidates.insert(0, ck)
        problem = ""
        for c in candidates:
            try:
                return _read_checkpoint(c)
            except _BadCheckpoint as e:
                problem = str(e)
                if c is not candidates[-1]:
                    warn(f"{problem}; resuming from the previous checkpoint instead")
        raise RunFolderError(f"{problem}, and no earlier good checkpoint is left: {retrain_hint(self.path)}")

    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        except Exception as e:  # noqa: BLE001 - a full disk is a SafetensorError (neither OSError nor RuntimeError)
            tmp.unlink(missing_ok=True)
            raise _write_error(e, path) from None
        os.replace(tmp, path)

    def load_model_state(self) -> dict[str, torch.Tensor]:
        """The selected parameters of a finished run; a missing or corrupt file is one line with the way out."""
        if not self.model_file.is_file():
            raise RunFolderError(f"{self.path} is finished but its model.safetensors is missing: {retrain_hint(self.path)}")
        try:
            return load_file(str(self.model_file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a cut file
            raise RunFolderError(f"{self.model_file} is corrupt ({_short(e)}): {retrain_hint(self.path)}") from None

    # --- reads for analysis and display (one reader per file kind)
    def ledger(self) -> dict[str, Any] | None:
        """ledger.json when present and well-formed, else None (the guarantee is then unknown)."""
        from .privacy import valid_ledger

        try:
            return valid_ledger(json.loads(self.ledger_file.read_text()))
        except (OSError, ValueError):
            return None

    def private_diagnostics(self) -> dict[str, Any] | None:
        """private_diagnostics.json (batch sizes, read counts, overlaps); None when absent or unreadable."""
        try:
            d = json.loads(self.private_file.read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def landscape(self) -> dict[str, Any] | None:
        """The landscape analysis summary; None when not analysed or unreadable."""
        try:
            return json.loads(self.landscape_file.read_text())
        except (OSError, ValueError):
            return None

    def load_surface(self, name: str = "surface"):
        """A ``landscape.Surface`` stored under ``landscape/`` (the analysis' own, or a cached view)."""
        from landscape import Surface

        return Surface.load(self.landscape_dir / name)

    def trajectory(self) -> list[dict[str, Any]]:
        """The rows of ``sharpness.jsonl`` (empty when the run did not record one)."""
        f = self.sharpness_file
        return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []

    def test_correct(self) -> Any:
        """Per-example test correctness (0/1 float64, in test-row order), or None if not saved."""
        import numpy as np

        if not self.predictions_file.is_file():
            return None
        with np.load(self.predictions_file) as z:
            order = np.argsort(z["idx"], kind="stable") if "idx" in z else slice(None)
            return np.asarray(z["correct"], dtype=np.float64)[order] if "correct" in z else None

    def canaries(self) -> set[int]:
        """Train rows a canary audit (``dpflat.audit``) added to this run; empty for other runs."""
        f = self.canaries_file
        return set(json.loads(f.read_text())["rows"]) if f.is_file() else set()

    def result(self) -> dict[str, Any] | None:
        if not self.done:
            return None
        try:
            res = json.loads(self.result_file.read_text())
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{self.result_file} is corrupt ({_short(e)}): {retrain_hint(self.path)}") from None
        if not isinstance(res, dict) or "run_id" not in res:
            raise RunFolderError(f"{self.result_file} is not a run result: {retrain_hint(self.path)}")
        return res


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:160] if msg else type(e).__name__


def _write_error(e: BaseException, path: Path) -> OSError:
    """A failed write as an OSError naming the file; a full disk says so (torch.save hides ENOSPC)."""
    import errno

    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror, str(path))
    try:
        full = shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return OSError(errno.EIO, f"write failed ({_short(e)})", str(path))


def _ckpt_step(p: Path) -> int:
    try:
        return int(p.name.removeprefix("ckpt-"))
    except ValueError:
        return -1


class _BadCheckpoint(Exception):
    pass


def _nonfinite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool(obj.is_floating_point() and not torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return any(_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_nonfinite(v) for v in obj)
    return False


def _read_checkpoint(ck: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Both files of a checkpoint, or ``_BadCheckpoint`` naming the file that is missing, cut or non-finite."""
    tf, sf = ck / "trainable.safetensors", ck / "state.pt"
    for f in (tf, sf):
        if not f.is_file():
            raise _BadCheckpoint(f"{f} is missing")
    try:
        trainable = load_file(str(tf))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... for a cut or garbage file
        raise _BadCheckpoint(f"{tf} is corrupt ({_short(e)})") from None
    bad = [k for k, v in trainable.items() if _nonfinite(v)]
    if bad:
        raise _BadCheckpoint(f"{tf} holds non-finite weights ({bad[0]})")
    try:
        state = torch.load(sf, weights_only=False)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError for a cut file
        raise _BadCheckpoint(f"{sf} is corrupt ({_short(e)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise _BadCheckpoint(f"{sf} is not a checkpoint state")
    if _nonfinite(state):
        raise _BadCheckpoint(f"{sf} holds non-finite values (optimizer state)")
    return trainable, state


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    return identity_dict(d)


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


def _os_error(e: OSError, path: Path) -> Exception:
    """An OSError of making/writing ``path`` as one line naming it."""
    import errno

    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConfigError(f"cannot write to {path}: {e.strerror.lower() if e.strerror else 'permission denied'}; "
                           "choose a writable --output-dir")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return ConfigError(f"cannot make the folder {path}: a file is in the way; choose another --output-dir")
    return e


def prepare_output_dir(root: str | Path) -> list[Path]:
    """The output folder exists (made if needed) and is a writable folder; else one line naming it.

    Returns the folders this call made, innermost first, so that a refused run can remove them
    again (``RunDir.remove_if_bare``): a refused call must not leave an empty ``--output-dir``.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output folder {root} is a file, not a folder: choose another --output-dir")
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, root) from None
    if not os.access(root, os.W_OK):
        raise ConfigError(f"cannot write to {root}: permission denied; choose a writable --output-dir")
    return made


def check_before_work(cfg: RunConfig, max_steps: int | None = None) -> None:
    """What can be refused in seconds is refused before any folder, data or weights (the loops' first call).

    The device must exist here, ``max_steps`` be positive, and the layer counts fit the
    backbone (read from its config.json alone): a bad ``--n-drop`` used to surface only
    after a minute of loading and teacher training.
    """
    from .config import check_device

    check_device(cfg.train.device)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps must be a whole number >= 1, got {max_steps!r}")
    if not cfg.blackbox.active:
        from .models import check_layers

        check_layers(cfg.model, cfg.flat.n_drop if cfg.flat.layers else None)


# --------------------------------------------------------------------------- the results table
def _read_table(path: Path):
    """The table, or None when the file is there but does not read (truncated, garbage)."""
    import pandas as pd

    try:
        t = pd.read_parquet(path)
    except FileNotFoundError:
        return pd.DataFrame()
    except Exception:  # noqa: BLE001 - ArrowInvalid, OSError, ...: a cut or foreign file
        return None
    return t if "run_id" in t.columns or t.empty else None


def rebuild_results(output_dir: str | Path):
    """The table from the run folders alone: each finished run's ``result.json`` (+ landscape columns)."""
    import pandas as pd

    rows = []
    for res_file in sorted(Path(output_dir).glob("*/result.json")):
        rd = RunDir(res_file.parent)
        try:
            res = rd.result()
        except RunFolderError:
            continue
        land = rd.landscape() or {}
        rows.append({**{k: v for k, v in res.items() if k != "info"},
                     **({k: land.get(k) for k in LANDSCAPE_COLUMNS} if land else {})})
    return pd.DataFrame(rows)


def _load_or_rebuild(output_dir: Path):
    path = output_dir / RESULTS
    table = _read_table(path)
    if table is None:
        table = rebuild_results(output_dir)
        warn(f"{path} was unreadable (truncated?); rebuilt it from the {len(table)} run folders' result.json")
        return table, True
    return table, False


def modify_results(output_dir: str | Path, change: Callable[[Any], Any]) -> Path:
    """The one writer of ``results.parquet``: ``change(table)`` -> new table (None: no change).

    Under a file lock, so concurrent processes (two sweeps, a notebook) lose no row;
    written to a temporary file and moved into place, so a reader never sees half a table.
    """
    from filelock import FileLock, Timeout

    root = Path(output_dir)
    path = root / RESULTS
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT):
            table, rebuilt = _load_or_rebuild(root)
            new = change(table)
            if new is None and not rebuilt:
                return path
            new = table if new is None else new
            tmp = root / f".{RESULTS}.{os.getpid()}.tmp"
            try:
                new.to_parquet(tmp, index=False)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except Timeout:
        raise RunFolderError(f"{path} stayed locked for {LOCK_TIMEOUT:g} s by another process; "
                             f"if none is running, delete {path}.lock") from None
    except OSError as e:
        raise _os_error(e, path) from None
    return path


def _upsert(table, row: dict[str, Any]):
    import pandas as pd

    new = pd.DataFrame([row])
    if table.empty:
        return new
    old = table[table["run_id"] != row["run_id"]]
    return pd.concat([old, new], ignore_index=True) if len(old) else new


def append_result(output_dir: str | Path, row: dict[str, Any]) -> Path:
    """Upsert one run's row (keyed by ``run_id``) into ``results.parquet`` of the output root."""
    return modify_results(output_dir, lambda t: _upsert(t, row))


def _same(a: Any, b: Any) -> bool:
    missing = lambda x: x is None or (isinstance(x, float) and math.isnan(x))  # noqa: E731
    try:
        if missing(a) or missing(b):
            return missing(a) and missing(b)
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _row_present(table, row: dict[str, Any]) -> bool:
    if table is None or table.empty or "run_id" not in table.columns:
        return False
    hit = table[table["run_id"] == row["run_id"]]
    if len(hit) != 1:
        return False
    have = hit.iloc[0].to_dict()
    return all(k in have and _same(_py(have[k]), v) for k, v in row.items())


def _py(x: Any) -> Any:
    return x.item() if hasattr(x, "item") and not isinstance(x, (str, bytes)) else x


def ensure_result(output_dir: str | Path, row: dict[str, Any]) -> None:
    """Upsert a finished run's row only when it is not already there (a re-run writes nothing)."""
    if _row_present(_read_table(Path(output_dir) / RESULTS), row):
        return
    modify_results(output_dir, lambda t: None if _row_present(t, row) else _upsert(t, row))


def update_result(output_dir: str | Path, run_id: str, columns: dict[str, Any]) -> dict[str, Any] | None:
    """Set extra columns (landscape, MIA) on an existing row; its new values, or None when there is no row."""
    out: dict[str, Any] = {}

    def change(table):
        if table.empty or "run_id" not in table.columns or not (table["run_id"] == run_id).any():
            return None
        out.update({**table[table["run_id"] == run_id].iloc[0].to_dict(), **columns})
        return _upsert(table, dict(out))

    if not (Path(output_dir) / RESULTS).exists():
        return None
    modify_results(output_dir, change)
    return out or None


def load_results(output_dir: str | Path):
    """The results table of an output folder (empty when it has none yet); an unreadable one is rebuilt.

    ``run_dir`` is where each run's folder is *now*: beside the table (``<output_dir>/<run_id>``),
    never the absolute path stored when it was trained, so a copied or moved output folder is
    read from itself. A path that is no folder is refused (a typo is not an empty table).
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no results table in {root}: it is not a folder (check the path)")
    path = root / RESULTS
    table = _read_table(path)  # no file: an empty table
    if table is None:
        try:
            modify_results(root, lambda t: None)  # rebuilds and writes under the lock
            table = _read_table(path)
        except (OSError, ValueError):  # a read-only folder: use the rebuilt table without saving it
            table, _ = _load_or_rebuild(root)
    if table is not None and "run_id" in table.columns:
        table = table.assign(run_dir=[str(root / str(r)) for r in table["run_id"]])
    return table


def finish_run(cfg: RunConfig, rd: RunDir, metric: str, ledger, final: dict[str, Any], best_step: int,
               steps: int, keep_layers: str, info: dict[str, Any], *, val: dict[str, Any] | None = None,
               test_examples: dict[str, Any] | None = None, cost: dict[str, float] | None = None) -> dict[str, Any]:
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
        "epsilon": ledger.claimed_epsilon,  # None unless the run is (ε, δ)-DP
        "dpsgd_part_epsilon": ledger.dpsgd_part_epsilon,  # paper mode: the DP-SGD part alone, not the run's
        "noise_source": ledger.noise_source,
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
        **{f"info_{k}": v for k, v in info.items() if isinstance(v, (int, float, str, bool))},
    }
    rd.write_json(rd.result_file, {**row, "info": info})
    append_result(cfg.train.output_dir, row)
    return row


__all__ = [
    "finish_run", "LANDSCAPE_COLUMNS", "RESULTS", "TEST_PREDICTIONS", "RunDir", "RunFolderError", "RunLocked", "append_result", "atomic_write_text",
    "check_before_work", "ensure_result", "load_results", "modify_results", "prepare_output_dir", "rebuild_results", "run_id",
    "update_result"]
