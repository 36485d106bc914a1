"""The foundation check: `python -m dpflat train --task sst2` with the CPU-sized defaults.

Runs the CLI exactly as a user would (non-private, ε=8, ε=3; same data subset and
seed), times each command, and compares accuracy on the SST-2 dev set with the
majority class of that same dev set. Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench_default.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _report  # noqa: E402

RUNS = [("non-private", ["--no-dp"]), ("ε=8", ["--epsilon", "8"]), ("ε=3", ["--epsilon", "3"])]


def majority_rate(data_dir: Path) -> tuple[float, int]:
    """Share of the most frequent label in the SST-2 dev file (the eval split by default)."""
    rows = (data_dir / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    labels = [r.rsplit("\t", 1)[-1] for r in rows if r.strip()]
    return Counter(labels).most_common(1)[0][1] / len(labels), len(labels)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(ROOT / "out" / "default"))
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    env = {**os.environ, "DPFLAT_DATA_DIR": a.data_dir, "HF_HUB_OFFLINE": "1"}
    maj, n_dev = majority_rate(Path(a.data_dir))
    rows = []
    load0 = os.getloadavg()[0]
    for name, flags in RUNS:
        cmd = [sys.executable, "-m", "dpflat", "train", "--task", "sst2", *flags, "--output-dir", a.output_dir,
               "--no-progress"]
        t0 = time.time()
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, " ".join(["python -m dpflat train --task sst2", *flags]), res, wall))
    lines = [
        f"- command: `{_report.command()}` (each row runs the CLI command shown, with `--output-dir` and `--no-progress`)",
        f"- machine: {_report.machine()}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        "- CPU-sized defaults: MiniLM-L6 prefix model (m=16), 2000 private SST-2 training examples, public 500, "
        "2 epochs, logical batch 128 (Poisson), AdamW lr 2e-2, max_length 64, C=1, RDP, δ=1/N^1.1; "
        f"eval = the whole SST-2 dev set ({n_dev} sentences), best of the per-epoch evaluations",
        f"- majority class of that dev set: {maj:.4f}",
        "",
        "| run | command | accuracy | margin over majority | ε claimed | guarantee | σ | steps | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cmd, r, wall in rows:
        eps = "—" if r.get("epsilon") is None else f"{r['epsilon']:.2f}"
        sigma = "—" if r.get("sigma") is None else f"{r['sigma']:.3f}"
        lines.append(f"| {name} | `{cmd}` | {r['accuracy']:.4f} | {r['accuracy'] - maj:+.4f} | {eps} | "
                     f"{r['guarantee']} | {sigma} | {r['steps']} | {wall / 60:.1f} min |")
    print("\n".join(lines))
    if not a.no_append:
        _report.append("bench_default: `python -m dpflat train --task sst2` with the CPU-sized defaults", lines)


if __name__ == "__main__":
    main()
