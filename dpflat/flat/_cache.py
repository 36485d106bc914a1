"""A cache for the safe levels' one-off setup work (layer selection, teacher).

Why: a sweep runs many DP-Flat runs (ε values, variants) that share their public
split, backbone and seed; in safe mode the layer ranking and the teacher read only
public data, so every such run would redo the same minutes of non-private work.

What makes reuse correct: the key hashes *everything* the result depends on -- the
model's full state at setup time (frozen backbone, initial prefix + head, keep-mask),
the content of the data the work reads (public split; eval split for the reported
teacher accuracy), the seed, the hyperparameters of the level and of the fit, the
device type and precision -- plus a format version. A changed input is a new key.

Privacy: only safe-mode (public-data) results are cached. Paper mode reads the
private split, and a cached paper teacher could leak into a later DP-labelled run,
so the levels never call this module in paper mode (tests check it). Files live
under ``<output_dir>/.setup-cache/``; they hold a keep-mask / a prefix trained on
public data only. ``DPFLAT_NO_SETUP_CACHE=1`` switches the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

VERSION = 1


def enabled() -> bool:
    return os.environ.get("DPFLAT_NO_SETUP_CACHE", "") not in ("1", "true", "yes")


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())


def fingerprint_model(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (frozen backbone included) in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.state_dict(keep_vars=False).items())):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def fingerprint_dataset(ds: Any) -> str:
    """Hash of a tokenised split's tensors (its identity: which examples, in which order)."""
    h = hashlib.sha256()
    if ds is None:
        return "none"
    h.update(str(len(ds)).encode())
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in getattr(ds, "column_names", [])]
    rows = ds[:] if cols else {}  # one formatted batch of every row (a torch-formatted split: tensors)
    for c in cols:
        h.update(c.encode())
        v = rows[c]
        _hash_tensor(h, v if isinstance(v, torch.Tensor) else torch.as_tensor(v))
    return h.hexdigest()


def key(kind: str, parts: dict[str, Any]) -> str:
    blob = json.dumps({"kind": kind, "version": VERSION, **parts}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _path(output_dir: str | Path, k: str) -> Path:
    return Path(output_dir) / ".setup-cache" / f"{k}.pt"


def load(output_dir: str | Path, k: str) -> dict[str, Any] | None:
    if not enabled():
        return None
    p = _path(output_dir, k)
    if not p.is_file():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn or foreign file is a miss, recomputed and overwritten
        return None


def save(output_dir: str | Path, k: str, value: dict[str, Any]) -> None:
    if not enabled():
        return
    p = _path(output_dir, k)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
    os.close(fd)
    torch.save(value, tmp)
    os.replace(tmp, p)  # atomic: concurrent runs see the old file or the new one, never half


__all__ = ["enabled", "fingerprint_dataset", "fingerprint_model", "key", "load", "save"]
