"""The safe teacher's validation accuracy against the size of the public split.

Why (issue 27): distillation pulls the DP prefix toward a teacher trained on public data, so the
teacher must have learned its task; until 2026-12-07 it was 1 epoch over 500 public examples
(4 optimizer steps, val accuracy 0.49-0.74 on SST-2). The teacher is now a fit to its val
plateau (``dpflat.flat._fit``), and this benchmark gives the curve the default public size is
read from: for each size, the teacher fit of a CLI-default DP-Flat run (its settings:
``--teacher-epochs`` budget, ``--teacher-batch-size``, ``--teacher-patience``, early stopping on
the val split) on that many public examples, with its val accuracy, steps and seconds. The
plateau is where one more doubling of the public split gains less than ``--flat-gain`` points.
Validation split only; nothing here reads the test split.

    python benchmarks/bench_teacher.py --sizes 250,500,1000,2000,4000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402


def one(task: str, size: int, seed: int, over: dict) -> dict:
    import torch

    from dpflat.config import RunConfig
    from dpflat.flat._fit import fit_to_plateau, steps_for_epochs
    from dpflat.models import build_model
    from dpflat.session import prepare_data

    cfg = RunConfig().replace(data={"task": task, "public_size": size}, train={"seed": seed}, **over)
    card, _, tokd = prepare_data(cfg)
    model = build_model(cfg.model, len(card.labels), seed=seed, task=card.name)
    c, tc = cfg.flat, cfg.train
    public, val = tokd["public"], tokd["val"]
    steps = steps_for_epochs(c.teacher_epochs, len(public), c.teacher_batch_size)
    t, cpu = time.perf_counter(), time.process_time()
    _, r = fit_to_plateau(model, public, val, max_steps=steps, batch_size=c.teacher_batch_size,
                          lr=c.teacher_lr or tc.lr, device=torch.device("cpu"), seed=seed + 17,
                          eval_every=c.teacher_eval_every, patience=c.teacher_patience,
                          eval_batch_size=tc.eval_batch_size)
    labels = torch.as_tensor(val[:]["labels"])
    return {"task": task, "size": len(public), "seed": seed, "val_accuracy": r.val_accuracy, "steps": r.steps,
            "best_step": r.best_step, "budget": steps, "stopped": r.stopped, "curve": r.curve,
            "zero_step": r.curve[0][1], "majority": float(torch.bincount(labels).max() / len(labels)),
            "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu, "head": cfg.model.head}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--sizes", default="250,500,1000,2000,4000")
    p.add_argument("--seeds", default="0")
    p.add_argument("--config", default="{}", help="JSON section overrides of the run config (e.g. the head)")
    p.add_argument("--flat-gain", type=float, default=1.0, help="points per doubling below which the curve is flat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench-teacher"))
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    _report.start(a.threads)
    over = json.loads(a.config)
    tag = "".join(f"-{k}" for k in sorted(over))
    store = Path(a.out)
    store.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for size in [int(s) for s in a.sizes.split(",")]:
            f = store / f"{a.task}-s{seed}-n{size}{tag}.json"
            if not f.is_file():
                r = one(a.task, size, seed, over)
                f.write_text(json.dumps(r))
                print({k: v for k, v in r.items() if k != "curve"}, flush=True)
            rows.append(json.loads(f.read_text()))
    sizes = sorted({r["size"] for r in rows})
    mean = {n: sum(r["val_accuracy"] for r in rows if r["size"] == n) / sum(r["size"] == n for r in rows)
            for n in sizes}
    plateau = next((n for n, m in zip(sizes, sizes[1:]) if 100 * (mean[m] - mean[n]) < a.flat_gain), sizes[-1])
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {os.getloadavg()[0]:.1f} at the end (the cores were shared)",
        f"- what: the safe teacher's fit of a CLI-default DP-Flat run ({a.task}, head `{rows[0]['head']}`"
        f"{', config ' + json.dumps(over) if over else ''}) on public splits of each size: early stopping on the "
        "500-example val split; `step 0` is the model before the fit; majority class of val "
        f"{rows[0]['majority']:.3f}",
        "",
        "| public examples | seed | teacher val acc | step 0 val acc | steps (budget) | best step | stopped | wall s | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        *[f"| {r['size']} | {r['seed']} | {r['val_accuracy']:.3f} | {r['zero_step']:.3f} | {r['steps']} ({r['budget']}) | "
          f"{r['best_step']} | {r['stopped']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |" for r in rows],
        "",
        f"- mean val accuracy by size: {', '.join(f'{n}: {mean[n]:.3f}' for n in sizes)}; the curve flattens "
        f"(a doubling gains < {a.flat_gain:g} point) from **{plateau}** public examples",
    ]
    _report.publish("bench_teacher: the safe teacher's val accuracy against the public split's size", lines,
                    not a.no_append)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
