"""The layer selector's indicator S on every keep-mask, per scorer fit: why the kept layers change.

Why: ``bench_selection_noise`` says *that* the kept layers change under reseeding; this says
*where* the change comes from. For each reseed (the same ones: only the scorer fit's seed and
the indicator directions' seed move, ``bench_selection_noise.RESEED_STRIDE``) it scores S on
every keep-mask with up to ``--depth`` dropped layers of the reseed's scorer fit, with the
gradient direction alone and (for the single drops) with the default random directions too.
Then it asks of the numbers: do random directions ever set S (is S the gradient direction's)?
Which masks would greedy and exhaustive search keep per fit? And an indicator averaged over K
fits: how often do K-subsets of the fits agree?

Each reseed runs ``train(cfg, max_steps=1)`` of a dp+layers (safe) run in ``--fit-cache``/r<k>,
so the scorer fit comes from the setup cache when ``bench_selection_noise --fit-cache`` (or an
earlier call) made it; the masks are scored by a wrapper of ``greedy_drop`` (the selection then
runs as usual). Resumable per mask (``--out``/r<k>.json). SST-2, seed 0, one thread.

    python benchmarks/probe_selector_masks.py 0 1 2 3 4 --scorer plateau-mean --out /tmp/masks --fit-cache /tmp/fits
    python benchmarks/probe_selector_masks.py --report --out /tmp/masks
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def key(drop) -> str:
    return ",".join(map(str, sorted(drop))) or "-"


def score(reseed: int, out: Path, fit_cache: str, scorer: str, depth: int) -> None:
    import bench_selection_noise as B

    import dpflat.flat.layers as L

    f = out / f"r{reseed}.json"
    res = json.loads(f.read_text())["S"] if f.exists() else {}
    orig = L.greedy_drop

    def gd(model, batches, n_drop, rho, n_random, seed, *a, **kw):  # seed: already the reseed's
        n = model.n_layers
        masks = [d for k in range(depth + 1) for d in itertools.combinations(range(n), k)]
        for drop in masks:
            if key(drop) in res:
                continue
            keep = [i not in drop for i in range(n)]
            res[key(drop)] = {"g": L.indicator(model, batches, keep, rho, 0, seed)}
            if len(drop) == 1:  # does a random direction ever beat the gradient one?
                res[key(drop)]["d"] = L.indicator(model, batches, keep, rho, n_random, seed)
            f.write_text(json.dumps({"reseed": reseed, "scorer": scorer, "S": res}))
            print(reseed, key(drop), res[key(drop)], flush=True)
        return orig(model, batches, n_drop, rho, n_random, seed, *a, **kw)

    load = L._cache.load  # the selection is redone (so the masks are scored); the fit still comes from the cache

    def no_selection(output_dir, k):
        return None if k.startswith("layers-") else load(output_dir, k)

    L.greedy_drop, L._cache.load = gd, no_selection
    try:  # stop_early: its own run folder (the fit is shared)
        B.one("sst2", 0, reseed, scorer, 1, {"layers_stop_early": True}, fit_cache)
    finally:
        L.greedy_drop, L._cache.load = orig, load


def report(out: Path, n_layers: int = 6, n_drop: int = 2) -> list[str]:
    R = {}
    for f in sorted(out.glob("r*.json")):
        d = json.loads(f.read_text())
        R[d["reseed"]] = {k: v["g"] for k, v in d["S"].items()}
        checks = [(v["g"], v["d"]) for v in d["S"].values() if "d" in v]
        R[d["reseed"]]["_checks"] = checks
    full = [r for r in R if all(key(d) in R[r] for d in itertools.combinations(range(n_layers), n_drop))]

    def greedy(S) -> tuple:
        drop: list[int] = []
        for _ in range(n_drop):
            c = {i: S[key(drop + [i])] for i in range(n_layers) if i not in drop}
            drop.append(min(c.items(), key=lambda kv: (kv[1], kv[0]))[0])
        return tuple(sorted(drop))

    def exhaustive(S) -> tuple:
        return min(itertools.combinations(range(n_layers), n_drop), key=lambda d: S[key(d)])

    checks = [c for r in full for c in R[r]["_checks"]]
    lines = [f"n_drop = {n_drop}", "",
             f"| fit | greedy drops | exhaustive drops | S of the {n_drop}-subsets of {{0, 3, 5}} | lowest S of another |",
             "|---:|---|---|---|---|"]
    for r in full:
        S = R[r]
        pairs = ", ".join(f"{p} {S[key(p)]:.2f}" for p in itertools.combinations((0, 3, 5), n_drop))
        other = min(((S[key(p)], p) for p in itertools.combinations(range(n_layers), n_drop)
                    if set(p) - {0, 3, 5}), default=(float("nan"), ()))
        lines.append(f"| {r} | {greedy(S)} | {exhaustive(S)} | {pairs} | {other[1]} {other[0]:.2f} |")
    lines.append("")
    lines.append(f"- random directions: in **{sum(abs(g - d) < 1e-12 for g, d in checks)} of {len(checks)}** "
                 "single-drop evaluations S with them equals S of the gradient direction alone")
    for K in range(2, len(full)):
        outs = [greedy({k: statistics.mean(R[r][k] for r in rs) for k in R[rs[0]]
                        if k != "_checks" and all(k in R[r] for r in rs)})
                for rs in itertools.combinations(full, K)]
        c = Counter(outs).most_common()
        lines.append(f"- S averaged over K = {K} of these fits, greedy: " + "; ".join(f"{m} ×{v}" for m, v in c)
                     + f" (of {len(outs)} subsets)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reseeds", type=int, nargs="*")
    p.add_argument("--out", default="/tmp/selector-masks")
    p.add_argument("--fit-cache", default="/tmp/selector-fits")
    p.add_argument("--scorer", default="plateau", choices=["plateau", "plateau-mean", "warmup"])
    p.add_argument("--depth", type=int, default=2, help="score every mask with up to this many dropped layers")
    p.add_argument("--report", action="store_true", help="print the table of what is stored")
    p.add_argument("--n-drop", type=int, default=2, help="the report's number of dropped layers (<= --depth)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.reseeds:
        import torch

        torch.set_num_threads(1)
    for r in a.reseeds:
        score(r, out, a.fit_cache, a.scorer, a.depth)
    if a.report or not a.reseeds:
        print("\n".join(report(out, n_drop=a.n_drop)))


if __name__ == "__main__":
    main()
