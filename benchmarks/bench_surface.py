"""2D loss surface: ms per grid point, plain vs regrouped-by-length vs bf16 autocast.

Same model as bench_hessian (dpflat MiniLM-L6 prefix model, m=16, eager attention, eval
mode), the same fixed SST-2 dev sentences, the same two filter-normalised random
directions and grid. Variants (``landscape.loss_surface_2d``):

* plain: one batch of all examples, padded to the longest (as before);
* ``rebatch=G``: the examples regrouped by length into groups of G with the padding
  cut (``landscape._params.rebatch_by_length``): the same losses up to float
  summation order (the table shows the largest difference);
* ``rebatch=G, precision="bf16"``: the same under bf16 autocast (AMX on this Xeon):
  the surface of the autocast model; the table states its difference to fp32.

Rounds alternate the order (ABBA) so that load from other processes hits all alike;
ms/point are medians over rounds, in wall and in CPU time (one thread: CPU time is
what the process itself used, the steadier number on a shared machine).

    python benchmarks/bench_surface.py --threads 1              # 7x7 grid, 64 examples, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from landscape import loss_surface_2d, random_direction  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--grid", type=int, default=7, help="points per axis (in [-1, 1])")
    p.add_argument("--group", type=int, default=8, help="examples per length group for the regrouped variants")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import bench_hessian as BH

    hargs = BH.parse(["--backbone", a.backbone, "--max-length", str(a.max_length), "--seed", str(a.seed)])
    model, make_batches = BH.load(hargs)
    sb = make_batches(a.examples, 0, a.examples)
    d1, d2 = random_direction(model, seed=a.seed), random_direction(model, seed=a.seed + 1)
    xs = np.linspace(-1, 1, a.grid)
    variants = [("plain: 1 batch, padded to the longest, fp32", {}),
                (f"regrouped by length (groups of {a.group}), padding cut, fp32", {"rebatch": a.group})]
    if not a.no_bf16:
        variants.append((f"regrouped by length (groups of {a.group}), bf16 autocast", {"rebatch": a.group, "precision": "bf16"}))
    loss_surface_2d(model, BH.loss_fn, sb, d1, d2, xs[:2], progress=False)  # warm-up outside the timings
    load0 = os.getloadavg()
    res: dict[str, list] = {v[0]: [] for v in variants}
    for r in range(a.rounds):
        for label, kw in (variants if r % 2 == 0 else variants[::-1]):
            w, c = time.perf_counter(), time.process_time()
            s = loss_surface_2d(model, BH.loss_fn, sb, d1, d2, xs, progress=False, **kw)
            w, c = time.perf_counter() - w, time.process_time() - c
            res[label].append((s, w, c))
            print(f"[{r}] {label}: {w:.1f}s wall, {c:.1f}s CPU, {1000 * w / s.losses.size:.0f} ms/point", flush=True)
    load1 = os.getloadavg()
    med = statistics.median
    base = res[variants[0][0]]
    b_w = med(x[1] for x in base) / base[0][0].losses.size * 1000
    b_c = med(x[2] for x in base) / base[0][0].losses.size * 1000
    ref = base[-1][0].losses
    n_pos = sum(int(b["input_ids"].numel()) for b in sb)
    from landscape._params import rebatch_by_length

    n_pos_rb = sum(int(b["input_ids"].numel()) for b in rebatch_by_length(sb, a.group))
    tab = ["| variant | padded positions per pass | ms/point (wall) | ms/point (CPU) | speed-up (wall) | speed-up (CPU) | "
           "max abs. loss difference vs plain | max rel. difference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for label, kw in variants:
        runs = res[label]
        npts = runs[0][0].losses.size
        mw, mc = med(x[1] for x in runs) / npts * 1000, med(x[2] for x in runs) / npts * 1000
        L = runs[-1][0].losses
        dabs = float(np.max(np.abs(L - ref)))
        drel = float(np.max(np.abs(L - ref) / np.abs(ref)))
        tab.append(f"| {label} | {n_pos_rb if kw else n_pos} | {mw:.0f} | {mc:.0f} | **{b_w / mw:.2f}x** | {b_c / mc:.2f}x | "
                   f"{dabs:.1e} | {drel:.1e} |")
        if kw:
            verdicts.append(f"{label}: {b_w / mw:.2f}x wall, {b_c / mc:.2f}x CPU "
                            f"({'met' if min(b_w / mw, b_c / mc) >= 2 else 'NOT met'}; max rel. loss difference {drel:.1e})")
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end "
        "(other processes share the 2 cores: read the ratios)",
        f"- model: dpflat `{a.backbone}` prefix model (m=16) + head, eager attention, eval mode; data: SST-2 dev, first "
        f"{a.examples} sentences, max_length {a.max_length}; {a.grid}x{a.grid} grid in [-1, 1]^2 along two filter-normalised "
        f"random directions (seeds {a.seed}, {a.seed + 1}); one no-grad pass per point; medians of {a.rounds} round(s), ABBA",
        "",
        *tab,
        "",
        "- Goal >= 2x fewer ms per point: " + "; ".join(verdicts) + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_append:
        _report.append("bench_surface: 2D loss surface ms per point", lines)
    return text


if __name__ == "__main__":
    main()
