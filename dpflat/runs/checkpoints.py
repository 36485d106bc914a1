"""The checkpoints of a run folder: written crash-safe, verified on read, the previous one kept.

A checkpoint is a folder ``ckpt-<step>`` holding the trainable tensors and the private
state (optimizer, secret generators, ledger counts). It becomes current only when the
``LATEST`` pointer moves to it, so a run killed at any instant leaves either the old or
the new checkpoint, never half of one. The previous checkpoint is kept too: one that
reads back truncated or non-finite is reported (which file) and the one before it is used.
``RunDir`` is the only caller (``save_checkpoint``, ``checkpoints``, ``latest_checkpoint``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import warn
from ._io import RunFolderError, atomic_write_text, retrain_hint, short, write_error
from .names import CHECKPOINT_PREFIX, CHECKPOINT_STATE, CHECKPOINT_TRAINABLE, LATEST


def save(folder: Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``ckpt-<step>``, point ``LATEST`` to it, keep it and the newest earlier one."""
    ck = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = folder / f".{CHECKPOINT_PREFIX}{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / CHECKPOINT_TRAINABLE))
        torch.save(state, tmp / CHECKPOINT_STATE)
    except (OSError, RuntimeError) as e:  # a full disk reads "unexpected pos 64 vs 0" from torch.save
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, tmp.parent / ck.name) from None
    shutil.rmtree(ck, ignore_errors=True)
    os.replace(tmp, ck)
    atomic_write_text(folder / LATEST, ck.name)
    # keep this one and the newest earlier one (the fallback when this one reads back corrupt);
    # later-numbered ones belong to an abandoned trajectory (--no-resume) and go
    older = [c for c in listed(folder) if step_of(c) < step]
    keep = {ck.name, older[-1].name} if older else {ck.name}
    for old in listed(folder):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def listed(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    return sorted((p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and step_of(p) >= 0), key=step_of)


def latest(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that reads back whole and finite; None when there is none to resume.

    A corrupt one (truncated file, NaN weights) is named on stderr and the previous
    one is used; with no good one left, or ``LATEST`` pointing to nothing, the run
    stops with one line rather than silently starting over.
    """
    ptr = folder / LATEST
    cks = listed(folder)
    if not ptr.exists():
        if not cks:
            return None
        name = cks[-1].name  # killed between the checkpoint's move and the pointer's
    else:
        name = ptr.read_text().strip()
    ck = folder / name
    candidates = [c for c in cks if step_of(c) < step_of(ck)][::-1]
    if step_of(ck) < 0 or not ck.is_dir():
        if not candidates:
            raise RunFolderError(f"{ptr} points to {name}, which is missing, and no earlier checkpoint is left: "
                                 f"{retrain_hint(folder)} (or restore {name})")
        warn(f"{ptr} points to {name}, which is missing; resuming from {candidates[0].name}")
    else:
        candidates.insert(0, ck)
    problem = ""
    for c in candidates:
        try:
            return _read(c)
        except _BadCheckpoint as e:
            problem = str(e)
            if c is not candidates[-1]:
                warn(f"{problem}; resuming from the previous checkpoint instead")
    raise RunFolderError(f"{problem}, and no earlier good checkpoint is left: {retrain_hint(folder)}")


def step_of(p: Path) -> int:
    """The step of a checkpoint folder; -1 for a name that is not one."""
    try:
        return int(p.name.removeprefix(CHECKPOINT_PREFIX))
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


def _read(ck: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Both files of a checkpoint, or ``_BadCheckpoint`` naming the file that is missing, cut or non-finite."""
    tf, sf = ck / CHECKPOINT_TRAINABLE, ck / CHECKPOINT_STATE
    for f in (tf, sf):
        if not f.is_file():
            raise _BadCheckpoint(f"{f} is missing")
    try:
        trainable = load_file(str(tf))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... for a cut or garbage file
        raise _BadCheckpoint(f"{tf} is corrupt ({short(e)})") from None
    bad = [k for k, v in trainable.items() if _nonfinite(v)]
    if bad:
        raise _BadCheckpoint(f"{tf} holds non-finite weights ({bad[0]})")
    try:
        state = torch.load(sf, weights_only=False)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError for a cut file
        raise _BadCheckpoint(f"{sf} is corrupt ({short(e)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise _BadCheckpoint(f"{sf} is not a checkpoint state")
    if _nonfinite(state):
        raise _BadCheckpoint(f"{sf} holds non-finite values (optimizer state)")
    return trainable, state


__all__ = ["latest", "listed", "save", "step_of"]
