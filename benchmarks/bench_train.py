"""Cost of one training step: non-private vs DP-SGD (hooks / ghost / functorch) vs safe AWP vs DP-Flat (safe).

One configuration (SST-2, MiniLM-L6 prefix model m=16, logical batch 64, physical 64,
max_length 64 -- dpflat trims the all-padding columns of each batch), all variants in
ONE process, back to back. Each variant runs the real loop, ``dpflat.train.train``
with ``max_steps`` and an ``on_step`` callback that records a timestamp per logical
step; the step time is the interval between consecutive callbacks (it includes the
levels' perturb / forward / backward / restore / optimizer step / step_end exactly as
train.py runs them, plus a one-line metrics write). The first ``--warmup`` steps are
dropped and the median of the next ``--steps`` intervals is reported. For DP-Flat the
one-off setup (layer selection, teacher) is timed separately by wrapping the levels'
``setup`` methods, and reported as setup seconds, not per-step cost.

Memory: tracemalloc does not see torch's allocator, so a background thread samples
the process RSS (psutil) every 5 ms; we report the peak RSS during the timed steps
minus the RSS just before the variant started, and the process ``ru_maxrss``.

Evaluation throughput: ``dpflat.evaluate.evaluate`` (eval mode + torch.inference_mode)
on the eval split vs the same forward in training mode with autograd on (same batches,
batch 256), both medians over repeats.

    python benchmarks/bench_train.py            # default: 3 warm-up + 10 timed steps (~5-10 min on 2 cores)
    python benchmarks/bench_train.py --quick    # 1 warm-up + 3 timed steps, no RESULTS.md unless --append
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

from dpflat import privacy as privacy_mod  # noqa: E402
from dpflat.cli import quiet_libraries  # noqa: E402
from dpflat.config import DataConfig, FlatConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig  # noqa: E402
from dpflat.evaluate import batches, evaluate, model_inputs  # noqa: E402
from dpflat.flat.distill import Distillation  # noqa: E402
from dpflat.flat.layers import LayerSelection  # noqa: E402
from dpflat.models import build_model, load_tokenizer  # noqa: E402
from dpflat.train import prepare_data, train  # noqa: E402

PROC = psutil.Process()


class RSSPeak:
    """Background sampler of the process RSS; ``reset()`` starts a new peak window."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, PROC.memory_info().rss, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            r = PROC.memory_info().rss
            if r > self.peak:
                self.peak = r
            time.sleep(self.every)

    def reset(self):
        self.peak = PROC.memory_info().rss

    def stop(self):
        self._stop.set()
        self._t.join()


# ---- counting examples per logical step (Poisson batches vary in size): wrap the ledger gate
_EXAMPLES = [0]
_orig_count = privacy_mod.PrivateSplit.count


def _counting(self, who, how, accounted, examples):
    if who in ("train/dp-sgd", "train/non-private"):
        _EXAMPLES[0] += int(examples)
    return _orig_count(self, who, how, accounted, examples)


privacy_mod.PrivateSplit.count = _counting

# ---- timing the one-off setup of the levels
SETUP_S: dict[str, float] = {}


def _timed_setup(cls, key):
    orig = cls.setup

    def setup(self, ctx):
        t = time.perf_counter()
        try:
            return orig(self, ctx)
        finally:
            SETUP_S[key] = SETUP_S.get(key, 0.0) + time.perf_counter() - t

    cls.setup = setup


_timed_setup(LayerSelection, "layers")
_timed_setup(Distillation, "distill")

VARIANTS = [
    # key, label, privacy, flat
    ("nonprivate", "non-private prefix tuning", {"enabled": False}, {}),
    ("dp", "DP-SGD, Opacus hooks", {"enabled": True, "grad_sample_mode": "hooks"}, {}),
    ("ghost", "DP-SGD, Opacus ghost clipping", {"enabled": True, "grad_sample_mode": "ghost"}, {}),
    ("functorch", "DP-SGD, Opacus functorch per-example grads", {"enabled": True, "grad_sample_mode": "functorch"}, {}),
    ("dp+awp", "DP + AWP (safe)", {"enabled": True}, {"awp": True}),
    ("dpflat", "DP-Flat (safe: layers + distill + AWP)", {"enabled": True},
     {"awp": True, "layers": True, "distill": True}),
]


def base_config(a, out: str) -> RunConfig:
    return RunConfig(
        data=DataConfig(task="sst2", data_dir=a.data_dir, max_length=64, train_size=a.train_size, public_size=500),
        model=ModelConfig(backbone=a.backbone, prefix_len=16),
        privacy=PrivacyConfig(epsilon=8.0, max_grad_norm=1.0),
        # awp_epochs=1 (with 2 epochs): AWP is active on every measured step; the rest are the defaults
        flat=FlatConfig(awp_epochs=1.0, awp_mode="safe", layers_mode="safe", distill_mode="safe"),
        train=TrainConfig(epochs=2.0, batch_size=64, physical_batch_size=64, lr=1e-2, output_dir=out,
                          checkpoint_every=10**6, eval_every=0, progress=False, seed=0),
    )


