"""How much of the encoder's work is padding: positions computed per real token, per split.

The splits are tokenised with ``padding="max_length"``, so every batch is computed at full
width. This counts, without running a model, the positions per real token of (a) batches as
they are, (b) each batch cut to its longest example, (c) each batch sorted by length into
groups of ``--group`` with each group cut to its longest (what ``landscape.rebatch_by_length``
does for the figures; for training it would be the physical batches of a Poisson batch).
Training batches are Poisson draws of expected size ``--batch-size`` from the private split;
the other splits are read in order. A planning figure: compute is roughly linear in
positions for these short sequences, and attention grows faster.

    python benchmarks/bench_padding.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import _report  # noqa: E402


def positions(lengths: np.ndarray, width: int, group: int) -> tuple[float, float, float]:
    """(as is, cut to the longest, grouped by length and cut) positions of one batch."""
    s = np.sort(lengths)
    grouped = sum(len(s[i:i + group]) * int(s[i:i + group].max()) for i in range(0, len(s), group))
    return len(s) * width, len(s) * int(s.max()), grouped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,qnli")
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--draws", type=int, default=200, help="Poisson batches drawn from the private split")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    _report.start(None)
    from dpflat.config import DataConfig, RunConfig
    from dpflat.train import prepare_data

    lines = ["| task | split | rows | max_length | mean real length | positions per real token: as is | "
             "cut to the batch's longest | grouped by length, cut |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
        cfg = RunConfig(data=DataConfig(data_dir=a.data_dir, task=task))
        tokd = next(x for x in prepare_data(cfg) if isinstance(x, dict) and "private" in x)
        for split in ("private", "public", "val", "eval"):
            if split not in tokd or len(tokd[split]) == 0:
                continue
            mask = np.asarray(tokd[split]["attention_mask"])
            lengths, width = mask.sum(1), mask.shape[1]
            if split == "private":  # Poisson batches, as DP training draws them (a fixed seed: a planning figure)
                rng = np.random.default_rng(0)
                q = a.batch_size / len(lengths)
                batches = [lengths[rng.random(len(lengths)) < q] for _ in range(a.draws)]
            else:
                batches = [lengths[i:i + a.batch_size] for i in range(0, len(lengths), a.batch_size)]
            tot = np.sum([positions(b, width, a.group) for b in batches if len(b)], axis=0)
            real = sum(int(b.sum()) for b in batches)
            lines.append(f"| {task} | {split} | {len(lengths)} | {width} | {lengths.mean():.1f} | {tot[0] / real:.2f} "
                         f"| {tot[1] / real:.2f} | {tot[2] / real:.2f} |")
    head = [f"- command: `{_report.command()}`", f"- machine: {_report.machine()}",
            f"- what: batches of {a.batch_size} (private: {a.draws} Poisson draws of expected size {a.batch_size}); "
            f"groups of {a.group}; the CLI-default data sizes", "", *lines]
    title = "bench_padding: encoder positions per real token, as padded and regrouped"
    _report.publish(title, head, not a.no_append)


if __name__ == "__main__":
    main()
