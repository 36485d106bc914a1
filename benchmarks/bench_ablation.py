"""Ablation of the three flattening levels on SST-2 with the default model (MiniLM-L6).

The grid: nonprivate, dp, dp+awp, dp+layers, dp+distill, dpflat (the last four in
safe and paper mode) x target ε x seeds, through ``dpflat.sweep`` (finished cells are
skipped, so an interrupted benchmark resumes). Prints the mean ± std table, each row
with its guarantee, and appends it to benchmarks/RESULTS.md.

Hyperparameters are fixed in advance (below), not tuned on the eval split that is
reported; with one evaluation at the end of training there is no early selection.

    python benchmarks/bench_ablation.py                  # the CPU-sized grid (~1 h on 2 cores)
    python benchmarks/bench_ablation.py --seeds 0 --epsilons 8 --train-size 256   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

from dpflat.cli import quiet_libraries  # noqa: E402
from dpflat.config import DataConfig, FlatConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig  # noqa: E402
from dpflat.sweep import markdown, summarize, sweep  # noqa: E402

VARIANTS = ["nonprivate", "dp", "dp+awp", "dp+layers", "dp+distill", "dpflat"]


def base_config(a: argparse.Namespace) -> RunConfig:
    """The CPU-sized setting: 1k private examples, one epoch of 16 logical steps."""
    return RunConfig(
        data=DataConfig(task="sst2", data_dir=a.data_dir, max_length=48, train_size=a.train_size,
                        eval_size=a.eval_size, public_size=a.public_size),
        model=ModelConfig(backbone=a.backbone, prefix_len=16),
        privacy=PrivacyConfig(max_grad_norm=1.0),
        flat=FlatConfig(awp_epochs=0.5, n_drop=2, layers_warmup_steps=8, layers_examples=64, layers_directions=1,
                        teacher_epochs=1.0, distill_lambda=0.01),
        train=TrainConfig(epochs=a.epochs, batch_size=64, physical_batch_size=64, lr=1e-2, output_dir=a.output_dir,
                          eval_every=0, checkpoint_every=8, progress=False, num_threads=a.threads),
    )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", default="3,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="safe,paper")
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--eval-size", type=int, default=872)
    p.add_argument("--public-size", type=int, default=512)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--output-dir", default=str(ROOT / "out" / "ablation"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (0: torch's default); 1 avoids thrashing when other jobs share the cores")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    a = p.parse_args(argv)
    quiet_libraries()
    base = base_config(a)
    eps = [float(x) for x in a.epsilons.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    t0, load0 = time.time(), os.getloadavg()[0]
    table = sweep(base, a.variants.split(","), eps, seeds, a.modes.split(","))
    wall = time.time() - t0
    summary = summarize(table)
    md = markdown(summary)
    tsum = table.get("info_teacher_accuracy")
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        "(other processes shared the 2 cores)",
        f"- wall time of this invocation: {wall / 60:.1f} min for {len(table)} cells (finished cells are skipped, "
        "so a resumed sweep reports only the time of the missing ones)",
        f"- setting: SST-2, backbone {a.backbone}, prefix m=16, max_length 48, {a.train_size} private training "
        f"examples, public split {a.public_size} (disjoint), eval = first {a.eval_size} of the GLUE dev set; "
        f"{a.epochs:g} epoch(s), logical batch 64 (Poisson), AdamW lr 1e-2, C=1, RDP accountant, δ=1/N^1.1; "
        "AWP γ=0.01 (safe) / 1e-4 (paper) over the first half; layers: drop 2 of 6 by the indicator "
        "(ρ=0.05, gradient + 1 random direction, 64 examples, 8 warm-up steps); distill λ=0.01, teacher 1 epoch",
        "- accuracy on the eval split after the last step (no early selection, nothing tuned on it)",
    ]
    if tsum is not None and tsum.notna().any():
        lines.append(f"- distillation teachers' accuracy (non-private, on their own data): "
                     f"mean {tsum.mean():.3f} over {int(tsum.notna().sum())} runs")
    lines += ["", md]
    print(md)
    if not a.no_append:
        _report.append("bench_ablation: flattening levels on SST-2, safe vs paper mode", lines)
    return md


if __name__ == "__main__":
    main()
