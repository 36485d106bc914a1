"""The grid of runs: variants x modes x epsilons x seeds, one results table.

Finished cells are skipped (``train`` returns their stored result), so an interrupted
sweep picks up where it stopped and a notebook can ask for "the missing cells".
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pandas as pd
from tqdm.auto import tqdm

from .config import (MODES, NO_MODE_VARIANTS, NONPRIVATE_VARIANTS, VARIANTS, ConfigError, RunConfig, apply_variant,
                     as_run_config)
from .figures import join_guarantees, mean_std
from .privacy import DP
from .runs import RunDir, RunLocked, finished_result, load_results
from .session import check_before_work


def cells(base: RunConfig, variants: list[str], epsilons: list[float], seeds: list[int],
          modes: list[str] = ("safe",)) -> list[RunConfig]:
    """Every run config of the grid. Non-private runs do not depend on ε: one per seed."""
    if not variants:
        raise ConfigError("a sweep needs at least one variant (--variants), e.g. dp,dpflat")
    if not modes:
        raise ConfigError("a sweep needs at least one mode (--modes), e.g. safe")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"unknown variant {v!r}; choose from: {', '.join(VARIANTS)}")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown mode {m!r}; choose from: safe, paper")
    if not epsilons:
        raise ConfigError("a sweep needs at least one epsilon (--epsilons), e.g. 3,8")
    if not seeds:
        raise ConfigError("a sweep needs at least one seed (--seeds), e.g. 0,1")
    out: list[RunConfig] = []
    for seed in seeds:
        for v in variants:
            if v in NONPRIVATE_VARIANTS:
                out.append(apply_variant(base, v).replace(train={"seed": seed}))
                continue
            for eps in epsilons:
                for m in (["safe"] if v in NO_MODE_VARIANTS else list(modes)):
                    out.append(apply_variant(base, v, m).replace(privacy={"epsilon": float(eps)}, train={"seed": seed}))
    return out


def trainer(cfg: RunConfig) -> Callable[..., dict[str, Any]]:
    """The training function of a config: the black-box loop for ``bb-*`` configs, else the white-box one.

    The one place that chooses between the two loops (``dpflat.train.train`` refuses a
    bb-* config). Both take ``(cfg, resume=, max_steps=, on_step=, noise_seed=,
    secure_rng=, extra_private=, on_phase=)`` and return the run's results row.
    """
    if as_run_config(cfg).blackbox.active:
        from .blackbox import train as bb_train

        return bb_train
    from .train import train

    return train


def sweep(base: RunConfig, variants: list[str], epsilons: list[float], seeds: list[int],
          modes: list[str] = ("safe",), on_cell: Callable[[dict[str, Any]], None] | None = None,
          progress: bool = True, noise_seed: int | None = None, secure_rng: bool = False,
          on_phase: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Train every missing cell; return the rows of this grid from the results table.

    ``noise_seed`` / ``secure_rng``: the mechanism's randomness (see ``dpflat.train.train``);
    one operator seed gives each cell its own stream. ``on_phase``: each cell's set-up phases
    (``session.PhaseCallback``).
    """
    from .engine import cell_noise_seed

    base = as_run_config(base)
    progress = progress and base.train.progress  # --no-progress: no sweep bar either
    grid = cells(base, variants, epsilons, seeds, modes)
    if base.train.run_name and len(grid) > 1:
        raise ConfigError(f"--run-name names one run folder, but this sweep has {len(grid)} cells: leave it out "
                          "(each cell gets its own name)")
    for c in grid:  # refuse a bad device or layer count before the first cell trains
        check_before_work(c)
    todo = []
    for c in grid:
        rd = RunDir.for_config(c)
        if finished_result(rd, c) is None:  # a finished cell: config checked, its row made sure of
            todo.append(c)
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="sweep", disable=not progress)
    for c in todo:
        try:
            res = trainer(c)(c.replace(train={"progress": progress and c.train.progress}),
                             noise_seed=cell_noise_seed(noise_seed, RunDir.for_config(c).path.name), secure_rng=secure_rng,
                             on_phase=on_phase)
        except RunLocked as e:  # another process trains it; its row appears when it finishes
            warnings.warn(f"skipped: {e}")
            bar.update(1)
            continue
        bar.update(1)
        if on_cell:
            on_cell(res)
    bar.close()
    ids = {RunDir.for_config(c).path.name for c in grid}
    table = load_results(base.train.output_dir)
    return table[table["run_id"].isin(ids)].reset_index(drop=True) if len(table) else table


