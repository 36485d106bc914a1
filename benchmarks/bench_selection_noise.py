"""How much of DP-Flat's layer selection is signal: the kept layers under the warm-up's own noise.

Why: a cheaper cold setup (issue #18, goal 2) was to be shown to "pick the same layers". The
scorer's warm-up is a 30-step non-private fit *with dropout on* (the backbone's and the
head's), so its outcome is a random draw even at a fixed seed. This benchmark runs the layer
selection of ``python -m dpflat train --variant dpflat`` (safe, CLI defaults) several times on
the same data and seed, changing only:

- ``shipped``: nothing (the run's own random stream);
- ``dropout-K``: the global torch generator reseeded to K just before the warm-up, which
  changes only the dropout masks (the warm-up's batches come from its own seeded loader);
- ``regrouped``: the warm-up's batches cut into length groups of 32 with their padding
  removed and the groups' gradients accumulated (the same AdamW steps on the same examples,
  about 2.6x less CPU; equal to the shipped fit up to float order when dropout is off, so it
  differs from ``shipped`` only through the dropout masks).

Each variant is one ``train(cfg, max_steps=1)`` in a fresh output dir (the setup cache would
otherwise answer); the keep-mask and S per greedy round come from the selection itself.
Resumable: finished variants are stored in ``--out`` and skipped.

    python benchmarks/bench_selection_noise.py --threads 1             # ~5 min per variant on 2 cores
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


def regrouped_fit(orig):
    """``fit_nonprivate`` whose steps run on length groups of 32 (padding cut), gradients summed."""
    import copy

    import torch
    import torch.nn.functional as F

    from dpflat.evaluate import model_inputs
    from landscape._params import rebatch_by_length

    def fit(model, dataset, *, steps, batch_size, lr, device, seed, on_batch=None):
        student = copy.deepcopy(model)
        student.train()
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                             generator=g)
        done = 0
        while done < steps:
            for b in loader:
                n = len(b["labels"])
                opt.zero_grad(set_to_none=True)
                for part in rebatch_by_length([b], 32):
                    loss = F.cross_entropy(student(**model_inputs(part, device)), part["labels"].to(device),
                                           reduction="sum") / n
                    loss.backward()
                opt.step()
                if on_batch:
                    on_batch(n)
                done += 1
                if done >= steps:
                    break
        student.eval()
        return student

    return fit


def one(variant: str, task: str, seed: int, threads: int) -> dict:
    import torch

    import dpflat.flat.layers as L
    from dpflat.config import RunConfig, apply_variant
    from dpflat.train import train

    torch.set_num_threads(threads)
    orig_fit, orig_gd = L.fit_nonprivate, L.greedy_drop
    got: dict = {}

    def fit(*a, **kw):
        if variant.startswith("dropout-"):
            torch.manual_seed(int(variant.split("-")[1]))  # only the warm-up's dropout masks change
        f = regrouped_fit(orig_fit) if variant == "regrouped" else orig_fit
        t, c = time.perf_counter(), time.process_time()
        out = f(*a, **kw)
        got["warmup_cpu_s"] = time.process_time() - c
        got["warmup_wall_s"] = time.perf_counter() - t
        return out

    def gd(*a, **kw):
        keep, trace = orig_gd(*a, **kw)
        got["keep"] = ",".join(str(i) for i, k in enumerate(keep) if k)
        got["S"] = [round(float(r["S"]), 4) for r in trace]
        return keep, trace

    L.fit_nonprivate, L.greedy_drop = fit, gd
    try:
        out = tempfile.mkdtemp(prefix="bench-selnoise-")
        cfg = apply_variant(RunConfig(), "dpflat", "safe").replace(
            data={"task": task}, privacy={"epsilon": 3.0},
            train={"output_dir": out, "progress": False, "num_threads": threads, "seed": seed})
        train(cfg, max_steps=1)
    finally:
        L.fit_nonprivate, L.greedy_drop = orig_fit, orig_gd
    return {"variant": variant, "task": task, "seed": seed, **got}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="shipped,dropout-1,dropout-2,regrouped")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench-selection-noise"),
                   help="folder of finished variants (resumable)")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dpflat.cli import quiet_libraries

    quiet_libraries()
    store = Path(a.out)
    store.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in a.variants.split(","):
        f = store / f"{a.task}-s{a.seed}-{v}.json"
        if not f.is_file():
            r = one(v, a.task, a.seed, a.threads)
            f.write_text(json.dumps(r))
            print(r, flush=True)
        rows.append(json.loads(f.read_text()))
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {os.getloadavg()[0]:.1f} at the end "
        "(other processes share the 2 cores: CPU seconds are the process's own)",
        f"- what: the layer selection of a CLI-default DP-Flat(safe) run ({a.task}, seed {a.seed}: 30 warm-up steps "
        "of 128 public examples with dropout on, then greedy elimination of n_drop 2 on 128 public examples), "
        "repeated with only the warm-up's dropout masks changed (`dropout-K`: torch reseeded to K before it) or its "
        "batches regrouped by length (`regrouped`)",
        "",
        "| variant | keep layers | S per greedy round (0, 1, 2) | warm-up CPU s |",
        "|---|---|---|---:|",
        *[f"| {r['variant']} | {r['keep']} | {', '.join(f'{s:.3g}' for s in r['S'])} | {r['warmup_cpu_s']:.1f} |"
          for r in rows],
    ]
    masks = {r["keep"] for r in rows}
    lines += ["", f"- distinct keep-masks: **{len(masks)} of {len(rows)} runs** ({'; '.join(sorted(masks))})"]
    text = "\n".join(lines)
    print(text)
    if not a.no_append:
        _report.append("bench_selection_noise: DP-Flat's kept layers under the warm-up's own dropout noise", lines)
    return text


if __name__ == "__main__":
    main()
