"""The zeroth-order optimiser core: SPSA differences, the DPZero clip + noise, one step, teachers' fits.

Everything here is a function of forward losses only (``Projection.losses``), including
``prompt_loss``, the landscape tools' loss in prompt space (its gradient an SPSA estimate); the
privacy of a step is the sampled Gaussian mechanism on the clipped k-dimensional
differences (see the package docstring), accounted by the loop (``loop.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import ConfigError

from .box import PromptModel


# --------------------------------------------------------------------------- the estimators
def clip_rows(deltas: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row (one example's k finite differences) scaled to L2 norm <= ``clip``."""
    norms = deltas.norm(dim=-1, keepdim=True)
    return deltas * torch.clamp(clip / (norms + 1e-12), max=1.0)


def finite_differences(l_plus: torch.Tensor, l_minus: torch.Tensor, mu: float) -> torch.Tensor:
    """(k, B) losses at z + mu u_j and z - mu u_j -> (B, k) per-example directional derivatives."""
    return ((l_plus - l_minus) / (2.0 * mu)).T


def dpzero_coefficients(deltas: torch.Tensor, clip: float, sigma: float, expected_batch: float,
                        generator: torch.Generator) -> torch.Tensor:
    """DPZero: (sum of clipped per-example rows + N(0, sigma^2 C^2 I_k)) / expected batch; (k,)."""
    k = deltas.shape[1]
    noise = torch.randn(k, generator=generator, dtype=torch.float64) * (sigma * clip)
    total = clip_rows(deltas.double(), clip).sum(0) + noise
    return (total / float(expected_batch)).float()


def directions(step_seed: int, k: int, d: int) -> torch.Tensor:
    """k Gaussian directions in R^d from a data-independent seed: (k, d)."""
    return torch.randn(k, d, generator=torch.Generator().manual_seed(int(step_seed)))


def distill_grad(z: torch.Tensor, teacher: torch.Tensor, lam: float, squared: bool) -> torch.Tensor:
    """Exact gradient of λ||z - z_t|| (or λ||z - z_t||^2): a known term, no query needed."""
    diff = z - teacher
    if squared:
        return 2.0 * lam * diff
    n = float(diff.norm())
    return lam * diff / n if n > 1e-12 else torch.zeros_like(z)


# --------------------------------------------------------------------------- the optimiser core
@dataclass
class ZOState:
    """The tuned vector z (as an optimiser parameter) and its optimiser."""

    opt: torch.optim.Optimizer
    param: nn.Parameter


def _make_opt(z: torch.Tensor, kind: str, lr: float) -> ZOState:
    p = nn.Parameter(z.detach().clone().float())
    opt = torch.optim.Adam([p], lr=lr) if kind == "adam" else torch.optim.SGD([p], lr=lr, momentum=0.9)
    return ZOState(opt, p)


def _poisson(n: int, q: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) < q).nonzero().flatten()


