"""Duplicate counts per task: what content-disjoint splitting removes (issue #14, item 5).

For every task in the data folder, with the default sizes (``DataConfig()``: 2,000 private,
500 public, 500 val, the whole eval file as test) and seed 0: the test file's rows whose
normalised text also occurs in the train file, the train rows removed for occurring in
test, and the rows removed from private for sharing a text with public or val. For
comparison, "before" counts the private rows sharing a normalised text with public under
the previous row-index-only split (same permutation, public first, no val).

    python benchmarks/bench_splits.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import _report  # noqa: E402


def before_public_private(raw, seed: int, public: int, train_size: int) -> int:
    """Private rows whose text is also public under the old split (row-disjoint only)."""
    import numpy as np

    from dpflat import splits as S

    keys = S.normalized_keys(raw["train"])
    order = np.random.default_rng([seed, 0]).permutation(len(keys))
    pub = {keys[i] for i in order[:public]}
    return sum(keys[i] in pub for i in order[public:public + train_size])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    from dpflat import data as D
    from dpflat import splits as S
    from dpflat.config import DataConfig

    t0 = time.time()
    lines = ["| task | train rows | test rows | test rows also in train | train rows removed (text in test) | "
             "private rows removed (text in public) | private rows removed (text in val) | private∩public before |",
             "|---|---|---|---|---|---|---|---|"]
    for name, card in D.TASKS.items():
        if D.resolve_data_dir(card, a.data_dir if (Path(a.data_dir) / card.folder).is_dir() else None) is None:
            continue
        raw = D.load_raw(card, a.data_dir)
        dc = DataConfig(task=name)
        s = S.splits_for_config(raw, dc, a.seed)
        o = s.overlap
        old = before_public_private(raw, a.seed, int(dc.public_size), dc.train_size)
        lines.append(f"| {name} | {len(raw['train'])} | {len(raw['eval'])} | {o['test_in_train']} | {o['train_test']} "
                     f"| {o['public_private']} | {o['val_private']} | {old} |")
    head = [f"- command: `{_report.command()}`", f"- machine: {_report.machine()}; {time.time() - t0:.0f} s",
            "- default sizes (2,000 private, 500 public, 500 val, whole eval file = test), seed 0; text normalised "
            "by NFKC, lower case, collapsed whitespace, punctuation stripped at the ends (pairs: both sides); "
            "after removal every pair of private / public / val / test shares 0 normalised texts. \"removed\" "
            "counts rows drawn from the train file's permutation until each split has its size (the removed rows "
            "are not used), so they exceed what the default 2,000 private rows would have held",
            "", *lines]
    print("\n".join(head))
    if not a.no_append:
        _report.append("bench_splits: duplicates removed by content-disjoint splits, per task", head)


if __name__ == "__main__":
    main()