def pool(runs: list[dict]) -> dict:
    """One variant's rounds as one result: all timed steps pooled (median), totals summed."""
    if "error" in runs[0]:
        return runs[0]
    steps = [x for r in runs for x in r["steps_s"]]
    out = dict(runs[-1])
    out.update({
        "step_s": statistics.median(steps),
        "steps_s": steps,
        "rounds_steps_s": [r["steps_s"] for r in runs],
        "ex_per_s": sum(r["ex_per_s"] * sum(r["steps_s"]) for r in runs) / sum(steps),
        "mean_batch": statistics.mean(r["mean_batch"] for r in runs),
        "first_step_at": statistics.median(r["first_step_at"] for r in runs),
        "setup": {k: statistics.median(r["setup"][k] for r in runs) for k in runs[0]["setup"]},
        "rss_delta_mb": max(r["rss_delta_mb"] for r in runs),
        "rss_peak_mb": max(r["rss_peak_mb"] for r in runs),
    })
    return out


def paired_ratio(slow: dict, fast: dict) -> float | None:
    """Median over matched steps of slow/fast step time. The DP variants see the same Poisson
    batch at the same step index (the loop reseeds per step), so step i of round k of one
    variant and step i of round k of the other did the same work but for the variant's own cost."""
    if "rounds_steps_s" not in slow or "rounds_steps_s" not in fast:
        return None
    ratios = [s / f for rs, rf in zip(slow["rounds_steps_s"], fast["rounds_steps_s"]) for s, f in zip(rs, rf)]
    return statistics.median(ratios) if ratios else None