def take_rows(dataset, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of a tokenised dataset as a batch of tensors."""
    rows = dataset[idx.tolist()]
    return {k: v for k, v in rows.items() if isinstance(v, torch.Tensor)}


def zo_step(model: PromptModel, state: ZOState, batch: dict[str, torch.Tensor] | None, step_seed: int,
            k: int, mu: float, *, dp: tuple[float, float, float] | None = None,
            pull: Callable[[torch.Tensor], torch.Tensor] | None = None,
            noise_generator: torch.Generator | None = None) -> dict[str, float]:
    """One SPSA / DPZero update of z in place; ``dp = (clip, sigma, expected_batch)``.

    ``noise_generator``: the DP noise's secret generator (``engine.MechanismRNG``); the
    directions stay a function of the public ``step_seed`` (they are data-independent).

    An empty Poisson batch still takes a DP step (noise only), as DP-SGD does: skipping
    it would make the number of releases depend on the data.
    """
    z = state.param.data
    U = directions(step_seed, k, z.numel())
    g_noise = noise_generator if noise_generator is not None else torch.Generator().manual_seed(int(step_seed) + 7)
    nb = 0 if batch is None else len(batch["labels"])
    loss = float("nan")
    if nb:
        zs = torch.cat([z + mu * U, z - mu * U])
        L = model.proj.losses(model.box, batch, zs)  # (2k, B)
        deltas = finite_differences(L[:k], L[k:], mu)  # (B, k)
        loss = float(L.mean())
    else:
        deltas = torch.zeros(0, k)
    if dp is not None:
        clip, sigma, expected = dp
        coef = dpzero_coefficients(deltas, clip, sigma, expected, g_noise)
    else:
        coef = deltas.mean(0) if nb else torch.zeros(k)
    grad = (coef.unsqueeze(1) * U).mean(0)
    if pull is not None:
        grad = grad + pull(z)
    state.param.grad = grad.to(z.dtype)
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    return {"loss": loss, "batch": nb, "coef_norm": float(coef.norm()), "clipped": float(
        (deltas.norm(dim=-1) > dp[0]).float().mean()) if (dp is not None and nb) else 0.0}


def fit_prompt(model: PromptModel, dataset, *, steps: int, batch_size: int, lr: float, mu: float, k: int,
               optimizer: str, seed: int, z0: torch.Tensor | None = None,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Non-private SPSA (shuffled batches) from ``z0``; returns z. Used for teachers.

    ``dataset`` is whatever the caller was allowed to read (public split, or the
    private one through an unaccounted ledger read, counted by ``on_batch``).
    """
    state = _make_opt(torch.zeros(model.proj.dim) if z0 is None else z0, optimizer, lr)
    n = len(dataset)
    g = torch.Generator().manual_seed(int(seed))
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            batch = take_rows(dataset, perm[i:i + batch_size])
            zo_step(model, state, batch, seed * 1_000_003 + done + 991, k, mu)
            if on_batch:
                on_batch(len(batch["labels"]))
            done += 1
            if done >= steps:
                break
    return state.param.data.detach().clone()


def fit_prompt_cma(model: PromptModel, dataset, *, evaluations: int, batch_size: int, sigma0: float, seed: int,
                   on_batch: Callable[[int], None] | None = None,
                   on_generation: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, int]:
    """CMA-ES on z (BBT's optimiser), each candidate scored on a shared mini-batch per generation.

    Non-private only: candidates are ranked by raw private losses. Returns (z, generations).
    """
    try:
        import cma
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise ConfigError("zo_optimizer cma needs the package cma (pip install cma)") from e
    d = model.proj.dim
    es = cma.CMAEvolutionStrategy(np.zeros(d), sigma0, {"seed": int(seed) + 1, "verbose": -9,
                                                        "popsize": max(4, 4 + int(3 * math.log(d)))})
    n = len(dataset)
    g = torch.Generator().manual_seed(int(seed))
    used, gens = 0, 0
    while used < evaluations and not es.stop():
        X = es.ask()
        idx = torch.randperm(n, generator=g)[:batch_size]
        batch = take_rows(dataset, idx)
        zs = torch.as_tensor(np.stack(X), dtype=torch.float32)
        L = model.proj.losses(model.box, batch, zs).mean(1)
        es.tell(X, L.double().tolist())
        if on_batch:
            on_batch(len(batch["labels"]))
        used += len(X) * len(batch["labels"])
        gens += 1
        if on_generation:
            on_generation(gens, float(L.min()))
    return torch.as_tensor(es.result.xfavorite, dtype=torch.float32), gens


class _ZOLoss(torch.autograd.Function):
    """Mean CE of a batch at z; backward = an SPSA estimate from forward queries only."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, model: PromptModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx.model, ctx.batch = model, batch
        ctx.save_for_backward(z.detach().clone())
        return model.proj.losses(model.box, batch, z.detach().unsqueeze(0)).mean().to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (z,) = ctx.saved_tensors
        m: PromptModel = ctx.model
        with torch.no_grad():
            m._calls += 1
            U = directions(m.grad_seed * 1_000_003 + m._calls, m.grad_directions, z.numel()).to(z.dtype)
            zs = torch.cat([z + m.grad_mu * U, z - m.grad_mu * U])
            L = m.proj.losses(m.box, ctx.batch, zs).mean(1)  # (2k,)
            k = m.grad_directions
            coef = (L[:k] - L[k:]) / (2 * m.grad_mu)
            g = (coef.unsqueeze(1) * U).mean(0)
        return grad_out * g, None, None


def prompt_loss(model: PromptModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``loss_fn(model, batch)`` for the ``landscape`` tools, in prompt space.

    Value: the exact mean cross-entropy (one no-grad query of the box). Gradient (what
    ``sam_sharpness`` and the indicator's gradient direction use): the average SPSA
    estimate over ``model.grad_directions`` random directions, smoothing ``grad_mu``;
    it is an estimate, and the surfaces and random-direction indicator need none.
    """
    return _ZOLoss.apply(model.z, model, batch)


__all__ = ["ZOState", "clip_rows", "take_rows", "directions", "distill_grad", "dpzero_coefficients", "finite_differences",
           "fit_prompt", "fit_prompt_cma", "prompt_loss", "zo_step"]