def summarize(table: pd.DataFrame, metric: str = "accuracy", baseline: str | None = "dp",
              n_boot: int = 2000) -> pd.DataFrame:
    """Mean ± std over seeds per ([task,] variant, target ε), with each row's guarantee.

    ``accuracy`` is the test split's figure; ``val_mean`` (when the table has it) the
    validation split's, which selected the checkpoint. With a ``baseline`` variant present,
    each row also gets the paired difference to it (same task, ε and seed) with a 95%
    bootstrap interval over seeds and test examples, whether that interval crosses 0, and
    the fraction of the baseline -> non-private gap closed (``dpflat.stats``). ``task`` is
    a grouping column only when the table holds more than one task.
    """
    if table.empty:
        return pd.DataFrame()
    t = table.copy()
    t["target_epsilon"] = t["target_epsilon"].astype(float).fillna(float("inf"))
    multi = "task" in t and t["task"].nunique() > 1
    keys = (["task"] if multi else []) + ["variant", "target_epsilon"]
    aggs = dict(guarantee=("guarantee", join_guarantees), n_seeds=("seed", "nunique"))
    # the claim (DP runs only) and, for runs not DP as a whole, their DP-SGD part's ε; tables from
    # before issue 14 call the latter epsilon_spent (or have neither)
    part = next((c for c in ("dpsgd_part_epsilon", "epsilon_spent") if c in t), None)
    for name, col in (("dpsgd_part_epsilon", part), ("epsilon", "epsilon" if "epsilon" in t else None)):
        if col is None:
            t[f"_{name}"] = float("nan")
            col = f"_{name}"
        aggs[name] = (col, "max")
    val_col = "val_" + ("accuracy" if metric in ("accuracy", "test_accuracy") else metric)
    if val_col in t:
        aggs["val_mean"] = (val_col, "mean")
    out = mean_std(t, keys, metric, n=None, **aggs)  # the explorer's and the report's mean ± std
    out = out[[*keys, "guarantee", "n_seeds", "mean", "std", *list(aggs)[2:]]]
    if baseline is not None and baseline in set(t["variant"]):
        from .stats import paired_differences

        paired = paired_differences(t, baseline, metric, n_boot=n_boot)
        if not paired.empty:
            paired = paired.rename(columns={"mean_diff": "diff"}).drop(columns=["method"])
            if not multi:
                paired = paired.drop(columns=["task"])
            nonpriv = paired["variant"].isin(NONPRIVATE_VARIANTS)
            # a non-private run pairs with the baseline at every ε: its own row (ε = ∞) shows no difference
            out = out.merge(paired[~nonpriv], on=keys, how="left")
    return out.sort_values(["target_epsilon", "variant"] if not multi else ["task", "target_epsilon", "variant"]
                           ).reset_index(drop=True)


def markdown(summary: pd.DataFrame, metric: str = "accuracy") -> str:
    """The summary as a markdown table (for benchmarks/RESULTS.md); paired columns when present."""
    multi = "task" in summary.columns
    paired = "diff" in summary.columns
    has_val = "val_mean" in summary.columns
    head = (["task"] if multi else []) + ["variant", "target ε", "guarantee", "seeds", f"test {metric} (mean ± std)"]
    if has_val:
        head.append("val (mean)")
    if paired:
        base = summary["baseline"].dropna().iloc[0] if summary["baseline"].notna().any() else "baseline"
        head += [f"Δ vs {base} [95% CI]", "gap closed"]
    head.append("ε claimed (max)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.to_dict("records"):
        eps = "∞" if r["target_epsilon"] == float("inf") else f"{r['target_epsilon']:g}"
        if r["guarantee"] == DP and not pd.isna(r.get("epsilon")):
            spent = f"{r['epsilon']:.2f}"
        elif r["guarantee"] != DP and not pd.isna(r.get("dpsgd_part_epsilon")):  # the run as a whole has no ε
            spent = f"none (DP-SGD part alone: {r['dpsgd_part_epsilon']:.2f})"
        else:
            spent = "—"
        cells = ([r["task"]] if multi else []) + [r["variant"], eps, r["guarantee"], str(r["n_seeds"]),
                                                  f"{r['mean']:.4f} ± {r['std']:.4f}"]
        if has_val:
            cells.append("—" if pd.isna(r["val_mean"]) else f"{r['val_mean']:.4f}")
        if paired:
            if pd.isna(r.get("diff")):
                cells += ["—", "—"]
            else:
                ns = " (crosses 0)" if r["crosses_zero"] else ""
                cells.append(f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]{ns}")
                cells.append("—" if pd.isna(r["gap_closed"]) else f"{r['gap_closed']:+.2f}")
        cells.append(spent)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["cells", "markdown", "summarize", "sweep", "trainer"]
