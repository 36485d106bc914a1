"""Privacy evaluation table: non-private, DP, DP-Flat (safe) and DP-Flat (paper) at ε 3 and 8.

For each cell: task accuracy, membership inference on the run (loss threshold and
calibrated against the run's initial model: best-threshold accuracy, AUC, TPR at 1% FPR,
each with a 95% bootstrap CI; members = the private split, non-members = as many unused
rows of the same train file), the empirical ε lower bound of a one-run canary audit
(Steinke et al. 2023) and the guarantee each run may claim.

Where the runs come from:
- ``--runs-dir out/ablation``: attack finished runs of that output folder (seed
  ``--seed``), as listed in its results.parquet; missing cells are reported as missing
  (or trained with the benchmark's own small config if ``--train-missing``).
- otherwise the cells are trained here with a small config (``--backbone``,
  ``--train-size``, ``--epochs``) into ``--output-dir``.

The canary audit always trains its own small runs (``--audit-*``: by default tiny-bert,
64 private examples + 128 canaries, trained long enough to memorise, δ = 1e-5), one per
cell, with the cell's variant, mode and ε: it bounds that *mechanism* on the audit
config, not the attacked run itself. The bound is loose by construction (one weak
black-box attack); it can refute a claimed ε, never certify one.

Prints a markdown table and appends it to benchmarks/RESULTS.md with machine, date
and command.

    python benchmarks/bench_privacy.py --runs-dir out/ablation
    python benchmarks/bench_privacy.py --backbone tiny-bert --train-size 128 --epochs 100 --lr 0.1 \
        --head-dropout 0 --batch-size 32                 # a few minutes; tiny-bert memorises, accuracy ~0.5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

from dpflat.cli import quiet_libraries  # noqa: E402
from dpflat.config import DataConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig, apply_variant  # noqa: E402

#: (variant, mode) of each row; non-private has no ε
CELLS = [("nonprivate", "safe"), ("dp", "safe"), ("dpflat", "safe"), ("dpflat", "paper")]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default=None, help="attack finished runs of this output folder (e.g. out/ablation)")
    p.add_argument("--train-missing", action="store_true", help="with --runs-dir: train missing cells here")
    p.add_argument("--output-dir", default=str(ROOT / "out" / "privacy"), help="where cells trained here go")
    p.add_argument("--epsilons", default="3,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    # the small config of cells trained here
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--public-size", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--head-dropout", type=float, default=0.1)
    # membership inference
    p.add_argument("--max-examples", type=int, default=512, help="members (= non-members) attacked per run")
    p.add_argument("--bootstrap", type=int, default=1000)
    # canary audit
    p.add_argument("--no-audit", action="store_true")
    p.add_argument("--canaries", type=int, default=128)
    p.add_argument("--audit-backbone", default="tiny-bert")
    p.add_argument("--audit-train-size", type=int, default=64)
    p.add_argument("--audit-epochs", type=float, default=150)
    p.add_argument("--audit-lr", type=float, default=0.1)
    p.add_argument("--audit-delta", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids thrashing on shared cores)")
    p.add_argument("--no-append", action="store_true", help="print only")
    return p.parse_args(argv)


def small_config(a: argparse.Namespace) -> RunConfig:
    """The benchmark's own config for cells trained here (and for --train-missing)."""
    return RunConfig(
        data=DataConfig(task=a.task, data_dir=a.data_dir, max_length=a.max_length, train_size=a.train_size,
                        eval_size=a.eval_size, public_size=a.public_size),
        model=ModelConfig(backbone=a.backbone, prefix_len=16, head_dropout=a.head_dropout,
                          prefix_init="random" if a.backbone.startswith("tiny") else "tokens"),
        privacy=PrivacyConfig(max_grad_norm=1.0),
        train=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, physical_batch_size=a.batch_size, lr=a.lr,
                          output_dir=a.output_dir, eval_every=10**6, checkpoint_every=50, progress=False, seed=a.seed),
    )


