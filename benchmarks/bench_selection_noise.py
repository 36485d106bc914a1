"""How stable DP-Flat's layer selection is: the kept layers under reseeding of everything but the data.

Why: a layer ranking is an input of the cross-layer level; it must be a property of the
landscape, not a draw of the selector's own randomness. Until 2026-12-05 the scorer was a
30-step warm-up with dropout on, and 4 reseeds of only its dropout gave 3 different keep-masks
(RESULTS.md, that date). The selector now scores a fit to its validation plateau with dropout
off (``--layers-scorer plateau``). This benchmark runs the layer selection of a DP-Flat (safe)
run at the CLI defaults ``--reseeds`` times on the same data (the same public, val and private
splits, fixed by the run's seed), changing only the selector's own seeds:

- the scorer fit's seed (its initial shuffle of the public split),
- the seed of the indicator's random directions.

Reseed 0 is the shipped selection. ``--scorer warmup`` measures the old fixed-steps scorer
(dropout off) for comparison. Each reseed runs in a fresh output dir (the setup cache would
answer otherwise) as ``train(cfg, max_steps=1)``; what is reported comes from the selection
itself: keep-mask, S per greedy round, the scorer's val accuracy and the setup's CPU seconds.
Resumable: finished reseeds are stored in ``--out`` and skipped. With ``--fit-cache DIR`` each
reseed trains in ``DIR/r<k>`` kept across calls, so its scorer fit (which does not depend on the
indicator's settings) is read from the setup cache and only the selection is redone: the way to
compare indicator settings on the same five fits (``setup CPU s`` is then not the cold cost).

    python benchmarks/bench_selection_noise.py --threads 1 --reseeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

#: added to the selector's seeds per reseed (large: no overlap with the run's own seed offsets)
RESEED_STRIDE = 1_000


def one(task: str, seed: int, reseed: int, scorer: str, threads: int, extra: dict,
        fit_cache: str | None = None) -> dict:
    import torch

    import dpflat.flat.layers as L
    from dpflat.config import RunConfig, apply_variant
    from dpflat.train import train

    torch.set_num_threads(threads)
    orig_fit, orig_warm, orig_gd = L.level_fit, L.fit_to_plateau, L.greedy_drop
    got: dict = {}
    shift = reseed * RESEED_STRIDE

    def fit(ctx, data, **kw):
        kw["seed"] += shift
        out = orig_fit(ctx, data, **kw)
        got["scorer_val_accuracy"], got["scorer_steps"] = out[1].val_accuracy, out[1].steps
        return out

    def warm(model, data, val, **kw):
        kw["seed"] += shift
        return orig_warm(model, data, val, **kw)

    def gd(model, batches, n_drop, rho, n_random, seed, *a, **kw):
        t = time.process_time()
        keep, trace = orig_gd(model, batches, n_drop, rho, n_random, seed + shift, *a, **kw)
        got["greedy_cpu_s"] = time.process_time() - t
        got["keep"] = ",".join(str(i) for i, k in enumerate(keep) if k)
        got["S"] = [round(float(r["S"]), 4) for r in trace]
        got["candidates"] = [{str(k): round(float(v), 4) for k, v in r["candidates"].items()} for r in trace[1:]]
        return keep, trace

    L.level_fit, L.fit_to_plateau, L.greedy_drop = fit, warm, gd
    try:
        if fit_cache:
            out = str(Path(fit_cache) / f"{task}-s{seed}-{scorer}-r{reseed}")
            Path(out).mkdir(parents=True, exist_ok=True)
        else:
            out = tempfile.mkdtemp(prefix="bench-selnoise-")
        cfg = apply_variant(RunConfig(), "dp+layers", "safe").replace(
            data={"task": task}, privacy={"epsilon": 3.0}, flat={"layers_scorer": scorer, **extra},
            train={"output_dir": out, "progress": False, "num_threads": threads, "seed": seed})
        t = time.process_time()
        train(cfg, max_steps=1)
        got["setup_cpu_s"] = time.process_time() - t  # selection + one DP step + data loading
    finally:
        L.level_fit, L.fit_to_plateau, L.greedy_drop = orig_fit, orig_warm, orig_gd
    return {"task": task, "seed": seed, "reseed": reseed, "scorer": scorer, **got}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=0, help="the run's public seed (splits): fixed across reseeds")
    p.add_argument("--reseeds", type=int, default=5)
    p.add_argument("--scorer", default="plateau", choices=["plateau", "warmup"])
    p.add_argument("--flat", default="{}", help="JSON of flat-section overrides (e.g. more directions)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench-selection-noise"),
                   help="folder of finished reseeds (resumable)")
    p.add_argument("--fit-cache", default=None,
                   help="keep each reseed's run folder here: its scorer fit is reused across indicator settings")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    _report.start(a.threads)
    extra = json.loads(a.flat)
    tag = "".join(f"-{k}{v}" for k, v in sorted(extra.items()))
    store = Path(a.out)
    store.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(a.reseeds):
        f = store / f"{a.task}-s{a.seed}-{a.scorer}{tag}-r{r}.json"
        if not f.is_file():
            res = one(a.task, a.seed, r, a.scorer, a.threads, extra, a.fit_cache)
            f.write_text(json.dumps(res))
            print(res, flush=True)
        rows.append(json.loads(f.read_text()))
    masks = Counter(r["keep"] for r in rows)
    mode, n_mode = masks.most_common(1)[0]
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {os.getloadavg()[0]:.1f} at the end "
        "(other processes share the 2 cores: CPU seconds are the process's own)",
        f"- what: the layer selection of a DP-Flat (safe) run at the CLI defaults ({a.task}, seed {a.seed}; scorer "
        f"`{a.scorer}`{', flat ' + json.dumps(extra) if extra else ''}), reseeded {a.reseeds} times: only the "
        "scorer fit's seed and the indicator directions' seed change (reseed 0 = the shipped selection); the data "
        "splits are the same in every row",
        "",
        "| reseed | keep layers | S per greedy round | scorer val acc | scorer steps | greedy CPU s | setup CPU s |",
        "|---:|---|---|---:|---:|---:|---:|",
        *[f"| {r['reseed']} | {r['keep']} | {', '.join(f'{s:.3g}' for s in r['S'])} | "
          f"{r.get('scorer_val_accuracy', float('nan')):.3f} | {r.get('scorer_steps', '–')} | "
          f"{r['greedy_cpu_s']:.0f} | {r['setup_cpu_s']:.0f} |" for r in rows],
        "",
        f"- the most frequent keep-mask ({mode}) in **{n_mode} of {len(rows)} reseeds**; distinct masks: "
        f"{len(masks)} ({'; '.join(f'{k} ×{v}' for k, v in masks.most_common())})",
    ]
    _report.publish("bench_selection_noise: DP-Flat's kept layers under reseeding of the selector", lines,
                    not a.no_append)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
