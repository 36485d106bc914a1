"""Cost of ``dpflat.analysis.analyze_run`` on padded vs length-regrouped batches (same figures).

The run's splits are padded to ``max_length``; an eager encoder computes the padding too.
``analysis_batches(regroup=32)`` sorts the subset by length into groups of 32 and cuts each
group's padding. This times both on finished run folders (copies, so the folders keep their
own analysis), in ABBA order, with the fidelity benchmark's settings by default (top
eigenvalue, 3-product trace, SAM sharpness on the first 128 test examples; no surface).

    python benchmarks/bench_analysis.py RUN_DIR [RUN_DIR ...] --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import _report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="finished run folders (not modified)")
    p.add_argument("--n-examples", type=int, default=128)
    p.add_argument("--group", type=int, default=32, help="examples per length group")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    _report.start(a.threads)
    from dpflat.analysis import analyze_run

    for d in a.run_dirs:
        if not (Path(d) / "result.json").is_file():
            sys.exit(f"error: {d} is not a finished run folder")
    load0 = os.getloadavg()[0]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    figs: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in (("padded", "regrouped") if r % 2 == 0 else ("regrouped", "padded")):
                for d in a.run_dirs:
                    name = Path(d).name
                    copy = Path(tmp) / mode / name
                    if not copy.exists():
                        shutil.copytree(d, copy)
                    c0, w0 = time.process_time(), time.perf_counter()
                    s = analyze_run(copy, top_k=1, surface=False, density=False, n_examples=a.n_examples, split="eval",
                                    trace_matvecs=3, progress=False, force=True,
                                    regroup=None if mode == "padded" else a.group)
                    times.setdefault((name, mode), []).append((time.perf_counter() - w0, time.process_time() - c0))
                    figs[(name, mode)] = s
                    print(f"[{r}] {name} {mode}: {times[(name, mode)][-1][1]:.1f} s CPU", flush=True)
    med = statistics.median
    lines = ["| run | batches | wall s | CPU s | speed-up (CPU) | top eigenvalue | SAM sharpness | trace (3 products) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for d in a.run_dirs:
        name = Path(d).name
        base = med(c for _, c in times[(name, "padded")])
        for mode in ("padded", "regrouped"):
            w, c = med(x for x, _ in times[(name, mode)]), med(x for _, x in times[(name, mode)])
            s = figs[(name, mode)]
            lines.append(f"| {name} | {mode if mode == 'padded' else f'regrouped (groups of {a.group})'} | {w:.1f} | {c:.1f} "
                         f"| **{base / c:.2f}x** | {s['top_eigenvalue']:.6g} | {s['sam_sharpness']:.6g} | {s['hessian_trace']:.6g} |")
        for k in ("top_eigenvalue", "sam_sharpness", "hessian_trace"):
            x, y = figs[(name, "padded")][k], figs[(name, "regrouped")][k]
            worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    head = [f"- command: `{_report.command()}`",
            f"- machine: {_report.machine()}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end",
            f"- what: `analyze_run(top_k=1, trace_matvecs=3, surface=False, density=False, n_examples={a.n_examples})` "
            f"(the fidelity benchmark's flatness figures) on copies of finished runs; medians of {a.rounds} ABBA rounds",
            "", *lines, "", f"Largest relative difference of a figure, regrouped vs padded: {worst:.1e}."]
    title = "bench_analysis: a run's flatness figures on padded vs length-regrouped batches"
    _report.publish(title, head, not a.no_append)


if __name__ == "__main__":
    main()
