"""Shared by the benchmarks: describe the machine and append a section to RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}")


def start(threads: int | None) -> None:
    """A benchmark's process set-up: offline hub, its torch thread count, quiet libraries."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from dpflat.cli import quiet_libraries

    quiet_libraries()


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def append(title: str, lines: list[str], path: Path = RESULTS) -> str:
    """Append ``### title (date)`` + the lines; returns the section text."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([f"\n### {title} ({now})", "", *lines, ""])
    with open(path, "a") as f:
        f.write(text)
    return text


def publish(title: str, lines: list[str], append_it: bool = True, path: Path = RESULTS) -> None:
    """Print a section; append it to RESULTS.md unless told not to (``--no-append``)."""
    print(title + "\n" + "\n".join(lines), flush=True)
    if append_it:
        append(title, lines, path)
