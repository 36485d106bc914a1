"""Hessian-vector products over a parameter subset, accumulated over fixed batches.

``HessianOperator(model, loss_fn, batches, params)`` is a symmetric linear operator
``v -> H v`` on flat vectors, where ``H`` is the Hessian of the example-weighted dataset
loss (see ``landscape._params``) with respect to the chosen parameters, evaluated in
eval mode (dropout off; each module's train flag is restored afterwards).

How a product is computed (``method``):

* ``"double_backward"`` with ``cache_graph=True`` (the default path): the gradient of
  each batch is computed once with ``create_graph=True`` and kept; each product is then
  a single backward pass through all cached gradient graphs (one autograd call). This
  skips the forward and first backward that PyHessian redoes for every batch and every
  iteration, at the price of keeping the graphs in memory.
* ``"double_backward"`` with ``cache_graph=False``: forward + grad(create_graph) +
  backward per batch per product; low memory.
* ``"func"``: ``torch.func`` forward-over-reverse (``jvp(grad(f))``), per batch per
  product, no graph kept. Some ops of HF models have no forward-mode rule; then it fails.
* ``"auto"``: cached double backward when caching (cheapest per product: no forward);
  otherwise the first product is computed both ways and the faster method is kept
  (``timings``), or double backward if ``func`` raises (``fallback_reason``). On CPU
  BERT-style models double backward won in our measurements (0.64 s vs 1.17 s per
  batch of 16 for MiniLM-L6), on tiny MLPs ``func`` may win.

Precision (``precision``): ``"fp32"`` (default) runs the loss as the model is.
``"bf16"`` / ``"fp16"`` run every loss evaluation under ``torch.autocast``, so the
matmuls of the forward, backward and double backward run in half precision with fp32
accumulation: the Hessian is then that of the autocast model, not the fp32 one. Why
offer it: an exact HVP costs two matmul passes (a tangent forward and an adjoint
backward) and that bound is reached already, so lower-precision matmuls (AMX/AVX-512
bf16 on recent CPUs, tensor cores on GPUs) are the one remaining big lever; we measured
1.9x per top eigenvalue on MiniLM on a 2-core Xeon with the value 0.2% off the fp32 one
(benchmarks/RESULTS.md). Use it for landscape surveys; compare against fp32 when a
third digit matters. ``fp16`` may underflow in the double backward; prefer bf16.

Attention needs ``attn_implementation="eager"`` on CPU: SDPA has no double backward.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._params import (
    Batch,
    LandscapeError,
    LossFn,
    ParamSet,
    ParamSpec,
    as_batch_list,
    batch_weights,
    data_info,
    eval_mode,
    rebatch_by_length,
)
from .operators import LinearOperator

Method = Literal["auto", "double_backward", "func"]
Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_loss(loss_fn: LossFn, precision: Precision, device_type: str) -> LossFn:
    """``loss_fn`` evaluated under ``torch.autocast`` (returns an fp32 scalar); fp32: as is."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise LandscapeError(f"precision must be fp32|bf16|fp16, got {precision!r}")
    if precision == "fp32":
        return loss_fn
    dtype = _AUTOCAST[precision]

    def wrapped(model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = loss_fn(model, batch)
        return out.float()

    return wrapped


# --------------------------------------------------------------------------- functional model
class _FunctionalModel:
    """Calls ``model`` with some parameters replaced (``torch.func.functional_call``).

    Lets a ``loss_fn(model, batch)`` written for a plain module run under torch.func
    transforms; attribute access falls through to the real module.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self._model = model
        self._params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._model, self._params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


# --------------------------------------------------------------------------- Hessian
class HessianOperator(LinearOperator):
    """``v -> H v`` for the dataset loss over a parameter subset (see module doc).

    The operator is tied to the parameter values at the time its cache was built; if
    the parameters change in place (an optimiser step, a surface sweep) the cache is
    rebuilt automatically on the next product. Call :meth:`clear` (or use it as a
    context manager) to free the cached graphs early.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        params: ParamSpec = None,
        *,
        method: Method = "auto",
        cache_graph: bool = True,
        precision: Precision = "fp32",
        rebatch: bool | int = False,
    ):
        if method not in ("auto", "double_backward", "func"):
            raise LandscapeError(f"method must be auto|double_backward|func, got {method!r}")
        self.model = model
        self.batches = as_batch_list(batches)
        self.rebatch = rebatch
        if rebatch:  # same Hessian (see rebatch_by_length), fewer padded positions per product
            self.batches = rebatch_by_length(self.batches, None if rebatch is True else int(rebatch))
        self.weights = batch_weights(self.batches)
        self.pset = ParamSet.from_model(model, params)
        self.precision = precision
        self.loss_fn = autocast_loss(loss_fn, precision, self.pset.device.type)
        self.n = self.pset.n
        self.dtype = self.pset.dtype
        self.device = self.pset.device
        self.method = method
        self.cache_graph = bool(cache_graph) and method != "func"
        self.method_used: str | None = None
        self.fallback_reason: str | None = None
        self.timings: dict[str, float] = {}
        self.n_matvecs = 0
        self.build_seconds = 0.0
        self._cache: list[tuple[list[torch.Tensor], list[int]]] | None = None
        self._versions: tuple[int, ...] | None = None
        self._loss: float | None = None
        self._grad: torch.Tensor | None = None

    # -- bookkeeping
    def info(self) -> dict[str, Any]:
        d = {"n_params": self.n, "method": self.method_used or self.method, "cache_graph": self.cache_graph,
             "precision": self.precision}
        if self.rebatch:
            d["rebatch"] = "by length" if self.rebatch is True else f"by length, groups of {int(self.rebatch)}"
        d.update(data_info(self.batches))
        return d

    def clear(self) -> None:
        """Drop cached gradient graphs (frees memory); the next product rebuilds."""
        self._cache = None
        self._versions = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clear()

    @property
    def loss(self) -> float:
        """Dataset loss at the current parameters (computed with the gradient cache)."""
        if self._loss is None or self._versions != self.pset.versions():
            self._loss_and_grad()
        return float(self._loss)  # type: ignore[arg-type]

    @property
    def grad(self) -> torch.Tensor:
        """Flat dataset gradient at the current parameters."""
        if self._grad is None or self._versions != self.pset.versions():
            self._loss_and_grad()
        return self._grad  # type: ignore[return-value]

    def _loss_and_grad(self) -> None:
        if self.cache_graph:
            self._build()
            return
        from ._params import dataset_grad

        self._loss, self._grad = dataset_grad(self.model, self.loss_fn, self.batches, self.pset)
        self._versions = self.pset.versions()

    # -- the cached double-backward path
    def _build(self) -> None:
        t0 = time.perf_counter()
        ps = self.pset.params
        cache = []
        g_total = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        loss_total = 0.0
        with eval_mode(self.model), self.pset.grad_enabled(), torch.enable_grad():
            for w, b in zip(self.weights, self.batches):
                loss = self.loss_fn(self.model, b)
                gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
                g_total.add_(self.pset.flatten([None if g is None else g.detach() for g in gs]), alpha=w)
                loss_total += w * float(loss.detach())
                keep = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
                cache.append(([gs[i] for i in keep], keep))
        self._cache = cache
        self._versions = self.pset.versions()
        self._loss, self._grad = loss_total, g_total
        self.method_used = "double_backward(cached)"
        self.build_seconds += time.perf_counter() - t0

    def _through_cache(self, tangents: Sequence[torch.Tensor], batched: bool) -> tuple[torch.Tensor | None, ...] | None:
        """One backward through every cached gradient graph, parameter ``i`` weighted by ``tangents[i]``.

        Each batch's graph gets ``tangents[i] * w_b`` (its example weight), so the sum over
        batches is the dataset Hessian times the tangents; ``batched``: a leading dimension of
        ``k`` tangents at once (``is_grads_batched``). None when no gradient depends on the parameters.
        """
        if self._cache is None or self._versions != self.pset.versions():
            self._build()
        outs, gouts = [], []
        for w, (gs, keep) in zip(self.weights, self._cache):  # type: ignore[union-attr]
            for g, i in zip(gs, keep):
                outs.append(g)
                gouts.append(tangents[i] * w)
        if not outs:
            return None
        with self.pset.grad_enabled():
            return torch.autograd.grad(outs, self.pset.params, grad_outputs=gouts, retain_graph=True, allow_unused=True,
                                       is_grads_batched=batched)

    def _matvec_cached(self, v: torch.Tensor) -> torch.Tensor:
        hv = self._through_cache(self.pset.unflatten(v), batched=False)
        return torch.zeros_like(v) if hv is None else self.pset.flatten(hv)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V^T`` for a block of vectors ``V`` of shape (k, n): one row per vector.

        With the cached graph this is ONE batched double backward
        (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap over the
        backward): the graph is walked once for all k vectors. Why offer it: on a GPU the
        k products fill the device far better than one; on a CPU that is already
        FLOP-bound it costs about k single products (measured in
        benchmarks/RESULTS.md), so the spectrum routines keep single products there.
        Uncached paths fall back to one product per row. Counts k products.
        """
        V = self._check_block(V)
        k = V.shape[0]
        if not self.cache_graph or k <= 1:
            return super().matmat(V)
        self.n_matvecs += k
        cols = [V[:, a:b].reshape(k, *shape) for a, b, shape in zip(self.pset.offsets[:-1], self.pset.offsets[1:], self.pset.shapes)]
        hv = self._through_cache(cols, batched=True)
        if hv is None:
            return torch.zeros_like(V)
        parts = [torch.zeros(k, m, dtype=self.dtype, device=self.device) if h is None else h.reshape(k, -1)
                 for h, m in zip(hv, self.pset.numels)]
        return torch.cat(parts, dim=1)

    # -- uncached paths
    def _matvec_double_backward(self, v: torch.Tensor) -> torch.Tensor:
        vs = self.pset.unflatten(v)
        out = torch.zeros_like(v)
        ps = self.pset.params
        with eval_mode(self.model), self.pset.grad_enabled(), torch.enable_grad():
            for w, b in zip(self.weights, self.batches):
                loss = self.loss_fn(self.model, b)
                gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
                keep = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
                if not keep:
                    continue
                hv = torch.autograd.grad([gs[i] for i in keep], ps, grad_outputs=[vs[i] for i in keep], allow_unused=True)
                out.add_(self.pset.flatten(hv), alpha=w)
        self.method_used = "double_backward"
        return out

    def _func_hvp_batch(self, batch: Batch, vs: list[torch.Tensor]) -> torch.Tensor:
        names = self.pset.names
        primals = {n: p.detach() for n, p in zip(names, self.pset.params)}
        tangents = dict(zip(names, vs))

        def f(pd: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_fn(_FunctionalModel(self.model, pd), batch)

        _, hv = torch.func.jvp(torch.func.grad(f), (primals,), (tangents,))
        return self.pset.flatten([hv[n] for n in names])

    def _matvec_func(self, v: torch.Tensor) -> torch.Tensor:
        vs = self.pset.unflatten(v)
        out = torch.zeros_like(v)
        with eval_mode(self.model):
            for w, b in zip(self.weights, self.batches):
                out.add_(self._func_hvp_batch(b, vs), alpha=w)
        self.method_used = "func"
        return out

    # -- dispatch
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (same length as the parameter subset)."""
        v = self._check(v)
        self.n_matvecs += 1
        if self.cache_graph:
            return self._matvec_cached(v)
        if self.method == "double_backward":
            return self._matvec_double_backward(v)
        if self.method == "func":
            return self._matvec_func(v)
        # auto without cache: on the first product time both and keep the faster one;
        # a torch.func failure (an op without a forward-mode rule) means double backward for good
        if self.method_used is None:
            return self._choose(v)
        if self.method_used == "func":
            return self._matvec_func(v)
        return self._matvec_double_backward(v)

    def _choose(self, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._matvec_double_backward(v)
        t_db = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            self._matvec_func(v)
            t_func = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - any failure means "unsupported here"
            self.fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.func HVP failed ({self.fallback_reason}); using double backward", stacklevel=3)
            self.method_used = "double_backward"
            return out
        self.method_used = "func" if t_func < t_db else "double_backward"
        self.timings = {"double_backward_s": t_db, "func_s": t_func}
        return out

    def dense(self) -> torch.Tensor:
        """The full Hessian as an (n, n) matrix, one product per column (tiny subsets only)."""
        if self.n > 20000:
            raise LandscapeError(f"refusing to build a dense {self.n}x{self.n} Hessian")
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        cols = [self.matvec(eye[i]) for i in range(self.n)]
        H = torch.stack(cols, dim=1)
        return 0.5 * (H + H.T)


# --------------------------------------------------------------------------- Gauss-Newton
class GaussNewtonOperator(LinearOperator):
    """Generalised Gauss-Newton ``G v = J^T H_out J v``: PSD and cheap-ish curvature.

    Needs the loss split into ``output_fn(model, batch) -> outputs`` and
    ``criterion(outputs, batch) -> mean loss``. ``J v`` uses the double-vjp trick on the
    cached output graph, so each product is three backward passes and no forward.
    For a convex criterion (cross-entropy, MSE) ``G`` is PSD; it equals the Hessian
    when the model is linear in the chosen parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: Callable[[nn.Module, Batch], torch.Tensor],
        criterion: Callable[[torch.Tensor, Batch], torch.Tensor],
        batches: Iterable[Batch],
        params: ParamSpec = None,
    ):
        self.model = model
        self.output_fn = output_fn
        self.criterion = criterion
        self.batches = as_batch_list(batches)
        self.weights = batch_weights(self.batches)
        self.pset = ParamSet.from_model(model, params)
        self.n, self.dtype, self.device = self.pset.n, self.pset.dtype, self.pset.device
        self.n_matvecs = 0
        self._cache: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]] | None = None
        self._versions: tuple[int, ...] | None = None

    def info(self) -> dict[str, Any]:
        d = {"n_params": self.n, "method": "gauss_newton"}
        d.update(data_info(self.batches))
        return d

    def clear(self) -> None:
        self._cache = None

    def _build(self) -> None:
        cache = []
        ps = self.pset.params
        with eval_mode(self.model), self.pset.grad_enabled(), torch.enable_grad():
            for b in self.batches:
                out = self.output_fn(self.model, b)
                u = torch.zeros_like(out, requires_grad=True)
                jtu = torch.autograd.grad(out, ps, grad_outputs=u, create_graph=True, allow_unused=True)
                jtu = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, jtu)]
                o = out.detach().requires_grad_(True)
                go = torch.autograd.grad(self.criterion(o, b), o, create_graph=True)[0]
                cache.append((out, u, jtu, o, go))
        self._cache = cache
        self._versions = self.pset.versions()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        v = self._check(v)
        self.n_matvecs += 1
        if self._cache is None or self._versions != self.pset.versions():
            self._build()
        vs = self.pset.unflatten(v)
        res = torch.zeros_like(v)
        with self.pset.grad_enabled():
            for w, (out, u, jtu, o, go) in zip(self.weights, self._cache):  # type: ignore[union-attr]
                live = [(g, x) for g, x in zip(jtu, vs) if g.requires_grad]
                if not live:
                    continue
                jv = torch.autograd.grad([g for g, _ in live], u, grad_outputs=[x for _, x in live], retain_graph=True)[0]
                hjv = torch.autograd.grad(go, o, grad_outputs=jv, retain_graph=True)[0]
                gv = torch.autograd.grad(out, self.pset.params, grad_outputs=hjv, retain_graph=True, allow_unused=True)
                res.add_(self.pset.flatten(gv), alpha=w)
        return res


# --------------------------------------------------------------------------- one-off
def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    v: torch.Tensor | Sequence[torch.Tensor],
    params: ParamSpec = None,
    method: Method = "auto",
    precision: Precision = "fp32",
) -> torch.Tensor:
    """One Hessian-vector product (flat ``v`` or a list shaped like the parameters)."""
    op = HessianOperator(model, loss_fn, batches, params, method=method, cache_graph=False, precision=precision)
    if not isinstance(v, torch.Tensor):
        v = op.pset.flatten(list(v))
    return op.matvec(v)


__all__ = [
    "GaussNewtonOperator",
    "HessianOperator",
    "autocast_loss",
    "hvp",
]
