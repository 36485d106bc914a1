"""Choosing the CPU study regime on the validation split: where do the models learn?

Why (issue 27): the old CLI default (2,000 private examples, 2 epochs, logical batch 128 = 32
DP steps) stops non-private training while its val accuracy is still rising, and under DP the
head does nearly all the learning (the flattening levels act on the prefix). A regime is
*a study regime* when, on the task's validation split:

1. the non-private run reaches its plateau (its best val accuracy in the last third of the run
   is at most ``--plateau`` points above its best before that);
2. DP at ε = 3 costs at least ``--gap`` points of val accuracy against it;
3. the prefix itself learns under DP: putting the DP model's prefix back to its initial values
   costs val accuracy (``val_accuracy_prefix_reset``, recorded by every run);
4. one run takes about 10 minutes on 2 cores (``wall_s`` here is measured at ``--threads``).

Each candidate is ``N×E×B`` (private examples × epochs × logical batch) with optional
``@lr``, ``+dropout`` (the backbone's and the head's dropout on; default off), ``+mM`` (prefix
length M) and ``+readout`` / ``+linear`` (the head; default: the CLI's). Only
validation accuracy is read here: the test split of these runs is never looked at in choosing.

    python benchmarks/bench_regime.py --candidates 2000x2x128,8000x4x256 --out /tmp/regime   # resumable
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

SPEC = re.compile(r"^(\d+)x([\d.]+)x(\d+)(?:@([\d.e-]+))?(\+dropout)?(?:\+m(\d+))?(\+readout|\+linear)?$")


def parse(spec: str) -> dict:
    m = SPEC.match(spec.strip())
    if not m:
        raise SystemExit(f"candidate {spec!r} is not N x E x B[@lr][+dropout][+mM][+readout|+linear], e.g. "
                         "8000x4x256@0.01+readout")
    n, e, b, lr, dropout, m_len, head = m.groups()
    return {"train_size": int(n), "epochs": float(e), "batch_size": int(b), "lr": float(lr) if lr else None,
            "dropout": bool(dropout), "prefix_len": int(m_len) if m_len else None,
            "head": head[1:] if head else None}


def cell_config(spec: str, variant: str, task: str, eps: float, seed: int, out: str, threads: int, evals: int):
    from dpflat.config import RunConfig, apply_variant

    c = parse(spec)
    steps_per_epoch = -(-c["train_size"] // c["batch_size"])
    total = max(1, round(c["epochs"] * steps_per_epoch))
    cfg = apply_variant(RunConfig(), variant, "safe")
    model = {"backbone_dropout": c["dropout"], "head_dropout": 0.1 if c["dropout"] else 0.0}
    if c["prefix_len"]:
        model["prefix_len"] = c["prefix_len"]
    if c["head"]:
        model["head"] = c["head"]
    train = {"epochs": c["epochs"], "batch_size": c["batch_size"], "output_dir": out, "progress": False,
             "num_threads": threads, "seed": seed, "eval_every": max(1, total // evals)}
    if c["lr"]:
        train["lr"] = c["lr"]
    return cfg.replace(data={"task": task, "train_size": c["train_size"]}, model=model,
                       privacy={"epsilon": eps}, train=train)


def run_cell(spec: str, variant: str, a) -> dict:
    from dpflat.runs import RunDir
    from dpflat.train import train

    cfg = cell_config(spec, variant, a.task, a.epsilon, a.seed, a.runs, a.threads, a.evals)
    t, c = time.perf_counter(), time.process_time()
    res = train(cfg)
    rd = RunDir(res["run_dir"])
    curve = [(r["step"], r["eval_accuracy"]) for r in rd.metrics() if "eval_accuracy" in r]
    return {"spec": spec, "variant": variant, "task": a.task, "seed": a.seed, "steps": res["steps"],
            "sigma": res.get("sigma"), "val_accuracy": res["val_accuracy"],
            "val_prefix_reset": res.get("info_val_accuracy_prefix_reset"), "best_step": res["best_step"],
            "curve": curve, "wall_s": res.get("wall_s", time.perf_counter() - t),
            "cpu_s": time.process_time() - c, "examples_per_s": res.get("examples_per_s")}


def plateau_gain(curve: list) -> float:
    """Best val accuracy in the last third of the run minus the best before it (points)."""
    if len(curve) < 3:
        return float("nan")
    cut = curve[-1][0] * 2 / 3
    early = max(acc for s, acc in curve if s <= cut)
    late = max(acc for s, acc in curve if s > cut)
    return 100 * (late - early)


def table(rows: list[dict], a) -> list[str]:
    by = {(r["spec"], r["variant"]): r for r in rows}
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {os.getloadavg()[0]:.1f} at the end (other processes shared "
        f"the cores: `wall` is at {a.threads} thread(s) under that load, `CPU` is the process's own)",
        f"- task {a.task}, seed {a.seed}, ε = {a.epsilon:g} for dp; every figure is **validation** accuracy "
        "(the test split played no part); `prefix reset`: val accuracy of the same model with its prefix put back "
        "to its initial values; `plateau`: best val in the last third minus best before it (points)",
        "",
        "| candidate (N×epochs×batch) | steps | non-private val | plateau (pts) | dp val | gap (pts) | dp prefix reset "
        "| prefix share (pts) | np prefix share (pts) | dp wall s | dp CPU s | dp ex/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in specs:
        np_, dp = by.get((s, "nonprivate")), by.get((s, "dp"))

        def f(r, k, fmt="{:.3f}"):
            return fmt.format(r[k]) if r and r.get(k) is not None else "–"

        gap = f"{100 * (np_['val_accuracy'] - dp['val_accuracy']):.1f}" if np_ and dp else "–"
        share = (f"{100 * (dp['val_accuracy'] - dp['val_prefix_reset']):.1f}"
                 if dp and dp.get("val_prefix_reset") is not None else "–")
        np_share = (f"{100 * (np_['val_accuracy'] - np_['val_prefix_reset']):.1f}"
                    if np_ and np_.get("val_prefix_reset") is not None else "–")
        plat = f"{plateau_gain(np_['curve']):.1f}" if np_ else "–"
        lines.append(f"| {s} | {f(dp or np_, 'steps', '{}')} | {f(np_, 'val_accuracy')} | {plat} | "
                     f"{f(dp, 'val_accuracy')} | {gap} | {f(dp, 'val_prefix_reset')} | {share} | {np_share} | "
                     f"{f(dp, 'wall_s', '{:.0f}')} | {f(dp, 'cpu_s', '{:.0f}')} | {f(dp, 'examples_per_s', '{:.0f}')} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--candidates", default="2000x2x128,8000x4x256,16000x4x512")
    p.add_argument("--variants", default="nonprivate,dp")
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evals", type=int, default=8, help="validation evaluations per run (the curve)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/bench-regime", help="finished cells (JSON, resumable) and run folders")
    p.add_argument("--report-only", action="store_true", help="print the table of the finished cells, train nothing")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    _report.start(a.threads)
    store = Path(a.out)
    store.mkdir(parents=True, exist_ok=True)
    a.runs = str(store / "runs")
    rows = []
    for spec in a.candidates.split(","):
        parse(spec)
        for v in a.variants.split(","):
            f = store / f"{a.task}-s{a.seed}-e{a.epsilon:g}-{spec}-{v}.json"
            if not f.is_file() and not a.report_only:
                r = run_cell(spec, v, a)
                f.write_text(json.dumps(r))
                print(json.dumps({k: r[k] for k in r if k != "curve"}), flush=True)
            if f.is_file():
                rows.append(json.loads(f.read_text()))
    lines = table(rows, a)
    _report.publish("bench_regime: where the models learn (validation split only)", lines, not a.no_append)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