def audit_base(a: argparse.Namespace, out: Path) -> RunConfig:
    """The small config the canary audits train (memorises when non-private)."""
    return RunConfig(
        data=DataConfig(task=a.task, data_dir=a.data_dir, max_length=24, train_size=a.audit_train_size, eval_size=64,
                        public_size=64),
        model=ModelConfig(backbone=a.audit_backbone, prefix_len=16, prefix_init="random", head_dropout=0.0),
        privacy=PrivacyConfig(max_grad_norm=1.0, delta=a.audit_delta),
        train=TrainConfig(epochs=a.audit_epochs, batch_size=32, physical_batch_size=32, lr=a.audit_lr,
                          output_dir=str(out), eval_every=10**6, checkpoint_every=10**6, progress=False, seed=a.seed),
    )


def cell_config(base: RunConfig, variant: str, mode: str, eps: float | None) -> RunConfig:
    cfg = apply_variant(base, variant, mode)
    return cfg.replace(privacy={"epsilon": float(eps)}) if eps is not None else cfg


def find_run(table, variant_name: str, eps: float | None, seed: int):
    """Run folder of one cell in a results table (the most recent if several configs match)."""
    if table is None or table.empty:
        return None
    t = table[(table["variant"] == variant_name) & (table["seed"] == seed) & (table["finished"] == True)]  # noqa: E712
    t = t[t["target_epsilon"].isna()] if eps is None else t[(t["target_epsilon"] - eps).abs() < 1e-9]
    if t.empty:
        return None
    for d in reversed(t["run_dir"].tolist()):
        if (Path(d) / "model.safetensors").is_file():
            return Path(d)
    return None


