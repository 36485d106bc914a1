"""Run PyHessian 0.1 on the same model, loss and batches, for cross-checks.

PyHessian expects ``(inputs, targets)`` batches and calls ``criterion(model(inputs),
targets)``, with ``inputs.size(0)`` as the batch weight and ``.to(device)`` on both.
We wrap: ``inputs`` is a box around our whole batch (any dict/tuple) with ``size`` and
``to``, the "model" is a module whose forward returns ``loss_fn(model, batch)`` and the
criterion returns that loss unchanged. So PyHessian sees exactly our loss and our
example-weighted mean over batches.

PyHessian differentiates ``model.parameters()`` that require grad, so a different
subset is selected by toggling ``requires_grad`` for the duration (restored after).
Known limits: ``density()`` calls the removed ``torch.eig`` and fails (our SLQ is in
:mod:`landscape.spectrum`); ``cuda=True`` calls ``.cuda()`` (we pass ``cuda`` only when
the parameters live on a GPU).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ._params import Batch, LossFn, ParamSet, ParamSpec, as_batch_list, batch_size, data_info, to_device
from .spectrum import Convergence, EigenResult, SpectrumSettings, TraceResult


class _Box:
    """A batch disguised as an input tensor: PyHessian only calls ``size(0)`` and ``to``."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def size(self, dim: int | None = None) -> int:
        return batch_size(self.batch)

    def to(self, device: Any) -> _Box:
        return _Box(to_device(self.batch, device))

    def cuda(self) -> _Box:
        return self.to("cuda")


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.inner = model
        self.loss_fn = loss_fn

    def forward(self, box: _Box) -> torch.Tensor:
        return self.loss_fn(self.inner, box.batch)


def _identity_criterion(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    return outputs


@contextlib.contextmanager
def _only(model: nn.Module, ps: ParamSet) -> Iterator[None]:
    """Exactly ``ps`` requires grad inside; flags, grads, dtype default and modes restored."""
    chosen = {id(p) for p in ps.params}
    state = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    dflt = torch.get_default_dtype()
    caught = warnings.catch_warnings()
    caught.__enter__()
    # PyHessian uses backward(create_graph=True); we reset .grad afterwards, which breaks the cycle
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    for p, _, _ in state:
        p.requires_grad_(id(p) in chosen)
        p.grad = None
    torch.set_default_dtype(ps.dtype)  # PyHessian draws torch.randn(p.size()) in the default dtype
    try:
        yield
    finally:
        torch.set_default_dtype(dflt)
        for p, rg, gr in state:
            p.grad = gr
            p.requires_grad_(rg)
        for m, f in modes:
            m.training = f
        caught.__exit__(None, None, None)


@contextlib.contextmanager
def _count_hvps() -> Iterator[list[int]]:
    """Count PyHessian's Hessian-vector products (full-data products count once)."""
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    count = [0]
    orig_single, orig_loader = ph.hessian_vector_product, ph.hessian.dataloader_hv_product

    def single(*a: Any, **k: Any) -> Any:
        count[0] += 1
        return orig_single(*a, **k)

    def loader(self: Any, v: Any) -> Any:
        count[0] += 1
        return orig_loader(self, v)

    ph.hessian_vector_product, ph.hessian.dataloader_hv_product = single, loader
    try:
        yield count
    finally:
        ph.hessian_vector_product, ph.hessian.dataloader_hv_product = orig_single, orig_loader


def _hessian(model: nn.Module, loss_fn: LossFn, bl: list[Batch], device: torch.device) -> Any:
    from pyhessian import hessian

    wrapped = _LossModule(model, loss_fn)
    cuda = device.type == "cuda"
    dummy = torch.zeros(1)
    if len(bl) == 1:  # PyHessian's single-batch mode keeps one gradient graph (its fast path)
        return hessian(wrapped, _identity_criterion, data=(_Box(bl[0]), dummy), cuda=cuda)
    return hessian(wrapped, _identity_criterion, dataloader=[(_Box(b), dummy) for b in bl], cuda=cuda)


def pyhessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    params: ParamSpec = None,
    top_n: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenResult:
    """PyHessian's ``eigenvalues()`` (power iteration) as an :class:`EigenResult`.

    ``seed`` seeds torch's global RNG (PyHessian draws its start vectors from it). One
    batch uses PyHessian's single-batch mode, several its dataloader mode.
    """
    bl = as_batch_list(batches)
    ps = ParamSet.from_model(model, params)
    settings = SpectrumSettings(
        "pyhessian-power", k=top_n, max_iter=max_iter, tol=tol, seed=seed, criterion="change",
        n_params=ps.n, **data_info(bl), extra={"mode": "single batch" if len(bl) == 1 else "dataloader"},
    )
    t0 = time.perf_counter()
    with _only(model, ps), _count_hvps() as count:
        torch.manual_seed(seed)
        h = _hessian(model, loss_fn, bl, ps.device)
        vals, vecs = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
        flat = torch.stack([ps.flatten([t.detach() for t in v]) for v in vecs])
        del h
    n = count[0]
    conv = Convergence(
        n < max_iter * top_n, n, n, time.perf_counter() - t0,
        note="iterations counted from PyHessian's HVP calls; it stops silently at max_iter",
    )
    return EigenResult(np.array(vals, dtype=np.float64), flat, settings, conv)


def pyhessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    params: ParamSpec = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> TraceResult:
    """PyHessian's Hutchinson ``trace()`` as a :class:`TraceResult`."""
    bl = as_batch_list(batches)
    ps = ParamSet.from_model(model, params)
    settings = SpectrumSettings(
        "pyhessian-hutchinson", max_iter=max_iter, tol=tol, seed=seed, criterion="change", n_params=ps.n, **data_info(bl)
    )
    t0 = time.perf_counter()
    with _only(model, ps):
        torch.manual_seed(seed)
        h = _hessian(model, loss_fn, bl, ps.device)
        samples = [float(x) for x in h.trace(maxIter=max_iter, tol=tol)]
        del h
    se = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    conv = Convergence(len(samples) < max_iter, len(samples), len(samples), time.perf_counter() - t0, list(np.cumsum(samples) / np.arange(1, len(samples) + 1)))
    return TraceResult(float(np.mean(samples)), se, samples, settings, conv)


def pyhessian_probes(model: nn.Module, n: int, params: ParamSpec = None, seed: int = 0) -> torch.Tensor:
    """The first ``n`` Rademacher vectors PyHessian's ``trace()`` draws after ``torch.manual_seed(seed)``
    (as :func:`pyhessian_trace` seeds it), as rows of an (n, dim) tensor.

    Why: give them to :func:`landscape.hutchinson` (``probes=``) and the two estimates
    use the same samples, so they can be compared to float precision rather than to
    Monte-Carlo error. Mirrors its draw: ``randint_like(p, high=2)`` per parameter in
    order, zeros set to -1. The global RNG is restored afterwards.
    """
    ps = ParamSet.from_model(model, params)
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            v = [torch.randint_like(p, high=2) for p in ps.params]
            for t in v:
                t[t == 0] = -1
            rows.append(ps.flatten([t.detach() for t in v]))
    return torch.stack(rows)


__all__ = ["pyhessian_eigenvalues", "pyhessian_probes", "pyhessian_trace"]
