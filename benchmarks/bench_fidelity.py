"""Fidelity benchmark: does DP-Flat (safe) act? Test accuracy of each level against DP with
paired 95% intervals, the fraction of the DP -> non-private gap closed, flatness and run cost.

The study grid (``--grid study``, the default since 2026-12-07, issue 27): the CLI defaults (the
study regime, chosen on val: ``benchmarks/bench_regime.py``), variants nonprivate, dp, dp+awp,
dp+layers, dp+distill and dpflat (safe), ε ∈ {3, 8}, seeds 0..4, on SST-2 and MPQA, with
MPQA's own size (``TASK_REGIME``). MPQA by measurement (bench_regime, val): its non-private model
reaches 0.89 against a majority class of about 0.73, DP costs 3 points and the prefix carries the
learning; QNLI stayed near chance even without DP in the old table, and TREC's regime run was not
finished.
Its parts (``--part``):

- ``main``: the grid above;
- ``selector``: SST-2, ε = 3, seeds 0..2: the layer selector against all layers kept (dp), the
  authors' hand-picked dropped layers (roberta-base's, scaled to the backbone's depth) and a
  random keep-mask with the same n_drop (drawn from the public seed);
- ``lambda``: SST-2, ε = 3, seeds 0..2: dp+distill at λ ∈ {0.001, 0.01, 0.1, 1}, norm and
  squared norm;
- ``gamma``: SST-2, ε = 3, seeds 0..2: dp+awp at γ ∈ {0.001, 0.01, 0.1, 1}.
- ``public``: SST-2, ε = 3, seeds 0..2: dp and dp+distill with a public split of 250, 500 and 1,000
  examples (the main grid has 2,000), each beside its safe teacher alone. Why: at 2,000 public
  examples the teacher alone is as good as its distilled student, so whether the private data adds
  anything shows only where the teacher is weaker. The public size also moves the val and private
  splits (``splits.make_splits`` draws public first), so each size is paired with its own dp.

Checkpoints are selected on the validation split; the test split (the task's eval file) is read
once per run, at its end. Nothing is tuned here. Flatness is measured on the first 128 test
examples over the trainable parameters (``dpflat.analysis``): a run that keeps fewer prefix
layers (dp+layers, dpflat) is measured in a smaller parameter space than dp, so the table marks
which rows share dp's.

``--grid old`` prints the table of the old defaults (2,000 private examples, 2 epochs, batch 128,
linear head, 1-epoch teacher, 30-step dropout warm-up scorer: the 5-seed table of 2026-12-05)
from its committed record (``benchmarks/fidelity_cells.jsonl``) alone: that code no longer
trains those configurations (their run ids are of the old config), so nothing is trained.

Resumable: cells are run folders under ``--output-dir`` (finished ones are skipped, an
interrupted one resumes from its checkpoint) and landscapes are cached in them. A finished and
measured cell is also written to ``--record`` (``benchmarks/fidelity_study_cells.jsonl`` for the
study grid, committed: ``_cells.CellRecord``), so a fresh clone on another machine skips it and
still prints it in the table; run folders do not outlive the machine. Cells run seed-major, so
every (task, variant, ε) gets its first seeds before any gets a fifth. The table is appended to
benchmarks/RESULTS.md, marked PARTIAL with the number of finished cells when some are missing;
``--report-only`` writes the table of what exists without training. ``--tiny`` is the test mode
(tiny random BERT, a few steps).

    nohup python benchmarks/bench_fidelity.py --num-threads 1 --no-append > fidelity.log 2>&1 &
    python benchmarks/bench_fidelity.py --report-only     # also records cells finished meanwhile
    git add benchmarks/fidelity_study_cells.jsonl         # what the next machine continues from
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import _report  # noqa: E402
from _cells import CellRecord  # noqa: E402

#: the study grid's variants (safe mode) and the old grid's (safe and paper)
VARIANTS = ["nonprivate", "dp", "dp+awp", "dp+layers", "dp+distill", "dpflat"]
OLD_VARIANTS, OLD_MODES = ["nonprivate", "dp", "dpflat"], ["safe", "paper"]
PARTS = ("main", "selector", "lambda", "gamma", "public")
#: the public part's public split sizes (the main grid's default, 2,000, is its largest point)
PUBLIC_SIZES, TINY_PUBLIC_SIZES = [250, 500, 1000], [16, 32]
#: the sensitivity grids (SST-2, ε = 3, seeds 0..2)
LAMBDAS = [(0.001, False), (0.01, False), (0.1, False), (1.0, False), (0.001, True), (0.01, True), (0.1, True),
           (1.0, True)]
GAMMAS = [0.001, 0.01, 0.1, 1.0]
PART_SEEDS = [0, 1, 2]
#: per task, what differs from the CLI defaults (the regime measured for it on val, bench_regime):
#: MPQA has 4,352 private rows after its public (2,000) and val splits and deduplication: all of them,
#: 4 epochs (68 steps at batch 256)
TASK_REGIME = {"mpqa": {"data": {"train_size": 0}, "train": {"epochs": 4.0}}}
#: test examples the flatness figures use (Lanczos + SAM on a loaded 2-core CPU: minutes per run)
N_LANDSCAPE = 128
#: the row of the dp+distill cell's safe teacher evaluated by itself (``teacher_alone``)
TEACHER = "safe teacher alone"
ORDER = {"nonprivate": 0, "dp": 1, "dp+awp-safe": 2, "dp+layers-safe": 3, TEACHER: 3.5, "dp+distill-safe": 4,
         "dpflat-safe": 5, "dpflat-paper": 6}
#: variants whose flatness is measured in dp's parameter space (every prefix layer kept)
ALL_LAYERS = ("nonprivate", "dp", "dp+awp-safe", "dp+distill-safe", TEACHER)


def base_config(a):
    from dpflat.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    if a.tiny:
        return RunConfig(
            data=DataConfig(data_dir=a.data_dir, max_length=24, train_size=64, public_size=48, val_size=32,
                            eval_size=48),
            model=ModelConfig(backbone="tiny-bert", prefix_len=4, prefix_init="random", attn="eager"),
            train=TrainConfig(epochs=1, batch_size=16, physical_batch_size=16, output_dir=a.output_dir,
                              progress=False, num_threads=a.num_threads),
        ).replace(flat={"layers_warmup_steps": 2, "layers_examples": 16, "n_drop": 1, "teacher_epochs": 0.5})
    return RunConfig(data=DataConfig(data_dir=a.data_dir),
                     train=TrainConfig(output_dir=a.output_dir, progress=False, num_threads=a.num_threads))


def grid(a):
    """All cells of the chosen parts, seed-major; inside a seed and task: nonprivate, then per ε
    dp and the levels, so that a partial table compares every variant at the first ε."""
    from dpflat.sweep import cells

    base = base_config(a)
    out = []
    if "main" in a.parts:
        for seed in a.seeds:
            for task in a.tasks:
                tb = base.replace(data={"task": task})
                cs = cells(tb.replace(**TASK_REGIME.get(task, {})), VARIANTS, a.epsilons, [seed], ["safe"])
                out += sorted(cs, key=lambda c: (c.privacy.enabled, a.epsilons.index(c.privacy.epsilon)
                                                 if c.privacy.enabled else 0, ORDER.get(c.variant, 9)))
    side = [p for p in a.parts if p != "main"]
    if side:
        sst2 = base.replace(data={"task": a.tasks[0]}, privacy={"epsilon": a.epsilons[0]})
        for seed in [s for s in PART_SEEDS if s in a.seeds]:
            for part in side:
                out += part_cells(part, sst2.replace(train={"seed": seed}))
    return out


def _keep(n_layers: int, drop: set[int]) -> str:
    return ",".join(str(i) for i in range(n_layers) if i not in drop)


def part_cells(part: str, base) -> list:
    """The side grid ``part`` at one seed: configs with their own variant labels (paired with dp)."""
    import random

    from dpflat.config import PAPER_DROPPED_LAYERS, PAPER_N_LAYERS, apply_variant
    from dpflat.models import check_layers

    if part == "selector":
        n = check_layers(base.model) or 6
        k = base.flat.n_drop
        # the authors' dropped layers of roberta-base (12 layers) for the task, scaled to this depth
        scaled = sorted({min(n - 1, l * n // PAPER_N_LAYERS) for l in PAPER_DROPPED_LAYERS.get(base.data.task, ())})
        authors = set(scaled[:k]) if len(scaled) >= k else set(scaled)
        rnd = set(random.Random(f"random-mask:{base.train.seed}").sample(range(n), k))  # public: the seed
        dp = apply_variant(base, "dp")
        return [dp.replace(model={"keep_layers": _keep(n, authors)}, variant="dp+keep[authors]"),
                dp.replace(model={"keep_layers": _keep(n, rnd)}, variant="dp+keep[random]")]
    if part == "lambda":  # the default (λ, squared) is the main grid's dp+distill cell
        d = apply_variant(base, "dp+distill")
        return [d.replace(flat={"distill_lambda": lam, "distill_squared": sq},
                          variant=f"dp+distill[λ={lam:g}{',sq' if sq else ''}]") for lam, sq in LAMBDAS
                if (lam, sq) != (d.flat.distill_lambda, d.flat.distill_squared)]
    if part == "gamma":  # the default γ is the main grid's dp+awp cell
        w = apply_variant(base, "dp+awp")
        return [w.replace(flat={"awp_gamma": g}, variant=f"dp+awp[γ={g:g}]") for g in GAMMAS if g != w.flat.awp_gamma]
    if part == "public":  # each size with its own dp: the private split moves with the public one
        out = []
        for n in (TINY_PUBLIC_SIZES if base.data.public_size < 100 else PUBLIC_SIZES):
            b = base.replace(data={"public_size": n})
            out += [apply_variant(b, "dp").replace(variant=f"dp[public={n}]"),
                    apply_variant(b, "dp+distill").replace(variant=f"dp+distill[public={n}]")]
        return out
    raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


def landscape(run_dir: str, a) -> None:
    from dpflat.analysis import analyze_run

    analyze_run(run_dir, top_k=1, surface=False, density=False, n_examples=16 if a.tiny else N_LANDSCAPE,
                split="eval", trace_matvecs=3, progress=False)


def cell_key(c) -> str:
    """The record's key of a grid cell: its run id with the data folder left out. A run id
    hashes the data folder's *path*, which differs between machines and CI clones; the files
    (``../shared/data``) are the same, and the record must be found from any of them."""
    from dpflat.runs import run_id

    return run_id(c.replace(data={"data_dir": None}))


def record_finished(a) -> int:
    """Copy every finished (and, unless --no-landscape, measured) cell of the grid that the
    record lacks into it: results row, flatness, per-example test correctness. Returns how
    many were added."""
    if a.record is None or a.grid == "old":
        return 0
    from dpflat.runs import RunDir, load_results

    rec = CellRecord(a.record)
    have = rec.cells()
    t = load_results(a.output_dir) if Path(a.output_dir).is_dir() else None
    if t is None or not len(t):
        return 0
    rows = {r["run_id"]: r for r in t.to_dict("records") if bool(r.get("finished"))}
    added = 0
    for c in grid(a):
        rd = RunDir.for_config(c)
        rid, key = rd.path.name, cell_key(c)
        if key in have or rid not in rows or not rd.done:
            continue
        row = {k: v for k, v in rows[rid].items() if k != "run_dir"}
        s = rd.landscape()
        if a.landscape and (s is None or s.get("top_eigenvalue") is None):
            continue  # a cell = trained + measured
        if s is not None:
            row["top_eigenvalue"], row["sam_sharpness"] = s.get("top_eigenvalue"), s.get("sam_sharpness")
        added += rec.add(key, row, rd.test_correct())
    return added


def has_teacher_row(c) -> bool:
    """The cells whose teacher gets a row: the main grid's dp+distill and the public part's (the
    λ part's teachers are the main grid's: λ does not enter the teacher's fit)."""
    return c.variant == "dp+distill-safe" or c.variant.startswith("dp+distill[public=")


def teacher_key(c) -> str:
    """The record's key of the teacher row that pairs with the dp+distill cell ``c``."""
    return "teacher:" + cell_key(c)


def teacher_alone(c) -> tuple[dict, object]:
    """The safe teacher of the dp+distill cell ``c`` by itself: its fit (the cached one when the cell
    was trained under the same output dir) and one read of the test split.

    Why: distillation pulls the DP student toward a model trained on the public split only; what
    that model scores on its own (no private data, no ε) is the baseline the student's gain must
    be read against -- a student that only matches its teacher gained nothing from its private data.
    Returns (results row, per-example 0/1 test correctness).
    """
    from dpflat.evaluate import evaluate_test
    from dpflat.flat._fit import level_fit
    from dpflat.flat.base import TrainContext
    from dpflat.models import build_model, load_tokenizer
    from dpflat.privacy import PrivacyLedger, PrivateSplit
    from dpflat.session import prepare_data, start_run

    device = start_run(c)
    tok = load_tokenizer(c.model)
    card, _, tokd = prepare_data(c, tok)
    model = build_model(c.model, len(card.labels), seed=c.train.seed, task=card.name, tokenizer=tok).to(device)
    ledger = PrivacyLedger()
    ctx = TrainContext(c, model, PrivateSplit(tokd["private"], ledger), tokd["public"], tokd["val"], ledger, device)
    t0 = time.time()
    teacher, report, cached = level_fit(ctx, ctx.public, kind="teacher", seed=c.train.seed + 17, cache=True)
    if ledger.reads:  # the safe teacher must not have read the private split
        raise RuntimeError(f"the safe teacher read private data: {ledger.reads}")
    final, per_ex = evaluate_test(teacher, tokd["eval"], c.train.eval_batch_size, device, c.train.resolved_precision())
    order = per_ex["idx"].argsort(kind="stable")
    label = TEACHER if c.variant == "dp+distill-safe" else f"{TEACHER} [public={c.data.public_size:g}]"
    row = {"run_id": teacher_key(c), "task": c.data.task, "variant": label, "seed": c.train.seed,
           "target_epsilon": c.privacy.epsilon, "guarantee": "reads no private data", "accuracy": final["accuracy"],
           "test_accuracy": final["accuracy"], "test_loss": final["loss"], "val_accuracy": report.val_accuracy,
           "n_eval": final["n"], "finished": True, "info_teacher_steps": report.steps,
           "info_teacher_best_step": report.best_step, "info_teacher_cached": cached,
           "setup_s": report.seconds if not cached else float("nan"), "wall_s": time.time() - t0}
    return row, per_ex["correct"].astype("float64")[order]


def record_teachers(a) -> int:
    """Add the teacher row of every recorded dp+distill cell (main grid, public part) that lacks one."""
    if a.record is None or a.grid == "old":
        return 0
    rec = CellRecord(a.record)
    have, added = rec.cells(), 0
    recorded = {r["cell"]: r for r in rec.rows()}
    for c in grid(a):
        key = cell_key(c)
        if not has_teacher_row(c) or teacher_key(c) in have or key not in recorded:
            continue
        print(f"the safe teacher alone: {c.data.task} seed {c.train.seed} ε {c.privacy.epsilon:g} ...", flush=True)
        row, correct = teacher_alone(c)
        want = recorded[key].get("info_teacher_val_accuracy")
        if want is not None and abs(float(want) - row["val_accuracy"]) > 1e-9:  # not the cell's teacher
            print(f"  its val accuracy {row['val_accuracy']:.4f} differs from the cell's teacher ({float(want):.4f}): "
                  "not recorded", flush=True)
            continue
        added += rec.add(teacher_key(c), row, correct)
    return added


def run_cells(a) -> None:
    from dpflat.runs import RunLocked
    from dpflat.sweep import trainer

    todo = grid(a)
    recorded = CellRecord(a.record).cells() if a.record else set()
    for i, c in enumerate(todo):
        if cell_key(c) in recorded:
            continue
        t0 = time.time()
        try:
            res = trainer(c)(c)
        except RunLocked as e:
            print(f"skipped (locked): {e}", flush=True)
            continue
        if a.landscape:  # cached per run; also puts its columns back into a row that train() re-appended
            landscape(res["run_dir"], a)
        print(f"[{i + 1}/{len(todo)}] {c.data.task} {res['variant']} ε={res.get('target_epsilon')} "
              f"seed={res['seed']} test={res['accuracy']:.4f} val={res.get('val_accuracy', float('nan')):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
        record_finished(a)


def table_lines(a) -> tuple:
    """(markdown lines, finished cells, grid cells, paired differences to dp)."""
    import pandas as pd

    from dpflat.analysis import load_analysis
    from dpflat.runs import RunDir, load_results
    from dpflat.stats import load_correct, paired_differences

    g = grid(a) if a.grid == "study" else []
    key_of = {RunDir.for_config(c).path.name: cell_key(c) for c in g}  # run id -> cell
    teachers = {teacher_key(c) for c in g if has_teacher_row(c)}

    def _flatness(row):
        """From the run's landscape.json (the table row can lose them when a finished cell is re-appended)."""
        if row["cell"] in recorded:
            return row.get("top_eigenvalue"), row.get("sam_sharpness")
        try:
            s = load_analysis(row["run_dir"])
            return s.get("top_eigenvalue"), s.get("sam_sharpness")
        except (FileNotFoundError, TypeError):
            return row.get("top_eigenvalue"), row.get("sam_sharpness")

    rec = CellRecord(a.record) if a.record else None
    kept = pd.DataFrame(rec.rows()) if rec else pd.DataFrame()
    if a.grid == "study":  # the old grid: every recorded cell (its configurations are not rebuilt)
        kept = kept[kept["cell"].isin(set(key_of.values()) | teachers)] if len(kept) else kept
    t = load_results(a.output_dir) if Path(a.output_dir).is_dir() and g else pd.DataFrame()
    t = t[t["run_id"].isin(key_of) & t["finished"].astype(bool)].copy() if len(t) else t
    if len(t):
        t["cell"] = t["run_id"].map(key_of)
    if len(kept) and len(t):  # a recorded cell is read from the record
        t = t[~t["cell"].isin(set(kept["cell"]))]
    t = pd.concat([x for x in (kept, t) if len(x)], ignore_index=True) if len(kept) or len(t) else t
    total = len(g) if g else len(kept)
    if not len(t):
        return ["(no finished cells yet)"], 0, total, pd.DataFrame()
    t = t.copy()
    if "run_dir" not in t:
        t["run_dir"] = None
    recorded = set(kept["cell"]) if len(kept) else set()
    for col in ("val_accuracy", "top_eigenvalue", "sam_sharpness", "wall_s", "setup_s", "examples_per_s", "peak_mem_mb"):
        if col not in t:
            t[col] = float("nan")
    flat = pd.DataFrame([_flatness(r) for r in t.to_dict("records")], index=t.index,
                        columns=["top_eigenvalue", "sam_sharpness"])
    t["top_eigenvalue"], t["sam_sharpness"] = flat["top_eigenvalue"], flat["sam_sharpness"]
    done = int(t["top_eigenvalue"].notna().sum()) if a.landscape else len(t)  # a cell = trained + measured
    t["eps"] = pd.to_numeric(t["target_epsilon"], errors="coerce").fillna(float("inf"))
    def correct(r):
        return rec.correct(r["cell"]) if r["cell"] in recorded else load_correct(r)

    # the public part pairs within each public size (its own dp): its own table, not this one
    in_pub = t["variant"].astype(str).str.contains("[public=", regex=False)
    pub, t = t[in_pub | t["variant"].isin(["dp", "dp+distill-safe", TEACHER])], t[~in_pub]
    paired = paired_differences(t, "dp", "accuracy", correct=correct)
    rows = []
    for (task, v, e), gg in t.groupby(["task", "variant", "eps"]):
        p = paired[(paired["task"] == task) & (paired["variant"] == v) & (paired["target_epsilon"] == e)]
        rows.append((task, e, ORDER.get(v, 9), v, gg, p))
    lines = ["| task | variant | target ε | guarantee | seeds | test acc (mean ± std) | val acc | Δ vs dp [95% CI] | "
             "gap closed | top Hessian eig | SAM sharpness | dp's space | wall s | setup s | ex/s | peak MiB |",
             "|" + "---|" * 16]
    for task, e, _, v, gg, p in sorted(rows, key=lambda r: r[:3]):
        if v == "nonprivate":  # pairs with dp at every ε: the DP -> non-private gap itself
            p = paired[(paired["task"] == task) & (paired["variant"] == v)]
            diff = "; ".join(f"ε{r.target_epsilon:g}: {r.mean_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
                             for r in p.itertuples()) or "—"
            gap = "—"
        elif p.empty:
            diff, gap = "—", "—"
        else:
            r = p.iloc[0]
            diff = f"{r.mean_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]" + (" (crosses 0)" if r.crosses_zero else "")
            gap = "—" if pd.isna(r.gap_closed) else f"{r.gap_closed:+.2f}"
        def m(col, fmt):
            s = pd.to_numeric(gg[col], errors="coerce").dropna()
            return "—" if s.empty else format(s.mean(), fmt)
        lines.append(
            f"| {task} | {v} | {'∞' if e == float('inf') else f'DP-SGD part {e:g}' if v.endswith('paper') else f'{e:g}'} "
            f"| {' / '.join(sorted(set(gg['guarantee'])))} "
            f"| {gg['seed'].nunique()} | {gg['accuracy'].mean():.4f} ± {gg['accuracy'].std(ddof=1) if len(gg) > 1 else 0:.4f} "
            f"| {m('val_accuracy', '.4f')} | {diff} | {gap} | {m('top_eigenvalue', '.3g')} | {m('sam_sharpness', '.3g')} "
            f"| {same_space(v)} | {m('wall_s', '.0f')} | {m('setup_s', '.0f')} | {m('examples_per_s', '.1f')} "
            f"| {m('peak_mem_mb', '.0f')} |")
    if "public" in a.parts and a.grid == "study":
        lines += ["", *public_lines(pub, correct, TINY_PUBLIC_SIZES if a.tiny else PUBLIC_SIZES,
                                    base_config(a).data.public_size, a.epsilons[0])]
    return lines, done, total, paired


def public_lines(t, correct, sizes: list[int], default: float, eps: float = 3.0) -> list[str]:
    """The public part's table: per public split size, the safe teacher alone, dp and dp+distill
    (SST-2, ε = 3, seeds 0..2), the student paired with its own size's dp and with its teacher."""
    from dpflat.stats import paired_differences

    t = t[(t["task"] == "sst2") & (t["eps"] == eps) & t["seed"].astype(int).isin(PART_SEEDS)]
    out = [f"The public part (SST-2, ε = {eps:g}, seeds 0–2): does the distilled student beat its teacher when the "
           "teacher is weaker? Each size is paired with its own dp (the private split moves with the public one); "
           "paired 95% intervals over seeds and test examples.", "",
           "| public examples | seeds | teacher alone (test) | dp (test) | dp+distill (test) | dp+distill − dp [95% CI] "
           "| dp+distill − teacher alone [95% CI] |", "|---:|---:|---:|---:|---:|---|---|"]
    for n in [*sizes, default]:
        names = ({"dp": "dp", "dp+distill-safe": "student", TEACHER: "teacher"} if n == default else
                 {f"dp[public={n}]": "dp", f"dp+distill[public={n}]": "student", f"{TEACHER} [public={n:g}]": "teacher"})
        sub = t[t["variant"].isin(list(names))].copy()
        sub["variant"] = sub["variant"].map(names)

        def acc(v):
            x = sub.loc[sub["variant"] == v, "accuracy"]
            return f"{x.mean():.4f}" if len(x) else "—"

        def diff(base):
            if sub.empty or base not in set(sub["variant"]):
                return "—"
            p = paired_differences(sub, base, "accuracy", correct=correct)
            p = p[p["variant"] == "student"]
            if p.empty:
                return "—"
            r = p.iloc[0]
            return f"{r.mean_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}], n={r.n_pairs}"

        seeds = sub.loc[sub["variant"] == "student", "seed"].nunique() if len(sub) else 0
        out.append(f"| {n:g}{' (main grid)' if n == default else ''} | {seeds} | {acc('teacher')} | {acc('dp')} "
                   f"| {acc('student')} | {diff('dp')} | {diff('teacher')} |")
    return out


def same_space(variant: str) -> str:
    """Whether a variant's flatness is measured over dp's parameters (every prefix layer kept)."""
    return "yes" if variant in ALL_LAYERS or variant.startswith(("dp+awp[", "dp+distill[")) else "no"


def _row_label(variant: str, eps: float, n: int) -> str:
    """Paper mode is not DP: its ε is only the DP-SGD part's; non-private pairs with dp at that ε."""
    if variant == "nonprivate":
        return f"nonprivate (vs dp at ε={eps:g}), n={n}"
    if variant == TEACHER:
        return f"{TEACHER}, no private data (vs dp at ε={eps:g}), n={n}"
    if variant.endswith("paper"):
        return f"{variant}, not DP (DP-SGD part ε={eps:g}), n={n}"
    return f"{variant} ε={eps:g}, n={n}"


def forest_figure(paired, path: Path, partial: str = "") -> Path:
    """Paired differences to dp with their 95% intervals, one panel per task (a forest plot):
    where a bar crosses the dashed zero line, the table cannot tell the variant from dp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(set(paired["task"]))
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(7.2 * max(len(tasks), 1), 3.6), squeeze=False)
    colors = {"nonprivate": "#555555", "dpflat-safe": "#1f77b4", "dpflat-paper": "#ff7f0e", "dp+awp-safe": "#9467bd",
              "dp+layers-safe": "#8c564b", "dp+distill-safe": "#2ca02c", TEACHER: "#98df8a"}
    for ax, task in zip(axes[0], tasks):
        pp = paired[paired["task"] == task].copy()
        pp["o"] = pp["variant"].map(ORDER).fillna(9)
        pp = pp.sort_values(["target_epsilon", "o"], ascending=[True, False])
        labels = []
        for y, r in enumerate(pp.itertuples()):
            c = colors.get(r.variant, "#2ca02c")
            ax.plot([r.ci_low, r.ci_high], [y, y], color=c, lw=2.2)
            ax.plot([r.mean_diff], [y], "o", color=c, ms=6)
            labels.append(_row_label(r.variant, r.target_epsilon, r.n_pairs))
        ax.axvline(0, color="k", ls="--", lw=1)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{task}: test accuracy minus dp, paired, 95% CI", fontsize=10)
        ax.set_xlabel("difference in test accuracy")
        ax.grid(axis="x", alpha=0.3)
    if partial:
        fig.suptitle(partial, fontsize=9, color="#a00")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="study", choices=["study", "old"],
                   help="study: today's defaults (issue 27); old: the 2026-12-05 table from its record alone")
    p.add_argument("--parts", default="main", help=f"comma-separated parts of the study grid: {', '.join(PARTS)}")
    p.add_argument("--output-dir", default="/work/fidelity-runs")
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--tasks", default="sst2,mpqa")
    p.add_argument("--epsilons", default="3,8")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="test mode: tiny random BERT, a few steps")
    p.add_argument("--no-landscape", dest="landscape", action="store_false")
    p.add_argument("--report-only", action="store_true", help="no training: the table of the finished cells")
    p.add_argument("--no-append", action="store_true", help="print the table, do not append it to RESULTS.md")
    p.add_argument("--results", default=str(_report.RESULTS), help="markdown file the table is appended to")
    p.add_argument("--record", default=None,
                   help="JSON-lines record of finished cells, kept across machines (default "
                        "benchmarks/fidelity_cells.jsonl; none with --tiny unless given)")
    p.add_argument("--no-record", action="store_true", help="neither read nor write the record")
    a = p.parse_args(argv)
    if a.no_record:
        a.record = None
    elif a.record is None and not a.tiny:
        a.record = str(ROOT / "benchmarks" / ("fidelity_study_cells.jsonl" if a.grid == "study" else "fidelity_cells.jsonl"))
    if a.grid == "old":
        if a.record is None:
            raise SystemExit("--grid old reads its cells from a record (--record benchmarks/fidelity_cells.jsonl)")
        a.report_only = True  # today's code does not train the old configurations
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        raise SystemExit(f"unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    a.tasks = [x.strip() for x in a.tasks.split(",") if x.strip()]
    a.epsilons = [float(x) for x in a.epsilons.split(",")]
    a.seeds = [int(x) for x in a.seeds.split(",")]
    _report.start(a.num_threads)
    t_all, load0 = time.time(), os.getloadavg()[0]
    if not a.report_only:
        run_cells(a)
    n_new = record_finished(a) + record_teachers(a)
    if n_new:
        print(f"recorded {n_new} finished cell(s) in {a.record}", flush=True)
    lines, done, total, paired = table_lines(a)
    base = base_config(a)
    head = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0:.1f} at start; this invocation {(time.time() - t_all) / 60:.1f} min",
        (f"- setting: tasks {', '.join(a.tasks)}; parts {', '.join(a.parts)}; backbone {base.model.backbone}, head "
         f"{base.model.head}, {base.data.train_size} private / {base.data.public_size:g} public / {base.data.val_size} "
         f"val examples (content-disjoint), test = the task's eval file; {base.train.epochs:g} epochs, batch "
         f"{base.train.batch_size}, lr {base.train.lr:g}, C={base.privacy.max_grad_norm}; checkpoint selected on val, "
         f"test read once; ε {a.epsilons}, seeds {a.seeds}" if a.grid == "study" else
         "- setting: **the old defaults** (until 2026-12-05): MiniLM with a linear head, 2,000 private / 500 public / "
         "500 val examples, 2 epochs, batch 128 (32 DP steps), a 1-epoch teacher (4 steps), a 30-step warm-up "
         "scorer with dropout on; rebuilt from the committed record alone (today's code trains other configurations)"),
        "- Δ vs dp: mean paired (same task, ε, seed) difference of test accuracy, 95% bootstrap interval over seeds "
        "and test examples (dpflat/stats.py); gap closed = Δ / (nonprivate − dp). Flatness on the first "
        f"{16 if a.tiny else N_LANDSCAPE} test examples, trainable parameters (prefix + head); wall/setup seconds, examples/s "
        "(training) and peak memory (process RSS, cumulative within one process) per run",
        "",
        *lines,
    ]
    status = "" if done >= total else f" — PARTIAL ({done} of {total} cells finished)"
    which = " (the old defaults, from the record)" if a.grid == "old" else ""
    title = (f"bench_fidelity{which}: val-selected test accuracy, paired CIs vs dp, flatness, cost"
             f"{' (tiny)' if a.tiny else ''}{status}")
    print(title + "\n" + "\n".join(head), flush=True)
    if not a.no_append:
        if len(paired):
            name = "fidelity_study.png" if a.grid == "study" else "fidelity.png"
            fig = forest_figure(paired, Path(a.results).with_name(name), status.strip(" —"))
            head += ["", f"![paired differences to dp, 95% intervals]({fig.name})"]
        _report.append(title, head, Path(a.results))


if __name__ == "__main__":
    main()
