"""A committed record of a long benchmark's finished cells.

Why: run folders (checkpoints, predictions, landscapes) live on the machine that trained them
and are gone when a session's machine is replaced; a benchmark that takes more hours than one
session then restarts from zero every time. The record keeps, per finished cell, what the
table needs -- its results row, its flatness figures and its per-example test correctness (for
the paired bootstrap) -- in one small JSON-lines file in the repository, so a fresh clone
skips the recorded cells and still prints the whole table.

One writer (``CellRecord.add``, under a file lock: two benchmark processes share a grid) and
one reader (``CellRecord.rows`` / ``CellRecord.correct``) own the layout.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock


def _plain(v: Any) -> Any:
    """JSON-safe scalar: NaN/inf become None, numpy scalars become Python ones."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def pack_correct(correct: np.ndarray) -> dict[str, Any]:
    """0/1 correctness as packed bits (base64): 872 SST-2 test rows take 148 characters."""
    bits = np.asarray(correct, dtype=np.float64)
    if not np.isin(bits, (0.0, 1.0)).all():
        raise ValueError("per-example correctness must be 0/1")
    return {"n": int(bits.size), "bits": base64.b64encode(np.packbits(bits.astype(np.uint8)).tobytes()).decode()}


def unpack_correct(d: dict[str, Any]) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(d["bits"]), dtype=np.uint8)
    return np.unpackbits(raw)[: int(d["n"])].astype(np.float64)


class CellRecord:
    """JSON lines, one finished cell each: ``{"cell", "row": {...}, "correct": {"n", "bits"} | null}``.

    ``cell`` is the benchmark's own key for a grid cell (it must not depend on the machine: a
    run id hashes the data folder's path); ``row`` is the results row as it was, run id included."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _lines(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError:
                raise ValueError(f"{self.path}:{i} is not a JSON line (a merge conflict?): fix or delete that line") from None
            if not isinstance(d, dict) or "cell" not in d or not isinstance(d.get("row"), dict):
                raise ValueError(f"{self.path}:{i} is not a cell record")
            out.append(d)
        return out

    def cells(self) -> set[str]:
        return {d["cell"] for d in self._lines()}

    def rows(self) -> list[dict[str, Any]]:
        """The recorded results rows with their ``cell`` key (the first record of a cell wins)."""
        seen, out = set(), []
        for d in self._lines():
            if d["cell"] not in seen:
                seen.add(d["cell"])
                out.append(dict(d["row"], cell=d["cell"]))
        return out

    def correct(self, cell: str) -> np.ndarray | None:
        for d in self._lines():
            if d["cell"] == cell and d.get("correct"):
                return unpack_correct(d["correct"])
        return None

    def add(self, cell: str, row: dict[str, Any], correct: np.ndarray | None) -> bool:
        """Append one cell unless it is recorded already; True when it was added."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            if cell in self.cells():
                return False
            line = {"cell": cell, "row": {k: _plain(v) for k, v in row.items() if k != "cell"},
                    "correct": pack_correct(correct) if correct is not None else None}
            with open(self.path, "a") as f:
                f.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
        return True