def fmt_ci(v, ci) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def main(argv: list[str] | None = None) -> str:
    a = parse(argv)
    quiet_libraries()
    import pandas as pd
    import torch

    from dpflat.audit import audit_config
    from dpflat.config import variant_name
    from dpflat.mia import attack_run
    from dpflat.runs import load_results
    from dpflat.train import train

    torch.set_num_threads(a.threads)
    t0, load0 = time.time(), os.getloadavg()[0]
    eps_list = [float(x) for x in a.epsilons.split(",") if x.strip()]
    grid = [(v, m, None) for v, m in CELLS if v == "nonprivate"]
    grid += [(v, m, e) for e in eps_list for v, m in CELLS if v != "nonprivate"]
    table = load_results(a.runs_dir) if a.runs_dir else None
    base = small_config(a)
    audit_root = Path(a.output_dir) / "audit"
    rows, sources = [], set()
    for v, mode, eps in grid:
        name = variant_name(v, mode)
        run = find_run(table, name, eps, a.seed) if a.runs_dir else None
        src = f"{a.runs_dir}" if run is not None else None
        if run is None and (not a.runs_dir or a.train_missing):
            res = train(cell_config(base, v, mode, eps))
            run, src = Path(res["run_dir"]), "trained here"
        row = {"variant": name, "target ε": "-" if eps is None else f"{eps:g}"}
        if run is None:
            row.update({"source": "missing"})
        else:
            sources.add(src)
            print(f"[{time.time() - t0:6.0f} s] attacking {run}", flush=True)
            r = attack_run(run, max_per_side=a.max_examples, n_bootstrap=a.bootstrap, seed=a.seed)
            res = pd.read_json(run / "result.json", typ="series")
            row.update({
                "source": src, "accuracy": float(res["accuracy"]), "n": r.n_members,
                "mia_acc": fmt_ci(r.loss.accuracy, r.loss.accuracy_ci), "auc": fmt_ci(r.loss.auc, r.loss.auc_ci),
                "tpr1": fmt_ci(r.loss.tpr_at_1_fpr, r.loss.tpr_at_1_fpr_ci),
                "cal_auc": fmt_ci(r.calibrated.auc, r.calibrated.auc_ci) if r.calibrated else "-",
                "guarantee": r.guarantee,
                "ε (run)": f"{r.claimed_epsilon:.2f}" if r.claimed_epsilon is not None else "none",
                "δ (run)": f"{r.delta:.1e}" if r.delta else "-",
                "run_id": run.name,
            })
        if not a.no_audit:
            print(f"[{time.time() - t0:6.0f} s] canary audit of {name} ε={eps}", flush=True)
            au = audit_config(cell_config(audit_base(a, audit_root), v, mode, eps), canaries=a.canaries, seed=a.seed)
            row.update({
                "audit ε_lb": f"{au.epsilon_lower_bound:.2f}",
                "audit claim": f"{au.claimed_epsilon:.2f}" if au.claimed_epsilon is not None else "none",
                "audit canary AUC": f"{au.canary_auc:.2f}",
            })
        rows.append(row)
    wall = time.time() - t0

    cols = ["variant", "target ε", "accuracy", "mia_acc", "auc", "tpr1", "cal_auc", "audit ε_lb", "audit claim",
            "guarantee", "ε (run)", "δ (run)"]
    head = ["variant", "target ε", "accuracy", "MIA accuracy (best thr.) [95% CI]", "MIA AUC [95% CI]",
            "TPR@1%FPR [95% CI]", "calibrated AUC [95% CI]", "audit ε lower bound", "audit run's claimed ε",
            "guarantee", "run's claimed ε", "run's δ"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "missing" if r.get("source") == "missing" and c not in ("variant", "target ε") else "-")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        md.append("| " + " | ".join(cells) + " |")
    md_text = "\n".join(md)
    n_members = sorted({r["n"] for r in rows if "n" in r})
    src_text = ", ".join(sorted(sources)) or "none"
    if a.runs_dir and src_text != "trained here":
        setting = f"runs attacked: finished seed-{a.seed} runs of `{a.runs_dir}` (their own configs; see run ids below)"
    else:
        setting = (f"runs attacked: trained here: {a.task}, backbone {a.backbone}, {a.train_size} private examples, "
                   f"public {a.public_size}, {a.epochs:g} epochs, batch {a.batch_size} (Poisson), AdamW lr {a.lr}, "
                   f"head dropout {a.head_dropout}, prefix m=16, max_length {a.max_length}, C=1, "
                   f"RDP, δ=1/N^1.1, eval only after the last step")
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        "(other processes shared the cores)",
        f"- wall time: {wall / 60:.1f} min",
        f"- {setting}; sources: {src_text}",
        f"- MIA: members = the run's private split (subsampled to {a.max_examples}; here n = {n_members} per side), "
        "non-members = as many unused rows of the same train file; loss-threshold score; calibrated = loss minus "
        f"the loss of the run's model at initialisation; {a.bootstrap} bootstrap resamples (seeded); best-threshold "
        "accuracy is fit on the scored examples, so its chance level is ~0.5 + 0.6/sqrt(n), not 0.5",
    ]
    if not a.no_audit:
        lines.append(
            f"- canary audit (one run, Steinke et al. 2023; 95% confidence, Bonferroni over 9 (k+, k-) guesses): its "
            f"own runs with the cell's variant/mode/ε on {a.audit_backbone}, {a.audit_train_size} private examples + "
            f"{a.canaries} mislabeled canaries (each included with prob. 1/2), {a.audit_epochs:g} epochs, lr "
            f"{a.audit_lr}, δ = {a.audit_delta:g}; 'audit run's claimed ε' is that run's own ε. A loose lower bound: "
            "it can refute a claim, never certify one")
    lines += ["", md_text, "", "run ids: " + "; ".join(f"{r['variant']} {r['target ε']}: {r.get('run_id', 'missing')}" for r in rows)]
    print("\n".join(lines))
    if not a.no_append:
        _report.append("bench_privacy: membership inference and canary audit", lines)
    return md_text


if __name__ == "__main__":
    main()
