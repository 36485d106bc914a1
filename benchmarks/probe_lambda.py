"""One dp+distill (safe) run at the CLI defaults for a given distillation weight λ, on val: how the
default λ was chosen (RESULTS.md, 2026-12-07). SST-2, ε = 3, seed 0, one torch thread; prints the
run's val accuracy, the teacher's and the prefix-reset val accuracy. The test split is read once
at the run's end, as in every run, and plays no part in the choice.

    python benchmarks/probe_lambda.py 1.0 --out /tmp/lamprobe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    import torch

    from dpflat.cli import quiet_libraries
    from dpflat.config import RunConfig, apply_variant
    from dpflat.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lam", type=float)
    p.add_argument("--out", default="/tmp/lamprobe")
    p.add_argument("--epsilon", type=float, default=3.0)
    a = p.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    cfg = apply_variant(RunConfig(), "dp+distill", "safe").replace(
        privacy={"epsilon": a.epsilon}, flat={"distill_lambda": a.lam},
        train={"output_dir": a.out, "progress": False, "eval_every": 32})
    r = train(cfg)
    got = {k: r.get(k) for k in ("val_accuracy", "info_teacher_val_accuracy", "info_teacher_steps",
                                 "info_val_accuracy_prefix_reset", "wall_s", "setup_s")} | {"lambda": a.lam}
    print("RESULT", json.dumps(got))
    return got


if __name__ == "__main__":
    main()
