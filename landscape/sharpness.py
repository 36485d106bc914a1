"""Sharpness numbers that always carry their definition.

* :func:`sam_sharpness`: ``max_{||u|| <= r} L(theta + u) - L(theta)`` estimated by a few
  projected normalised-gradient ascent steps (step 1 is SAM's ``r g / ||g||``).
* :func:`prefix_indicator`: the paper's cross-layer indicator
  ``S = max_{||u|| <= r} (L(P + u) - L(P)) / (1 + L(P))`` estimated over ``u = 0``,
  ``u = r g / ||g||`` and a few random unit directions ``r z / ||z||`` (both signs).
* :func:`group_sharpness`: either of them with ``u`` restricted to one parameter group
  (per layer), the rest of the parameters fixed.

``r = rho`` (absolute L2 radius over the chosen parameters), or ``rho * ||theta||``
(``||theta_group||`` per group) with ``relative=True``. ``L`` is the example-weighted
mean loss over the fixed batches, in eval mode. Because ``u = 0`` is in the ball both
numbers are >= 0. Parameters are restored exactly afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ._params import (
    Batch,
    GroupSpec,
    LandscapeError,
    LossFn,
    ParamSet,
    ParamSpec,
    as_batch_list,
    data_info,
    dataset_grad,
    dataset_loss,
)
from .results import Record

SAM_FORMULA = "max_{||u||_2 <= r} L(theta+u) - L(theta), u by {steps} projected normalised-gradient ascent step(s) from u=0"
INDICATOR_FORMULA = "S = max_{u in {0, r*g/||g||, +-r*z_i/||z_i||}} (L(P+u) - L(P)) / (1 + L(P)), z_i ~ N(0, I)"


@dataclass
class SharpnessDefinition(Record):
    """What a sharpness number means: radius, directions, data, formula."""

    kind: str
    rho: float
    radius: float
    relative: bool
    directions: str
    n_directions: int
    n_batches: int
    n_examples: int
    n_params: int
    formula: str
    seed: int | None = None
    ascent_steps: int | None = None
    group: str | None = None
    params: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("sam", "prefix_indicator"):
            raise LandscapeError(f"kind must be sam|prefix_indicator, got {self.kind!r}")
        if not self.rho > 0:
            raise LandscapeError(f"rho must be > 0, got {self.rho}")
        if self.n_directions < 1:
            raise LandscapeError("at least one direction")


@dataclass
class Sharpness:
    """A sharpness value, the losses behind it, and its definition."""

    value: float
    base_loss: float
    max_loss: float
    definition: SharpnessDefinition
    per_direction: list[float] = field(default_factory=list)  # L(theta+u) for each u tried
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sharpness:
        return cls(**{**d, "definition": SharpnessDefinition.from_dict(d["definition"]),
                      "per_direction": list(d.get("per_direction", []))})

    def __float__(self) -> float:
        return float(self.value)


def _mask_vec(v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return v
    out = torch.zeros_like(v)
    out[idx] = v[idx]
    return out


def _radius(rho: float, relative: bool, theta: torch.Tensor, idx: torch.Tensor | None) -> float:
    if not rho > 0:
        raise LandscapeError(f"rho must be > 0, got {rho}")
    if not relative:
        return float(rho)
    t = theta if idx is None else theta[idx]
    return float(rho) * float(t.norm())


def _random_unit(n: int, idx: torch.Tensor | None, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    z = torch.randn(n, generator=g, dtype=torch.float64).to(like.dtype).to(like.device)
    z = _mask_vec(z, idx)
    return z / z.norm()


def _sam(
    model: nn.Module, loss_fn: LossFn, bl: list[Batch], ps: ParamSet, idx: torch.Tensor | None,
    rho: float, relative: bool, steps: int, step_size: float | None, seed: int, group: str | None,
) -> Sharpness:
    if steps < 1:
        raise LandscapeError("steps must be >= 1")
    t0 = time.perf_counter()
    theta0 = ps.get_flat()
    r = _radius(rho, relative, theta0, idx)
    eta = r * 0.5 if step_size is None else step_size
    g_ = torch.Generator().manual_seed(int(seed))
    losses: list[float] = []
    try:
        l0, grad = dataset_grad(model, loss_fn, bl, ps)
        u = torch.zeros_like(theta0)
        for t in range(steps):
            gm = _mask_vec(grad, idx)
            gn = gm.norm()
            gdir = gm / gn if float(gn) > 0 else _random_unit(ps.n, idx, g_, theta0)
            u = r * gdir if t == 0 else u + eta * gdir
            un = float(u.norm())
            if un > r:
                u = u * (r / un)
            ps.set_flat(theta0 + u)
            if t + 1 < steps:
                lt, grad = dataset_grad(model, loss_fn, bl, ps)
            else:
                lt = dataset_loss(model, loss_fn, bl)
            losses.append(lt)
    finally:
        ps.set_flat(theta0)
    mx = max([l0, *losses])
    info = data_info(bl)
    d = SharpnessDefinition(
        kind="sam", rho=rho, radius=r, relative=relative,
        directions=f"{steps} projected normalised-gradient ascent step(s), step size {eta:.4g}",
        n_directions=steps, n_params=ps.n if idx is None else int(idx.numel()),
        formula=SAM_FORMULA.replace("{steps}", str(steps)), seed=seed, ascent_steps=steps, group=group,
        params=list(ps.names), **info,
    )
    return Sharpness(mx - l0, l0, mx, d, losses, time.perf_counter() - t0)


def _indicator(
    model: nn.Module, loss_fn: LossFn, bl: list[Batch], ps: ParamSet, idx: torch.Tensor | None,
    rho: float, relative: bool, n_random: int, both_signs: bool, use_gradient: bool, seed: int, group: str | None,
) -> Sharpness:
    if n_random < 0:
        raise LandscapeError("n_random must be >= 0")
    if not use_gradient and n_random == 0:
        raise LandscapeError("need the gradient direction or at least one random direction")
    t0 = time.perf_counter()
    theta0 = ps.get_flat()
    r = _radius(rho, relative, theta0, idx)
    g_ = torch.Generator().manual_seed(int(seed))
    dirs: list[torch.Tensor] = []
    if use_gradient:
        l0, grad = dataset_grad(model, loss_fn, bl, ps)
        gm = _mask_vec(grad, idx)
        if float(gm.norm()) > 0:
            dirs.append(gm / gm.norm())
    else:
        l0 = dataset_loss(model, loss_fn, bl)
    for _ in range(n_random):
        z = _random_unit(ps.n, idx, g_, theta0)
        dirs.append(z)
        if both_signs:
            dirs.append(-z)
    losses: list[float] = []
    try:
        for dvec in dirs:
            ps.set_flat(theta0 + r * dvec)
            losses.append(dataset_loss(model, loss_fn, bl))
    finally:
        ps.set_flat(theta0)
    mx = max([l0, *losses])
    info = data_info(bl)
    parts = (["normalised gradient"] if use_gradient else []) + (
        [f"{n_random} random Gaussian{' (both signs)' if both_signs else ''}"] if n_random else []
    )
    d = SharpnessDefinition(
        kind="prefix_indicator", rho=rho, radius=r, relative=relative, directions=" + ".join(parts),
        n_directions=max(len(dirs), 1), n_params=ps.n if idx is None else int(idx.numel()),
        formula=INDICATOR_FORMULA, seed=seed, group=group, params=list(ps.names), **info,
    )
    return Sharpness((mx - l0) / (1.0 + l0), l0, mx, d, losses, time.perf_counter() - t0)


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rho: float = 0.05,
    params: ParamSpec = None,
    steps: int = 3,
    step_size: float | None = None,
    relative: bool = False,
    seed: int = 0,
) -> Sharpness:
    """SAM sharpness ``max_{||u|| <= r} L(theta+u) - L(theta)`` by ``steps`` ascent steps.

    Step 1 jumps to SAM's ``r g / ||g||``; later steps move ``step_size`` (default
    ``r / 2``) along the normalised gradient and project back onto the ball. The value
    is the largest increase seen (a lower bound on the true maximum). Cost: ``steps``
    gradient passes + 1 loss pass over the batches.
    """
    bl = as_batch_list(batches)
    ps = ParamSet.from_model(model, params)
    return _sam(model, loss_fn, bl, ps, None, rho, relative, steps, step_size, seed, None)


def prefix_indicator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rho: float = 0.05,
    params: ParamSpec = None,
    n_random: int = 4,
    both_signs: bool = True,
    use_gradient: bool = True,
    relative: bool = False,
    seed: int = 0,
) -> Sharpness:
    """The paper's indicator ``S = max (L(P+u) - L(P)) / (1 + L(P))`` over a rho-ball.

    Estimated over ``u = r g/||g||`` and ``n_random`` random directions (and their
    negatives when ``both_signs``); ``params`` should select the prefix (e.g.
    ``lambda n: n.startswith("prefix")``). Cost: 1 gradient pass + one loss pass per
    direction.
    """
    bl = as_batch_list(batches)
    ps = ParamSet.from_model(model, params)
    return _indicator(model, loss_fn, bl, ps, None, rho, relative, n_random, both_signs, use_gradient, seed, None)


def group_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    groups: GroupSpec = None,
    kind: Literal["prefix_indicator", "sam"] = "prefix_indicator",
    rho: float = 0.05,
    params: ParamSpec = None,
    relative: bool = False,
    seed: int = 0,
    **kw: Any,
) -> dict[str, Sharpness]:
    """Per group (see :meth:`ParamSet.groups`): sharpness with ``u`` confined to the group.

    ``kw`` goes to the underlying estimator (``n_random``, ``both_signs``, ``steps``...).
    With ``relative=True`` the radius is ``rho * ||theta_group||``.
    """
    allowed = {"sam": {"steps", "step_size"}, "prefix_indicator": {"n_random", "both_signs", "use_gradient"}}
    if kind not in allowed:
        raise LandscapeError(f"kind must be prefix_indicator|sam, got {kind!r}")
    extra = set(kw) - allowed[kind]
    if extra:
        raise LandscapeError(f"{kind} takes no {sorted(extra)} (allowed: {sorted(allowed[kind])})")
    bl = as_batch_list(batches)
    ps = ParamSet.from_model(model, params)
    out: dict[str, Sharpness] = {}
    for name, idx in ps.groups(groups).items():
        idx = idx.to(ps.device)
        if kind == "sam":
            out[name] = _sam(model, loss_fn, bl, ps, idx, rho, relative, kw.get("steps", 3), kw.get("step_size"), seed, name)
        else:
            out[name] = _indicator(
                model, loss_fn, bl, ps, idx, rho, relative, kw.get("n_random", 4), kw.get("both_signs", True),
                kw.get("use_gradient", True), seed, name,
            )
    return out


__all__ = [
    "INDICATOR_FORMULA",
    "SAM_FORMULA",
    "Sharpness",
    "SharpnessDefinition",
    "group_sharpness",
    "prefix_indicator",
    "sam_sharpness",
]
