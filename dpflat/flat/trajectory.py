"""Sharpness over time: a diagnostic step callback (``--sharpness-every N``).

Every N optimiser steps (and after the last one) it measures, on a fixed subset of the
*public* or *eval* split (never the private one: these numbers are released with the
run and are not covered by the accountant), the top Hessian eigenvalue of the loss over
the trainable parameters and the SAM sharpness, and appends one row to the run folder's
``sharpness.jsonl``. A step callback, not a flattening level (``base.StepCallback``): it
measures at ``step_end``, where the trained weights are known, and changes nothing in training:
weights, gradients, the Opacus per-example hooks and the global RNG are left exactly as they were.

Why cheap: a few Lanczos products per point, warm-started from the previous point's
eigenvector. Successive points are a few optimiser steps apart, so the top eigenvector
barely moves and a handful of Krylov vectors from it already hold the top Ritz value
(cost per point: ``LANCZOS_PRODUCTS`` Hessian-vector products + one SAM ascent step).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..evaluate import BATCH_KEYS, ce_loss, fixed_batches
from .base import StepCallback, TrainContext

if TYPE_CHECKING:  # pragma: no cover
    from ..config import TrainConfig
    from ..runs import RunDir

#: Krylov dimension per point (Hessian-vector products); warm-started, see the module doc
LANCZOS_PRODUCTS = 4
#: SAM radius, relative to ‖θ‖ of the trainable parameters (as ``analyze_run`` uses)
SAM_RHO = 0.05


def _batches(ds: Any, n: int, batch_size: int = 64, group: int = 32) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` rows, regrouped by length with the padding cut: the same example-weighted
    figures as the padded batches, at a fraction of the cost (``dpflat.analysis.analysis_batches``)."""
    return fixed_batches(ds, n, batch_size, keys=BATCH_KEYS, group=group)


class SharpnessTrajectory(StepCallback):
    """Top Hessian eigenvalue and SAM sharpness every ``sharpness_every`` steps (a diagnostic)."""

    name = "trajectory"

    def __init__(self, tcfg: "TrainConfig"):
        self.every = int(tcfg.sharpness_every)
        self.split = tcfg.sharpness_data
        self.n_examples = int(tcfg.sharpness_examples)
        self.vec: torch.Tensor | None = None  # last top eigenvector (the warm start)
        self.last_step = 0
        self.seconds: list[float] = []
        self._batches: list[dict[str, torch.Tensor]] | None = None

    # --- where it writes: the run folder's sharpness.jsonl, through RunDir
    @staticmethod
    def run_dir(ctx: TrainContext) -> RunDir:
        from ..runs import RunDir

        return RunDir.for_config(ctx.cfg)

    def _data(self, ctx: TrainContext) -> list[dict[str, torch.Tensor]]:
        if self._batches is None:
            from ..config import ConfigError

            ds = ctx.public if self.split == "public" else ctx.eval  # the private split is not reachable here
            if ds is None or len(ds) == 0:
                raise ConfigError(f"sharpness_data={self.split}: that split is empty; use the other one "
                                  "(--sharpness-data eval|public)")
            self._batches = _batches(ds, self.n_examples)
        return self._batches

    # --- hooks
    def setup(self, ctx: TrainContext) -> None:
        self._data(ctx)  # fails before training when the split is empty
        self.run_dir(ctx).clear_trajectory()  # a fresh run: a file left by a killed attempt is stale
        ctx.info["sharpness_every"] = self.every
        ctx.info["sharpness_data"] = self.split

    def step_end(self, ctx: TrainContext, step: int) -> None:
        done = step + 1  # the loop counts the step after this hook
        if done % self.every and done != ctx.total_steps:
            return
        from .. import distributed as dist_mod

        if not dist_mod.is_main():  # torchrun: rank 0 measures and writes
            return
        row = self.measure(ctx)
        row.update(step=done, epoch=done / max(ctx.steps_per_epoch, 1))
        self.run_dir(ctx).append_trajectory(row)
        self.last_step = done
        self.seconds.append(row["seconds"])
        ctx.info["sharpness_seconds_per_point"] = sum(self.seconds) / len(self.seconds)

    @contextmanager
    def _untouched(self, ctx: TrainContext) -> Iterator[None]:
        """Eval mode, Opacus hooks off, gradients and the global RNG restored afterwards."""
        model = ctx.model
        was_training = model.training
        grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters() if p.requires_grad}
        rng = torch.get_rng_state()
        gsm = getattr(ctx.dp, "model", None) if ctx.dp is not None else None
        if gsm is not None and hasattr(gsm, "disable_hooks"):
            gsm.disable_hooks()
        configs = {id(m.config): m.config for m in model.modules()
                   if getattr(getattr(m, "config", None), "_attn_implementation", None) == "dpflat_sdpa"}
        for c in configs.values():  # SDPA on CPU has no double backward; the eager kernel is the same maths
            c._attn_implementation = "dpflat_eager"
        model.eval()
        try:
            yield
        finally:
            for c in configs.values():
                c._attn_implementation = "dpflat_sdpa"
            model.train(was_training)
            if gsm is not None and hasattr(gsm, "enable_hooks"):
                gsm.enable_hooks()
            torch.set_rng_state(rng)
            for p, g in grads.items():
                p.grad = g

    def measure(self, ctx: TrainContext) -> dict[str, Any]:
        import landscape as ls

        batches = self._data(ctx)
        t0, c0 = time.perf_counter(), time.process_time()
        with self._untouched(ctx):
            with ls.HessianOperator(ctx.model, ce_loss, batches) as H:
                start = self.vec if self.vec is not None and self.vec.shape == (H.n,) else "gradient"
                eig = ls.lanczos(H, k=1, max_iter=LANCZOS_PRODUCTS, tol=0.0, seed=self.last_step, start=start)
                loss = H.loss
                products = H.n_matvecs
            self.vec = eig.eigenvectors[0].detach().clone()
            sam = ls.sam_sharpness(ctx.model, ce_loss, batches, rho=SAM_RHO, steps=1, relative=True, seed=0)
        return {"top_eigenvalue": float(eig.eigenvalues[0]), "sam_sharpness": float(sam.value), "loss": loss,
                "data": self.split, "n_examples": sum(len(b["labels"]) for b in batches),
                "hvp_products": int(products), "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0, "diagnostic": True}

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        """Resume: keep the rows up to the checkpoint (later ones are measured again)."""
        self.last_step = int(state.get("last_step", 0))
        self.run_dir(ctx).truncate_trajectory(self.last_step)


__all__ = ["SharpnessTrajectory", "LANCZOS_PRODUCTS"]