def run_variant(cfg: RunConfig, a, rss: RSSPeak, profile: bool = True) -> dict:
    W, T, P = a.warmup, a.steps, (a.profile_steps if profile else 0)
    stamps, examples, state = [], [], {}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def on_step(row):
        stamps.append(time.perf_counter())
        examples.append(_EXAMPLES[0])
        _EXAMPLES[0] = 0
        s = row["step"]
        if s == W:
            state["rss_before_steps"] = PROC.memory_info().rss
            rss.reset()
        if s == W + T:
            state["rss_peak_steps"] = rss.peak
            if P:
                prof.start()
        if P and s == W + T + P:
            prof.stop()

    gc.collect()
    rss0 = PROC.memory_info().rss
    rss.reset()
    SETUP_S.clear()
    _EXAMPLES[0] = 0
    t0 = time.perf_counter()
    try:
        train(cfg, resume=False, max_steps=W + T + P, on_step=on_step)
    except Exception as e:  # noqa: BLE001 -- a variant that cannot run is reported, not fatal
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return {"error": msg[:200]}
    iv = [stamps[k] - stamps[k - 1] for k in range(W, W + T)]  # intervals of steps W+1..W+T
    ex = examples[W : W + T]
    out = {
        "step_s": statistics.median(iv),
        "steps_s": iv,
        "ex_per_s": sum(ex) / sum(iv),
        "mean_batch": sum(ex) / len(ex),
        "first_step_at": stamps[0] - t0,
        "setup": dict(SETUP_S),
        "rss_delta_mb": (state["rss_peak_steps"] - rss0) / 2**20,
        "rss_peak_mb": state["rss_peak_steps"] / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if P:
        out["profile"] = {
            e.key: (e.self_cpu_time_total / 1e3 / P, e.count / P) for e in prof.key_averages()
        }
    return out


def eval_vs_forward(cfg: RunConfig, a) -> dict:
    tok = load_tokenizer(cfg.model)
    card, _, tokd = prepare_data(cfg, tok)
    model = build_model(cfg.model, len(card.labels), seed=0)
    ds = tokd["eval"]
    n = len(ds)
    bs = cfg.train.eval_batch_size

    def train_forward():
        model.train()
        for b in batches(ds, bs):
            logits = model(**model_inputs(b, "cpu"))
            loss = torch.nn.functional.cross_entropy(logits.float(), b["labels"])
            del logits, loss

    def eval_pass():
        evaluate(model, ds, bs, "cpu")

    res = {"n": n, "batch": bs}
    for name, fn in (("eval", eval_pass), ("train_fwd", train_forward)):
        fn()  # warm-up
        ts = []
        for _ in range(a.eval_repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        res[name] = n / statistics.median(ts)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        res[name + "_profile"] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    return res


def profile_table(slow: dict, base: dict | None, slow_name: str, base_name: str | None, k: int = 10,
                  unit: str = "step") -> list[str]:
    top = sorted(slow.items(), key=lambda kv: -kv[1][0])[:k]
    tot = sum(v[0] for v in slow.values())
    hdr = f"| op (top {k} by self CPU, {slow_name}) | self CPU ms/{unit} | % | calls/{unit} |"
    sep = "|---|---|---|---|"
    if base is not None:
        hdr += f" {base_name}: self CPU ms/{unit} |"
        sep += "---|"
    lines = [hdr, sep]
    for key, (ms, calls) in top:
        row = f"| `{key}` | {ms:.1f} | {100 * ms / tot:.1f} | {calls:g} |"
        if base is not None:
            row += f" {base.get(key, (0.0, 0))[0]:.1f} |"
        lines.append(row)
    btot = f"; {base_name}: {sum(v[0] for v in base.values()):.0f} ms" if base is not None else ""
    lines.append(f"\nTotal self CPU per {unit}: {slow_name}: {tot:.0f} ms{btot}.")
    return lines


def _cli_default(variant: str, out: str, eps: float, threads: int | None) -> RunConfig:
    from dpflat.config import apply_variant

    cfg = apply_variant(RunConfig(), variant, "safe")
    return cfg.replace(privacy={"epsilon": eps}, train={"output_dir": out, "progress": False, "num_threads": threads})


def end_to_end(a) -> str:
    """Whole runs (``dpflat.train.train`` to the end: data, model, setup, all steps, evaluation,
    checkpoints) at the CLI defaults, ABBA in one process: DP ε=8, DP-Flat(safe) ε=8 with an
    empty setup cache (cold), DP-Flat(safe) ε=3 in the same output dir (warm: the layer
    selection and the teacher come from the cache, as in a sweep over ε), DP ε=3."""
    out = tempfile.mkdtemp(prefix="bench-e2e-")
    plan = [("dp", "dp", 8.0), ("dpflat", "dpflat cold cache", 8.0), ("dpflat", "dpflat warm cache", 3.0), ("dp", "dp", 3.0)]
    if a.no_warm:  # ABA: a warm run costs a whole run and asks the lesser question (a sweep's later ε)
        plan = [plan[0], plan[1], plan[3]]
    load0 = os.getloadavg()
    rows = []
    for variant, label, eps in plan:
        SETUP_S.clear()
        cfg = _cli_default(variant, out, eps, a.threads)
        t = time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t
        info = {k: res.get(k) for k in ("accuracy", "info_layers_keep", "info_layers_cached", "info_teacher_cached")}
        rows.append((label, eps, wall, dict(SETUP_S), info))
        print(f"{label} ε={eps:g}: {wall:.1f}s, setup {SETUP_S}, {info}", flush=True)
    load1 = os.getloadavg()
    dp_mean = statistics.mean(r[2] for r in rows if r[0] == "dp")
    tab = ["| run (CLI defaults) | ε | whole run (s) | / mean DP run | layer selection (s) | teacher (s) | keep layers | test accuracy |",
           "|---|---:|---:|---:|---:|---:|---|---:|"]
    for label, eps, wall, st, info in rows:
        tab.append(f"| {label} | {eps:g} | {wall:.1f} | **{wall / dp_mean:.2f}×** | {st.get('layers', 0):.1f} | "
                   f"{st.get('distill', 0):.1f} | {info.get('info_layers_keep') or '—'} | {info.get('accuracy', float('nan')):.3f} |")
    cold = next(r for r in rows if r[0].endswith("cold cache"))[2] / dp_mean
    warm = next((r[2] / dp_mean for r in rows if r[0].endswith("warm cache")), None)
    d = RunConfig()
    regime = (f"{d.data.task.upper()}, {d.model.backbone}, {d.data.train_size} private examples, {d.train.epochs:g} epochs, "
              f"batch {d.train.batch_size}, public {d.data.public_size:g}, head {d.model.head}")
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end "
        "(other processes share the 2 cores: read the ratios, not the seconds)",
        "- what: `dpflat.train.train(cfg)` to the end at the CLI defaults (`python -m dpflat train --variant dp|dpflat`: "
        f"{regime}), one process, in the order shown "
        "(ABBA). 'cold cache': a fresh output dir; 'warm cache': a second DP-Flat run in the same output dir "
        "(another ε, as a sweep does) that reuses the safe layer selection and the safe teacher",
        "",
        *tab,
        "",
        f"- DP-Flat(safe) whole run / DP whole run: cold cache **{cold:.2f}×** (goal ≤ 1.25×: "
        f"{'met' if cold <= 1.25 else 'NOT met'})"
        + (f", warm cache **{warm:.2f}×**" if warm is not None else " (no warm-cache run: `--no-warm`)"),
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_append:
        _report.append("bench_train --end-to-end: whole DP-Flat(safe) run vs whole DP run at the CLI defaults", lines)
    return text


def end_to_end_levels(a) -> str:
    """Each flattening level's overhead, whole runs at the CLI defaults (ε = 8), one process in the
    order dp, dp+awp, dp+layers, dp+distill, dp (ABA around the levels), each run in a fresh output
    dir (cold: no run shares another's setup cache). Peak memory is the RSS sampler's peak during
    the run minus the RSS just before it (``peak_mem_mb`` of result.json is the process's peak so far)."""
    plan = ["dp", "dp+awp", "dp+layers", "dp+distill", "dp"]
    load0 = os.getloadavg()
    rss, rows = RSSPeak(), []
    for variant in plan:
        SETUP_S.clear()
        cfg = _cli_default(variant, tempfile.mkdtemp(prefix="bench-e2e-levels-"), 8.0, a.threads)
        gc.collect()
        rss.reset()
        before, t = PROC.memory_info().rss, time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t
        rows.append({"variant": variant, "wall": wall, "setup": sum(SETUP_S.values()), "train": float(res["train_s"]),
                     "rss": (rss.peak - before) / 2**20, "acc": res["accuracy"], "keep": res.get("info_layers_keep")})
        print(f"{variant}: {wall:.1f} s, setup {dict(SETUP_S)}, train {res['train_s']:.1f} s, "
              f"peak RSS +{rows[-1]['rss']:.0f} MB, test {res['accuracy']:.4f}", flush=True)
    rss.stop()
    load1 = os.getloadavg()
    dps = [r for r in rows if r["variant"] == "dp"]
    dp_wall, dp_train = statistics.mean(r["wall"] for r in dps), statistics.mean(r["train"] for r in dps)
    tab = ["| run (CLI defaults, ε 8) | whole run (s) | / mean DP run | set-up (s) | training (s) | training / DP's "
           "| peak RSS over its start (MB) | test accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tab.append(f"| {r['variant']} | {r['wall']:.1f} | **{r['wall'] / dp_wall:.2f}×** | {r['setup']:.1f} | "
                   f"{r['train']:.1f} | {r['train'] / dp_train:.2f}× | {r['rss']:.0f} | {r['acc']:.4f} |")
    d = RunConfig()
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end",
        f"- what: `dpflat.train.train(cfg)` to the end at the CLI defaults ({d.data.task.upper()}, {d.model.backbone}, "
        f"{d.data.train_size} private examples, {d.train.epochs:g} epochs, batch {d.train.batch_size}, public "
        f"{d.data.public_size:g}), one level at a time, in the order shown, each in a fresh output dir (cold set-up "
        "cache); training (s) is result.json's train_s; the set-up is the levels' `setup` (layer scorer fit and greedy "
        "selection; the teacher's fit)",
        "",
        *tab,
    ]
    _report.publish("bench_train --end-to-end --levels: each flattening level's whole-run overhead at the CLI "
                    "defaults", lines, not a.no_append)
    return "\n".join(lines)


def check_ranking(a) -> str:
    """The setup of a CLI-default DP-Flat(safe) run, cold and warm, and the ranking check.

    Run 1 (fresh output dir, ``max_steps=1``): the layer selection's greedy elimination
    runs twice on the same scorer -- on the plain fixed batch of 128 (as before) and on
    the length-regrouped batches (now) -- to compare keep-masks, every candidate's S and
    the two greedy times; then the teacher. Run 2 (same output dir, ε=3, as in a sweep):
    both come from the setup cache. Cheaper than --end-to-end on a loaded machine."""
    import dpflat.flat.layers as L

    got: dict = {}
    orig_sb, orig_gd = L.scoring_batches, L.greedy_drop

    def sb(ds, n, group=L.SCORE_GROUP):
        got["plain"] = L.fixed_batches(ds, n)
        return orig_sb(ds, n, group)

    def gd(model, batches, *args, **kw):
        dev = batches[0]["input_ids"].device
        plain = [{k: v.to(dev) for k, v in b.items()} for b in got["plain"]]
        got["regrouped"] = batches
        runs = {}
        for name, bl in (("plain", plain), ("regrouped", batches)):
            t, c = time.perf_counter(), time.process_time()
            out_ = orig_gd(model, bl, *args, **kw)
            runs[name] = (out_, time.perf_counter() - t, time.process_time() - c)
            print(name, out_[0], f"{runs[name][1]:.1f}s wall {runs[name][2]:.1f}s CPU", flush=True)
        got["runs"] = runs
        return runs["regrouped"][0]

    out = tempfile.mkdtemp(prefix="bench-rank-")
    load0 = os.getloadavg()
    setups = []
    L.scoring_batches, L.greedy_drop = sb, gd
    try:
        for eps in (8.0, 3.0):
            SETUP_S.clear()
            cfg = _cli_default("dpflat", out, eps, a.threads)
            t = time.perf_counter()
            res = train(cfg, max_steps=1)
            setups.append((eps, dict(SETUP_S), time.perf_counter() - t, res))
            print(f"ε={eps:g}: setup {SETUP_S}, cached layers={res.get('info_layers_cached')} teacher={res.get('info_teacher_cached')}", flush=True)
            if eps == 8.0:
                L.scoring_batches, L.greedy_drop = orig_sb, orig_gd
    finally:
        L.scoring_batches, L.greedy_drop = orig_sb, orig_gd
    runs = got["runs"]
    (kp, tp), w_p, c_p = runs["plain"]
    (kr, tr), w_r, c_r = runs["regrouped"]
    diffs = [abs(a_["S"] - b_["S"]) / max(abs(b_["S"]), 1e-12) for a_, b_ in zip(tr, tp)]
    for ra, rb in zip(tr, tp):
        for k in rb["candidates"]:
            diffs.append(abs(ra["candidates"][k] - rb["candidates"][k]) / max(abs(rb["candidates"][k]), 1e-12))
    pos = lambda bl: sum(int(b["input_ids"].numel()) for b in bl)  # noqa: E731
    keep = lambda k: ",".join(str(i) for i, x in enumerate(k) if x)  # noqa: E731
    (_, s_cold, _, _), (_, s_warm, _, r_warm) = setups
    cold_layers_new = s_cold.get("layers", 0.0) - w_p  # the plain greedy ran only for the comparison
    cold_layers_old = s_cold.get("layers", 0.0) - w_r
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        "(other processes share the 2 cores)",
        "- what: the setup of `python -m dpflat train --variant dpflat` (safe, seed 0, CLI defaults: 30 warm-up steps, "
        "128 public examples, 3 random directions, n_drop 2, teacher 1 epoch on 500 public examples), `max_steps=1`. "
        "Run 1 (fresh output dir) runs the greedy elimination on the same scorer twice: on the one padded batch of "
        "128 (before) and on length groups of 32 with the padding cut (now), in that order; run 2 (same output dir, "
        "ε=3) takes both from the setup cache",
        "",
        "| scoring batches | padded positions | keep layers | dropped (in order) | greedy wall s | greedy CPU s |",
        "|---|---:|---|---|---:|---:|",
        f"| plain (1 batch of 128) | {pos(got['plain'])} | {keep(kp)} | {[r['dropped'] for r in tp[1:]]} | {w_p:.1f} | {c_p:.1f} |",
        f"| regrouped by length (groups of 32) | {pos(got['regrouped'])} | {keep(kr)} | {[r['dropped'] for r in tr[1:]]} | "
        f"{w_r:.1f} | {c_r:.1f} |",
        "",
        f"- same keep-mask: **{kr == kp}**; largest relative S difference over every candidate of every round: "
        f"{max(diffs):.1e}; greedy speed-up {w_p / w_r:.2f}x wall, {c_p / c_r:.2f}x CPU",
        "",
        "| setup (wall s) | layer selection | teacher |",
        "|---|---:|---:|",
        f"| cold, before (plain scoring batch) | {cold_layers_old:.1f} | {s_cold.get('distill', 0):.1f} |",
        f"| cold, now (regrouped scoring batches) | {cold_layers_new:.1f} | {s_cold.get('distill', 0):.1f} |",
        "| warm (same output dir, ε=3: both from the setup cache) | "
        f"{s_warm.get('layers', 0):.1f} | {s_warm.get('distill', 0):.1f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_append:
        _report.append("bench_train --check-ranking: DP-Flat(safe) setup at the CLI defaults, cold vs warm cache, "
                       "and the layer ranking on regrouped vs plain scoring batches", lines)
    return text


#: one timed training run in a child process; run against any checkout (``PYTHONPATH``): the
#: baseline commit and the working tree use the same script, so the same Poisson batches are timed
_PATH_RUNNER = r"""
import json, sys, time, torch
from dpflat import privacy as P
from dpflat.cli import quiet_libraries
from dpflat.config import RunConfig, apply_variant
from dpflat.train import train
spec = json.loads(sys.argv[1])
quiet_libraries()
torch.set_num_threads(spec["threads"])
count = [0]
orig = P.PrivateSplit.count
def counting(self, who, how, accounted, examples):
    if who in ("train/dp-sgd", "train/non-private"):
        count[0] += int(examples)
    return orig(self, who, how, accounted, examples)
P.PrivateSplit.count = counting
cfg = apply_variant(RunConfig(), spec["variant"], "safe").replace(**spec["over"])
stamps, ex, c0 = [], [], time.process_time()
def on_step(row):
    stamps.append(time.perf_counter()); ex.append(count[0])
train(cfg, resume=False, max_steps=spec["steps"], on_step=on_step, noise_seed=spec["noise_seed"])
print("RESULT " + json.dumps({"stamps": stamps, "examples": ex}))
"""


def _baseline_tree(rev: str) -> str:
    """The tree of ``rev`` exported into a temporary folder (git archive): the code to compare against."""
    import subprocess

    d = tempfile.mkdtemp(prefix=f"bench-base-{rev[:8]}-")
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    return d


def compare_paths(a) -> str:
    """examples/s of DP-SGD at the CLI defaults: the baseline commit's code, today's code with its
    old per-batch cut and dropout, and today's defaults, interleaved (ABC CBA ...) in child processes
    on the same Poisson batches (one operator noise seed); ratios of matched steps."""
    import json
    import subprocess

    from dpflat.config import RunConfig

    base_dir = _baseline_tree(a.baseline_rev)
    d = RunConfig()  # today's CLI defaults, passed explicitly so the old code runs the same sizes
    sizes = {"data": {"train_size": d.data.train_size, "public_size": d.data.public_size, "data_dir": a.data_dir},
             "train": {"epochs": d.train.epochs, "batch_size": d.train.batch_size, "lr": d.train.lr,
                       "physical_batch_size": d.train.physical_batch_size, "progress": False,
                       "checkpoint_every": 10**6, "eval_every": 10**6}}
    old_model = {"backbone_dropout": True, "head_dropout": 0.1}
    paths = [
        ("baseline", f"code at {a.baseline_rev[:8]} (arrival-order cut, dropout on)", base_dir,
         {"data": sizes["data"], "train": sizes["train"], "model": {"head_dropout": 0.1}}),
        ("old-cut", "today's code, --group-by-length off, backbone and head dropout on", str(ROOT),
         {"data": sizes["data"], "train": {**sizes["train"], "group_by_length": "off"}, "model": old_model}),
        ("new", "today's CLI defaults (length-grouped physical batches; dropout as configured)", str(ROOT),
         {"data": sizes["data"], "train": sizes["train"]}),
    ]
    steps = a.warmup_steps + a.timed_steps
    runs: dict[str, list[list[float]]] = {k: [] for k, *_ in paths}
    exs: dict[str, list[list[int]]] = {k: [] for k, *_ in paths}
    load0 = os.getloadavg()
    for rnd in range(a.rounds):
        for key, _, tree, over in (paths if rnd % 2 == 0 else paths[::-1]):
            out = tempfile.mkdtemp(prefix=f"bench-path-{key}-")
            spec = {"variant": "dp", "threads": a.threads or 2, "steps": steps, "noise_seed": 20261207,
                    "over": {**over, "train": {**over["train"], "output_dir": out}, "privacy": {"epsilon": 8.0}}}
            env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
            p = subprocess.run([sys.executable, "-c", _PATH_RUNNER, json.dumps(spec)], capture_output=True, text=True,
                               env=env, cwd=tree)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{key} failed:\n{p.stderr[-2000:]}")
            r = json.loads(line[7:])
            st, ex = r["stamps"], r["examples"]
            runs[key].append([st[k] - st[k - 1] for k in range(a.warmup_steps, steps)])
            exs[key].append([ex[k] - ex[k - 1] for k in range(a.warmup_steps, steps)])
            print(f"[round {rnd}] {key}: {sum(exs[key][-1]) / sum(runs[key][-1]):.1f} ex/s", flush=True)
    load1 = os.getloadavg()
    rate = {k: sum(map(sum, exs[k])) / sum(map(sum, runs[k])) for k in runs}

    def matched(slow: str, fast: str) -> float:
        rs = [s / f for rs_, rf in zip(runs[slow], runs[fast]) for s, f in zip(rs_, rf)]
        return statistics.median(rs)

    assert all(exs[k] == exs["baseline"] for k in exs), "the paths did not train on the same Poisson batches"
    tab = ["| path | what | DP-SGD examples/s | vs baseline (rate) | vs baseline (median of matched steps) |",
           "|---|---|---:|---:|---:|"]
    for key, label, _, _ in paths:
        tab.append(f"| {key} | {label} | {rate[key]:.1f} | {rate[key] / rate['baseline']:.2f}× | "
                   f"{matched('baseline', key):.2f}× |")
    r = rate["new"] / rate["baseline"]
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end",
        f"- what: DP-SGD (`--variant dp`, ε = 8) at today's CLI defaults (SST-2, MiniLM-L6, {d.data.train_size} private "
        f"examples, logical batch {d.train.batch_size}, physical {d.train.physical_batch_size}), each path in its own "
        f"child process with {a.threads or 2} torch threads, {a.rounds} rounds in alternating order; the same operator "
        f"noise seed, so every path trains on the same Poisson batches (checked); {a.warmup_steps} warm-up steps "
        f"dropped, {a.timed_steps} timed; baseline = `git archive {a.baseline_rev}`",
        "",
        *tab,
        "",
        f"- today's defaults vs the baseline: **{r:.2f}×** examples/s (goal ≥ 3×: **{'met' if r >= 3 else 'NOT met'}**)",
    ]
    _report.publish("bench_train --paths: DP-SGD throughput of the baseline and today's code, side by side", lines,
                    not a.no_append)
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps, 1 profiled step, 2 eval repeats")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; quick 1; >= 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 3)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps after the timed ones (default 2)")
    p.add_argument("--eval-repeats", type=int, default=None, help="eval/forward passes timed (default 3)")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    p.add_argument("--rounds", type=int, default=2,
                   help="run the variants this many times, alternating the order (ABBA...), and pool the steps: "
                        "a variant that always runs later in the process would otherwise carry the drift")
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--append", action="store_true", help="append to RESULTS.md even with --quick")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--end-to-end", action="store_true",
                   help="instead: whole-run wall time at the CLI defaults, DP vs DP-Flat(safe) with a cold and a "
                        "warm setup cache (ABBA: dp, dpflat cold, dpflat warm, dp); see end_to_end()")
    p.add_argument("--no-warm", action="store_true", help="--end-to-end without the warm-cache run (ABA)")
    p.add_argument("--levels", action="store_true",
                   help="with --end-to-end: each level alone instead (dp, dp+awp, dp+layers, dp+distill, dp); "
                        "see end_to_end_levels()")
    p.add_argument("--check-ranking", action="store_true",
                   help="instead: the CLI-default layer selection scored on the plain fixed batch and on the "
                        "length-regrouped batches (the new default): same keep-mask? S differences? time?")
    p.add_argument("--paths", action="store_true",
                   help="instead: DP-SGD examples/s at the CLI defaults of a baseline commit's code, today's code with "
                        "the old cut, and today's defaults, side by side (see compare_paths)")
    p.add_argument("--baseline-rev", default="648505a", help="with --paths: the commit to compare against")
    p.add_argument("--warmup-steps", type=int, default=2, help="with --paths: steps dropped")
    p.add_argument("--timed-steps", type=int, default=8, help="with --paths: steps timed")
    a = p.parse_args(argv)
    if a.paths:
        return compare_paths(a)
    if a.end_to_end:
        return end_to_end_levels(a) if a.levels else end_to_end(a)
    if a.check_ranking:
        return check_ranking(a)
    q = a.quick
    a.warmup = max(1, a.warmup if a.warmup is not None else (1 if q else 3))
    a.steps = a.steps if a.steps is not None else (3 if q else 10)
    a.profile_steps = a.profile_steps if a.profile_steps is not None else (1 if q else 2)
    a.eval_repeats = a.eval_repeats if a.eval_repeats is not None else (2 if q else 3)
    quiet_libraries()
    if a.threads:
        torch.set_num_threads(a.threads)

    load0, t_all = os.getloadavg(), time.time()
    rss = RSSPeak()
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        base = base_config(a, out)
        wanted = a.variants.split(",")
        chosen = [v for v in VARIANTS if v[0] in wanted]
        rounds: dict[str, list[dict]] = {}
        for rnd in range(a.rounds):
            for key, label, priv, flat in (chosen if rnd % 2 == 0 else chosen[::-1]):
                if rounds.get(key) and "error" in rounds[key][0]:
                    continue
                t = time.time()
                try:
                    cfg = base.replace(privacy=priv, flat={"awp": False, "layers": False, "distill": False, **flat},
                                       train={"run_name": f"{key}_r{rnd}"}, variant=key)
                except ValueError as e:  # ConfigError: a mode the loop refuses is reported, not fatal
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"[:200]}
                else:
                    r = run_variant(cfg, a, rss, profile=rnd == a.rounds - 1)
                rounds.setdefault(key, []).append(r)
                if "error" in r:
                    print(f"{key}: FAILED {r['error']}", flush=True)
                else:
                    print(f"[round {rnd}] {key}: median step {r['step_s']:.3f} s, {r['ex_per_s']:.1f} ex/s, "
                          f"mean batch {r['mean_batch']:.1f}, first step at {r['first_step_at']:.1f} s, "
                          f"setup {r['setup']}, peak RSS +{r['rss_delta_mb']:.0f} MB ({time.time() - t:.0f} s)",
                          flush=True)
        res = {key: pool(rs) for key, rs in rounds.items()}
        ev = eval_vs_forward(base, a)
        print(f"eval {ev['eval']:.1f} ex/s vs training-mode forward {ev['train_fwd']:.1f} ex/s", flush=True)
    rss.stop()
    load1, wall = os.getloadavg(), time.time() - t_all

    # ---- table
    npv = res.get("nonprivate", {})
    lines_tab = ["| configuration | median step (s) | examples/s | mean batch | step time / non-private | "
                 "examples/s vs non-private | peak RSS during steps (MB; + over pre-variant RSS) | "
                 "time to first step (s) | one-off setup (s) |",
                 "|---|---|---|---|---|---|---|---|---|"]
    for key, label, _, _ in VARIANTS:
        if key not in res:
            continue
        r = res[key]
        if "error" in r:
            lines_tab.append(f"| {label} | not run: `{r['error']}` | — | — | — | — | — | — | — |")
            continue
        ratio = f"{r['step_s'] / npv['step_s']:.2f}×" if "step_s" in npv else "—"
        eratio = f"{r['ex_per_s'] / npv['ex_per_s']:.2f}×" if "ex_per_s" in npv else "—"
        setup = ", ".join(f"{k} {v:.1f}" for k, v in r["setup"].items()) or "—"
        lines_tab.append(
            f"| {label} | {r['step_s']:.3f} | {r['ex_per_s']:.1f} | {r['mean_batch']:.1f} | {ratio} | {eratio} | "
            f"{r['rss_peak_mb']:.0f} (+{r['rss_delta_mb']:.0f}) | {r['first_step_at']:.1f} | {setup} |")

    goals, profiles = [], []

    def ok(x):
        return "met" if x else "NOT met"

    fl, dp, aw = res.get("dpflat", {}), res.get("dp", {}), res.get("dp+awp", {})
    if "step_s" in fl and "step_s" in npv:
        r1 = fl["step_s"] / npv["step_s"]
        goals.append(f"- DP-Flat(safe) step / non-private step = **{r1:.2f}×** (goal ≤ 1.15×): **{ok(r1 <= 1.15)}**; "
                     f"per example: {npv['ex_per_s'] / fl['ex_per_s']:.2f}×")
        if r1 > 1.15 and "profile" in fl:
            profiles += ["", "Profile of the DP-Flat(safe) step (slower) vs the non-private step, torch.profiler CPU, "
                         f"{a.profile_steps} step(s) after the timed ones:", ""]
            profiles += profile_table(fl["profile"], npv.get("profile"), "DP-Flat(safe)", "non-private")
    if "step_s" in aw and "step_s" in dp:
        r2 = aw["step_s"] / dp["step_s"]
        pr = paired_ratio(aw, dp)
        goals.append(f"- safe AWP step / plain DP step = **{r2:.2f}×** (goal ≤ 1.05×): **{ok(r2 <= 1.05)}**; "
                     f"per example: {dp['ex_per_s'] / aw['ex_per_s']:.2f}×"
                     + (f"; median of per-step ratios on the same Poisson batches: {pr:.2f}×" if pr else ""))
        if r2 > 1.05 and "profile" in aw:
            profiles += ["", "Profile of the DP+AWP(safe) step (slower) vs the plain DP step:", ""]
            profiles += profile_table(aw["profile"], dp.get("profile"), "DP+AWP(safe)", "DP")
    r3 = ev["eval"] / ev["train_fwd"]
    goals.append(f"- evaluation ({ev['eval']:.1f} ex/s) / training-mode forward ({ev['train_fwd']:.1f} ex/s) = "
                 f"**{r3:.2f}×** (goal ≥ 2×): **{ok(r3 >= 2)}**")
    if r3 < 2:
        profiles += ["", f"Profile of one training-mode forward pass over the {ev['n']} eval sentences (slower) vs "
                     "one evaluate() pass (totals per pass, not per step):", ""]
        profiles += profile_table(ev["train_fwd_profile"], ev["eval_profile"], "train-mode fwd", "evaluate", unit="pass")
    if "step_s" in dp and "step_s" in npv:
        goals.append(f"- (info) plain DP (hooks) / non-private step: {dp['step_s'] / npv['step_s']:.2f}×")

    per_step = []
    for key in res:
        if "steps_s" in res[key]:
            per_step.append(f"{key}: " + ", ".join(f"{x:.2f}" for x in res[key]["steps_s"]))

    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
        f"wall time {wall / 60:.1f} min",
        f"- setting: SST-2 from ../shared/data, {a.train_size} private examples (public 500), backbone {a.backbone}, "
        "prefix m=16, max_length 64 (all-padding columns trimmed per batch), logical batch 64 (Poisson for DP, so "
        "the DP batch size varies and a batch > 64 takes 2 physical steps of BatchMemoryManager), physical 64, "
        "AdamW, ε=8, C=1; FlatConfig defaults otherwise (AWP γ=0.01 active on every measured step; layers drop 2 "
        "of 6 with 30 public warm-up steps, 128 examples, 3 random directions; teacher 1 epoch on public)",
        f"- method: `dpflat.train.train(cfg, max_steps=..., on_step=...)` per variant, back to back in one process, "
        f"{a.rounds} round(s) in alternating order (ABBA...); "
        f"step time = interval between consecutive on_step callbacks; {a.warmup} warm-up step(s) dropped, median of "
        f"{a.steps} timed steps per round, pooled over rounds; examples/s = examples in the timed steps / their total time. The DP variants see "
        "the same Poisson batches (the loop reseeds per step); non-private sees shuffled batches of exactly 64",
        "- memory: RSS sampled every 5 ms by a psutil thread (tracemalloc does not see torch); 'peak RSS during "
        "steps' is the peak over the timed steps, '+' is that minus the RSS just before the variant started "
        f"(process ru_maxrss at the end: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)",
        "- one-off setup: the layers / distill levels' `setup` wall time (not in the per-step cost); "
        "'time to first step' includes data loading, tokenisation, model build, make_private, setup and step 1",
        f"- evaluation: `dpflat.evaluate.evaluate` (eval mode, inference_mode) vs the same model in train mode with "
        f"autograd on (forward + CE loss, no backward), {ev['n']} eval sentences in batches of {ev['batch']}, "
        f"median of {a.eval_repeats} passes after one warm-up",
        "",
        *lines_tab,
        "",
        "Goals:",
        *goals,
        "",
        "Per-step times (s): " + "; ".join(per_step),
        *profiles,
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_append and (not q or a.append):
        _report.append("bench_train: step cost of non-private / DP / AWP / DP-Flat, and evaluation throughput", lines)
    return text


if __name__ == "__main__":
    main()
