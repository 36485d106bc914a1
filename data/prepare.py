#!/usr/bin/env python
"""Copy (or just check) the offline task files and print a per-task summary.

    python data/prepare.py                      # ../shared/data -> data/, verify, summarise
    python data/prepare.py --dest ~/dpflat-data # another place (then set DPFLAT_DATA_DIR)
    python data/prepare.py --check              # copy nothing; verify and summarise data/
    python data/prepare.py --tasks sst2,trec

Files are verified against the sha256 column of MANIFEST.txt when one is present
(the source's, copied along), then every task is loaded with ``dpflat.data.load_raw``
so that a file the loader cannot read fails here rather than in a training run.
Exit status: 0 when every selected task is present, verified and loadable; else 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing

from dpflat.data import TASKS, DataError, TaskCard, column, load_raw  # noqa: E402

DEFAULT_SRC = REPO.parent / "shared" / "data"
DEFAULT_DEST = REPO / "data"
MANIFEST = "MANIFEST.txt"
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64})\s+(\d+)\s+(\S+)\s*$")


@dataclass
class TaskReport:
    card: TaskCard
    status: str = "ok"  # ok | copied | missing | bad sha256 | unloadable
    verified: str = "-"  # sha256 | no manifest entry
    problems: list[str] = field(default_factory=list)
    sizes: tuple[int, int] | None = None
    counts: dict[str, int] = field(default_factory=dict)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, tuple[str, int]]:
    """``relative path -> (sha256, bytes)`` from the manifest's checksum table, if any."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _MANIFEST_LINE.match(line.strip())
        if m:
            entries[m.group(3)] = (m.group(1), int(m.group(2)))
    return entries


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy via a temp file + rename, so an interrupted copy never leaves a torn file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; data files are meant to be shared
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sync_task(card: TaskCard, src: Path | None, dest: Path, manifest: dict, report: TaskReport) -> None:
    """Copy the task's files from ``src`` (skipped when ``src`` is None) and verify them in ``dest``."""
    verified = []
    for fname in card.files:
        rel = f"{card.folder}/{fname}"
        target = dest / rel
        want = manifest.get(rel, (None, None))[0]
        if src is not None:
            origin = src / rel
            if not origin.is_file():
                report.problems.append(f"missing {origin}")
                continue
            if not target.is_file() or sha256(target) != sha256(origin):
                copy_atomic(origin, target)
                report.status = "copied"
        if not target.is_file():
            report.problems.append(f"missing {target}")
            continue
        if want is not None:
            if sha256(target) != want:
                report.problems.append(f"bad sha256 {target}")
                continue
            verified.append(rel)
    if report.problems:
        report.status = "missing" if all(p.startswith("missing") for p in report.problems) else "bad sha256"
    if report.problems:
        report.verified = "failed"
    else:
        report.verified = "sha256" if len(verified) == len(card.files) else "no manifest entry"


def summarise(card: TaskCard, dest: Path, report: TaskReport) -> None:
    """Load through dpflat itself: the table then shows what training will see."""
    try:
        raw = load_raw(card, dest)
    except DataError as exc:
        report.status, report.problems = "unloadable", [*report.problems, str(exc)]
        return
    report.sizes = (len(raw["train"]), len(raw["eval"]))
    names = raw["train"].features["label"].names
    counts = Counter(column(raw["train"], "label"))
    report.counts = {name: counts.get(i, 0) for i, name in enumerate(names)}


def print_table(reports: list[TaskReport], dest: Path) -> None:
    header = ("task", "status", "train", "eval", "classes", "train label counts", "metric", "checked")
    rows = [header]
    for r in reports:
        train, eval_ = (str(n) for n in r.sizes) if r.sizes else ("-", "-")
        counts = ", ".join(f"{k}:{v}" for k, v in r.counts.items()) or "-"
        rows.append((r.card.name, r.status, train, eval_, str(r.card.num_labels), counts, r.card.metric, r.verified))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"data dir: {dest}")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in reports:
        for p in r.problems:
            print(f"  ! {r.card.name}: {p}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"where the files come from (default {DEFAULT_SRC})")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"where they go (default {DEFAULT_DEST})")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all)")
    p.add_argument("--check", action="store_true", help="copy nothing; verify and summarise --dest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        print(f"unknown task(s) {unknown}; choose from: {', '.join(TASKS)}", file=sys.stderr)
        return 1
    src, dest = args.src.expanduser().resolve(), args.dest.expanduser().resolve()
    copying = not args.check and src != dest
    if copying and not src.is_dir():
        print(f"source {src} does not exist (use --src, or --check to verify --dest only)", file=sys.stderr)
        return 1
    if copying and (src / MANIFEST).is_file():
        copy_atomic(src / MANIFEST, dest / MANIFEST)
    manifest = read_manifest(dest) or (read_manifest(src) if src.is_dir() else {})
    reports = []
    for name in names:
        report = TaskReport(TASKS[name])
        sync_task(report.card, src if copying else None, dest, manifest, report)
        if not report.problems:
            summarise(report.card, dest, report)
        reports.append(report)
    print_table(reports, dest)
    return 0 if all(not r.problems for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
