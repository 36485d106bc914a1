"""Cross-layer flattening: keep prefixes only in the layers where they are flat.

The paper's indicator for a keep-mask M is
    S(M) = max_{u in a rho-ball} (L(P_M + u) - L(P_M)) / (1 + L(P_M)),
estimated (``landscape.sharpness.prefix_indicator``) at u = r g/||g|| and at
``layers_directions`` random Gaussian directions (both signs), with
r = rho * ||P|| over the prefix weights, on a fixed subset of the allowed data.
Greedy elimination repeatedly removes the kept layer whose removal gives the lowest
S, until ``n_drop`` layers are gone (or, with ``layers_stop_early``, until S stops
decreasing). The indicator is scored on a copy of the model that has learned the task on
the same allowed data: a non-private fit of prefix + head to its validation plateau with
dropout off (``--layers-scorer plateau``, ``_fit.level_fit``; the teacher's settings), so
the ranking is a property of a trained model's landscape, not of the fit's dropout draws
(``benchmarks/bench_selection_noise.py`` measures it under reseeding). The copy is then
thrown away -- the teacher continues from it under the chosen mask -- so the level changes
only the keep-mask. ``--layers-scorer warmup`` is the earlier fixed short warm-up.

- safe (default): the scorer fit and S use the public split only: no privacy cost.
- paper: they use the private training data (as the authors): NOT DP.

Cost (the one-off setup of a DP-Flat run): the scored examples are regrouped by length
and their padding cut (``landscape.rebatch_by_length``; the same S up to float
summation order, so the same ranking -- tests/test_flat_speed.py checks it), and in
safe mode the scorer's fit and the selection are cached under the output dir keyed by
everything they depend on (``_cache``), so runs that share backbone, public split, seed and
settings (a sweep over ε) select once. Paper mode is never cached.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from landscape.sharpness import prefix_indicator

from .. import lora
from ..config import ConfigError, FlatConfig
from ..evaluate import ce_loss, fixed_batches
from . import _cache
from ._fit import fit_to_plateau, level_data, level_fit
from .base import FlatLevel, TrainContext

PAPER_WHO = "layers/paper-sharpness"
PAPER_HOW = "non-private warm-up and sharpness indicator on the private split"


SCORE_GROUP = 32  # examples per length group when scoring S (cost only: S is the same)


def scoring_batches(dataset, n: int, group: int = SCORE_GROUP) -> list[dict[str, torch.Tensor]]:
    """``fixed_batches`` regrouped by length with the padding cut: the same example-weighted
    loss (so the same S) at about 60% of the padded positions on SST-2."""
    return fixed_batches(dataset, n, group=group)


def indicator(model, batches, keep: list[bool], rho: float, n_random: int, seed: int) -> float:
    """S for the keep-mask ``keep`` (the model's own mask is restored afterwards)."""
    old = model.prefix.keep_mask.clone()
    model.prefix.set_keep(keep)
    try:
        s = prefix_indicator(model, ce_loss, batches, rho=rho, params=lora.scored_params(model),
                             n_random=n_random, both_signs=True, relative=True, seed=seed)
    finally:
        model.prefix.set_keep(old)
    return float(s.value)


def greedy_drop(model, batches, n_drop: int, rho: float, n_random: int, seed: int,
                stop_early: bool = False, on_eval=None) -> tuple[list[bool], list[dict[str, Any]]]:
    """Greedy elimination; returns the keep-mask and the trace (S of every candidate per round)."""
    L = model.n_layers
    keep = model.prefix.keep_mask.tolist()
    if n_drop >= sum(keep):
        raise ConfigError(f"n_drop={n_drop} would remove every prefix: {sum(keep)} of the backbone's {L} layers have one")
    current = indicator(model, batches, keep, rho, n_random, seed)
    if on_eval:
        on_eval()
    trace: list[dict[str, Any]] = [{"round": 0, "dropped": None, "S": current, "candidates": {}}]
    for rnd in range(1, n_drop + 1):
        cands: dict[int, float] = {}
        for layer in [i for i, k in enumerate(keep) if k]:
            trial = list(keep)
            trial[layer] = False
            cands[layer] = indicator(model, batches, trial, rho, n_random, seed)
            if on_eval:
                on_eval()
        layer, s = min(cands.items(), key=lambda kv: (kv[1], kv[0]))
        if stop_early and s >= current:
            break
        keep[layer] = False
        current = s
        trace.append({"round": rnd, "dropped": layer, "S": s, "candidates": cands})
    return keep, trace


class LayerSelection(FlatLevel):
    name = "layers"

    def __init__(self, cfg: FlatConfig):
        self.cfg = cfg
        self.keep: list[bool] | None = None
        self.trace: list[dict[str, Any]] = []

    def setup(self, ctx: TrainContext) -> None:
        c, tc = self.cfg, ctx.cfg.train
        data, count = level_data(ctx, c.layers_mode, PAPER_WHO, PAPER_HOW,
                                 "layer selection in safe mode scores sharpness on the public split")
        safe = c.layers_mode == "safe"
        if c.layers_scorer in ("plateau", "plateau-mean"):  # a model that has learned the task (shared with the teacher)
            scorer, report, fit_cached = level_fit(ctx, data, kind="scorer", seed=tc.seed + 29, on_batch=count,
                                                   cache=safe, plateau_mean=c.layers_scorer == "plateau-mean")
            ctx.info.update({**report.to_info("scorer"), "scorer_cached": fit_cached})
            ctx.shared[f"scorer/{c.layers_mode}"] = scorer
        elif c.layers_warmup_steps > 0:
            scorer, _ = fit_to_plateau(ctx.model, data, None, max_steps=c.layers_warmup_steps,
                                       batch_size=tc.batch_size, lr=tc.lr, device=ctx.device, seed=tc.seed + 29,
                                       on_batch=count)
        else:
            scorer = copy.deepcopy(ctx.model).eval()
        cache_key = None
        if safe and _cache.enabled():  # public data only: safe to reuse across runs
            cache_key = _cache.key("layers", {
                "scorer": _cache.fingerprint_model(scorer), "public": _cache.fingerprint_dataset(data),
                "seed": tc.seed, "device": ctx.device.type, "torch": torch.__version__, "n_drop": c.n_drop,
                "rho": c.layers_rho, "directions": c.layers_directions, "examples": c.layers_examples,
                "stop_early": c.layers_stop_early, "group": SCORE_GROUP,
            })
            hit = _cache.load(ctx.cfg.train.output_dir, cache_key)
            if hit is not None:
                self._finish(ctx, list(hit["keep"]), list(hit["trace"]), cached=True)
                return
        batches = [{k: v.to(ctx.device) for k, v in b.items()} for b in scoring_batches(data, c.layers_examples)]
        n_sub = sum(len(b["labels"]) for b in batches)
        passes = 1 + 2 * c.layers_directions  # gradient + both signs of each random direction, + base loss
        keep, trace = greedy_drop(scorer, batches, c.n_drop, c.layers_rho, c.layers_directions, tc.seed,
                                  c.layers_stop_early, on_eval=(lambda: count(n_sub * passes)) if count else None)
        if cache_key is not None:
            _cache.save(ctx.cfg.train.output_dir, cache_key, {"keep": keep, "trace": trace})
        self._finish(ctx, keep, trace, cached=False)

    def _finish(self, ctx: TrainContext, keep: list[bool], trace: list[dict[str, Any]], cached: bool) -> None:
        c = self.cfg
        ctx.model.prefix.set_keep(keep)
        lora.train_kept(ctx.model)  # --peft lora: a dropped layer's adapters leave the trainable set
        self.keep, self.trace = keep, trace
        ctx.info["layers_keep"] = ",".join(str(i) for i, k in enumerate(keep) if k)
        ctx.info["layers_data"] = "public split" if c.layers_mode == "safe" else "private split (not DP)"
        ctx.info["layers_trace"] = trace
        ctx.info["layers_cached"] = cached

    def state_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "trace": self.trace}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        self.keep, self.trace = state.get("keep"), state.get("trace", [])
        if self.keep is not None:
            ctx.model.prefix.set_keep(self.keep)
            lora.train_kept(ctx.model)
