"""The results table of an output folder: one row per finished run, one locked writer.

``results.parquet`` sits beside the run folders. Its one writer is :func:`modify_results`:
a file lock around read-modify-replace, so concurrent sweeps and notebooks lose no row,
and a temporary file moved into place, so a reader never sees half a table. A table that
no longer reads (truncated, disk full) is rebuilt from the run folders' results, read
through ``RunDir``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from ..config import warn
from ._io import RunFolderError, os_error
from .folder import RunDir

RESULTS = "results.parquet"
#: seconds a writer waits for the results table's lock before giving up with one line
LOCK_TIMEOUT = 300.0
LANDSCAPE_COLUMNS = ("top_eigenvalue", "hessian_trace", "sam_sharpness")  # join a run's row when analysed


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
    for rd in RunDir.finished_in(output_dir):
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
        raise os_error(e, path) from None
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


__all__ = ["LANDSCAPE_COLUMNS", "LOCK_TIMEOUT", "RESULTS", "append_result", "ensure_result", "load_results",
           "modify_results", "rebuild_results", "update_result"]
