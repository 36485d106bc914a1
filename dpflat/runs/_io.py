"""Crash-safe writes of the run folders and their one-line errors.

Why one place: every file of a run folder and the results table is written to a temporary
name and moved into place with ``os.replace`` (atomic on POSIX), so a run killed at any
instant leaves the old file or the new one, never half of one; and a failed write (a full
disk, a read-only folder) reads as one line naming the file, whichever library raised it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..config import ConfigError
from .names import CONFIG


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is (corrupt file, missing checkpoint); one line with the way out."""


def retrain_hint(path: Path) -> str:
    return f"retrain it with `python -m dpflat train --config {path / CONFIG} --no-resume`"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then move into place; a failed write names ``path`` and leaves no .tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError as e:  # a full disk fails at close, with no file name on the error
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None
    os.replace(tmp, path)


def short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:160] if msg else type(e).__name__


def write_error(e: BaseException, path: Path) -> OSError:
    """A failed write as an OSError naming the file; a full disk says so (torch.save hides ENOSPC)."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror, str(path))
    try:
        full = shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return OSError(errno.EIO, f"write failed ({short(e)})", str(path))


def os_error(e: OSError, path: Path) -> Exception:
    """An OSError of making/writing ``path`` as one line naming it."""
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
        raise os_error(e, root) from None
    if not os.access(root, os.W_OK):
        raise ConfigError(f"cannot write to {root}: permission denied; choose a writable --output-dir")
    return made


__all__ = ["RunFolderError", "atomic_write_text", "os_error", "prepare_output_dir", "retrain_hint", "short",
           "write_error"]
