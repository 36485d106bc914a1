"""Wall and kernel CPU time of each notebook's default ("quick") path, executed headless with papermill.

    python benchmarks/bench_notebooks.py [--size quick] [--threads 1] [--only 01 03] [--fresh] [--alone]

By default the seven lessons run in order into one output folder, as a learner would run them: they
share one run cache, so a run trained in 01 is reused by 03, 04 and 06 (the table says
how many runs each notebook found finished and how many it trained). ``--alone`` runs each
lesson by itself from an empty run cache (its own fresh folder): the case every lesson's
"How long" promise must hold for. Resumable: each finished notebook's time is kept in
``<out>/bench_state*.json`` and not measured again unless ``--fresh``; a table with notebooks
still missing is marked partial. The goal is <= 10 minutes of kernel CPU per notebook on a
2-core CPU, and each lesson's own promise (its "How long" line); the load average at start and
end says how busy the machine was (other processes share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

NOTEBOOKS = ["01_quickstart", "02_dp_tradeoffs", "03_flatness_landscapes", "04_sharpness_vs_epsilon",
             "05_ablations", "06_privacy_audit", "07_neighbouring_datasets"]
GOAL_S = 600.0


def promised_minutes(name: str) -> float | None:
    """The minutes a lesson promises in its "**How long:** about N minutes" line (None if it names none)."""
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    m = re.search(r"\*\*How long:\*\*\s*about (\d+(?:\.\d+)?) minutes", nb.cells[0].source)
    return float(m.group(1)) if m else None


def _finished_runs(out: Path) -> set[str]:
    return {str(p.parent.relative_to(out)) for p in out.rglob("result.json")}  # 06's canary runs, 07's too


def run_one(name: str, out: Path, size: str, threads: int | None, timeout: int) -> dict:
    """Execute one lesson into ``out`` (its run cache) and time it: wall, kernel CPU, runs trained, load."""
    import nbformat
    import papermill as pm

    import resource

    before = _finished_runs(out)
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    err = ""
    try:
        pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out / f"{name}.out.ipynb"),
                            parameters={"size": size, "out_dir": str(out), "threads": threads, "progress": False},
                            cwd=str(ROOT / "notebooks"), progress_bar=False, log_output=False,
                            execution_timeout=timeout, kernel_name="python3")
    except Exception as e:  # noqa: BLE001 - recorded in the table, the next notebook still runs
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, once papermill has shut it down
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if not err:
        nb = nbformat.read(out / f"{name}.out.ipynb", as_version=4)
        errs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]
        err = f"{len(errs)} cell error(s)" if errs else ""
    after = _finished_runs(out)
    return {"notebook": name, "wall_s": wall, "cpu_s": cpu, "trained": len(after - before), "load_start": load0,
            "load_end": os.getloadavg()[0], "error": err}


def trajectory_cost(out: Path) -> list[str]:
    """Cost of one sharpness-trajectory point (``--sharpness-every``), from the runs' own
    ``sharpness.jsonl`` rows (each row times itself), by variant."""
    import statistics as st

    by: dict[str, list[dict]] = {}
    for f in sorted(out.rglob("sharpness.jsonl")):
        variant = f.parent.name.split("_sst2_")[0]
        rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        by.setdefault(variant, []).extend(rows)
    if not by:
        return ["(no run recorded a sharpness trajectory)"]
    lines = ["Sharpness trajectory, cost per point (top eigenvalue by warm-started Lanczos + 1-step SAM), from the "
             "runs above; wall time is under the same load, CPU time is the process's own (training pauses "
             "while a point is measured):", "",
             "| variant | points | examples/point | HVPs/point | median wall (s) | median CPU (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for v, rows in sorted(by.items()):
        cpu = [r["cpu_seconds"] for r in rows if "cpu_seconds" in r]
        lines.append(f"| {v} | {len(rows)} | {rows[0]['n_examples']} | {st.median(r['hvp_products'] for r in rows):g} | "
                     f"{st.median(r['seconds'] for r in rows):.1f} | {st.median(cpu):.1f} |" if cpu else
                     f"| {v} | {len(rows)} | {rows[0]['n_examples']} | {st.median(r['hvp_products'] for r in rows):g} | "
                     f"{st.median(r['seconds'] for r in rows):.1f} | n/a |")
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="quick", choices=["quick", "full"])
    p.add_argument("--threads", type=int, default=1, help="torch threads in each notebook's kernel")
    p.add_argument("--out", default=str(ROOT / "out" / "bench_notebooks"))
    p.add_argument("--only", nargs="*", help="notebook numbers, e.g. 01 03")
    p.add_argument("--fresh", action="store_true", help="forget earlier timings (the run cache stays)")
    p.add_argument("--timeout", type=int, default=3600, help="per-cell limit (s)")
    p.add_argument("--alone", action="store_true",
                   help="each lesson alone from an empty run cache (its own fresh folder), not in order sharing one")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    out = Path(a.out) / a.size
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / ("bench_state_alone.json" if a.alone else "bench_state.json")
    state = {} if a.fresh or not state_file.is_file() else json.loads(state_file.read_text())
    todo = [n for n in NOTEBOOKS if not a.only or n[:2] in a.only]
    for name in todo:
        if name in state and not state[name]["error"]:
            continue
        print(f"running {name} ...", flush=True)
        where = out
        if a.alone:  # an empty run cache of its own, made fresh for every measurement
            where = out / "alone" / name
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir(parents=True)
        state[name] = run_one(name, where, a.size, a.threads, a.timeout)
        state_file.write_text(json.dumps(state, indent=2))
        print(f"  {state[name]['wall_s'] / 60:.1f} min, trained {state[name]['trained']} run(s) "
              f"{state[name]['error']}", flush=True)
    rows = [state[n] for n in NOTEBOOKS if n in state]
    partial = len(rows) < len(NOTEBOOKS)
    lines = [
        f"- command: `{_report.command()}` (PATH with the venv's bin first: the kernel runs `python`)",
        f"- machine: {_report.machine()}; kernels with OMP_NUM_THREADS={a.threads} and `threads={a.threads}`",
        f"- setting: size `{a.size}` (`dpflat.widgets.SIZES`), each notebook's default parameters (MiniLM; 07: "
        "its tiny-bert default); " + ("each lesson **alone from an empty run cache** (its own fresh folder: "
                                      "it trains every model it shows)" if a.alone else
                                      "run in order into one shared output folder (the lessons' one run cache), "
                                      "so a run trained by an earlier notebook is reused by a later one"),
        "- load: the 1-min load average at start and end of each notebook; above 2 the 2 cores were "
        "shared with other processes (timings then overstate the notebook's own cost)",
        "- kernel CPU: CPU time of the notebook's kernel process (user + system). With one torch thread it is "
        "about the wall time the notebook needs on an otherwise idle core, whatever the load was",
        "- promise: the lesson's own \"How long: about N minutes\" line; held when the kernel CPU time is at most "
        "N (+10%)",
        "",
        "| notebook | wall (min) | kernel CPU (min) | promised (min) | promise held | runs trained | load start / end "
        "| wall ≤ 10 min | error |",
        "|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if r["wall_s"] <= GOAL_S and not r["error"] else "**no**"
        if ok != "yes" and not r["error"] and (r.get("cpu_s") or 1e9) <= GOAL_S:
            ok = "**no** (CPU time ≤ 10 min: the load)"
        under = " (under load)" if max(r["load_start"], r["load_end"]) > 2.0 else ""
        cpu = f"{r['cpu_s'] / 60:.1f}" if r.get("cpu_s") is not None else "n/a"
        promise = promised_minutes(r["notebook"])
        held = ("n/a" if promise is None or r.get("cpu_s") is None else
                "yes" if r["cpu_s"] <= promise * 60 * 1.1 and not r["error"] else "**no**")
        lines.append(f"| {r['notebook']} | {r['wall_s'] / 60:.1f} | {cpu} | "
                     f"{'n/a' if promise is None else f'{promise:g}'} | {held} | {r['trained']} | "
                     f"{r['load_start']:.1f} / {r['load_end']:.1f}{under} | {ok} | {r['error'] or ''} |")
    if partial:
        lines.append("")
        lines.append(f"PARTIAL: {len(NOTEBOOKS) - len(rows)} notebook(s) not measured yet "
                     "(rerun the same command to continue)")
    lines += ["", *trajectory_cost(out if not a.alone else out / "alone")]
    text = "\n".join(lines)
    print(text)
    if not a.no_append:
        _report.append(f"bench_notebooks: wall and kernel CPU time of each lesson's {a.size} path"
                       + (", each alone from an empty cache" if a.alone else "")
                       + (" (partial)" if partial else ""), lines)
    return text


if __name__ == "__main__":
    main()
