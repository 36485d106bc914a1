"""Parameter subsets as flat vectors, batches, and the dataset loss.

Why flat vectors: Lanczos, Hutch++ and directions are plain linear algebra; one 1-D
tensor per vector (in the parameters' dtype, float64 when the model is float64) keeps
them simple and lets a dense matrix stand in for the Hessian in tests.

Conventions shared by the whole package:

* ``loss_fn(model, batch) -> scalar tensor``: the *mean* loss over one batch.
* ``batches``: a fixed list of batches (dicts of tensors, HF style, or tuples).
* The loss over the data set is the *example-weighted* mean over batches:
  ``L = sum_b n_b * L_b / sum_b n_b`` where ``n_b`` is the batch's number of examples
  (``len(batch["labels"])``, else the first tensor's first dimension). For equal batch
  sizes this is the plain mean; for a ragged last batch it equals the mean over all
  examples, which is what the loss of one big batch would be.
* ``params``: ``None`` = the parameters that require grad; a callable ``name -> bool``;
  a list of parameter names; or a list of the parameter tensors themselves.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
ParamSpec = Union[None, Callable[[str], bool], Sequence[str], Sequence[torch.Tensor]]
GroupSpec = Union[None, str, Callable[[str], Union[str, None]], Mapping[str, Union[Sequence[str], torch.Tensor]]]


class LandscapeError(ValueError):
    """Bad input to a landscape function (one clear line)."""


# --------------------------------------------------------------------------- params
@dataclass
class ParamSet:
    """An ordered parameter subset of a model and its flat-vector layout."""

    names: list[str]
    params: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.params):
            raise LandscapeError("names and params must have the same length")
        if not self.params:
            raise LandscapeError("the parameter subset is empty (no parameter requires grad / matches the filter)")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise LandscapeError(f"all selected parameters must share one dtype, got {sorted(map(str, dtypes))}")
        if not self.params[0].is_floating_point():
            raise LandscapeError("selected parameters must be floating point")
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)

    # -- construction
    @classmethod
    def from_model(cls, model: nn.Module, params: ParamSpec = None) -> ParamSet:
        """Resolve ``params`` (see module doc) against ``model.named_parameters()``."""
        named = list(model.named_parameters())
        if params is None:
            sel = [(n, p) for n, p in named if p.requires_grad]
        elif callable(params):
            sel = [(n, p) for n, p in named if params(n)]
        else:
            items = list(params)
            if items and all(isinstance(x, str) for x in items):
                lookup = dict(named)
                missing = [x for x in items if x not in lookup]
                if missing:
                    raise LandscapeError(f"unknown parameter names: {missing[:5]}")
                sel = [(x, lookup[x]) for x in items]
            elif all(isinstance(x, torch.Tensor) for x in items):
                by_id = {id(p): n for n, p in named}
                sel = [(by_id.get(id(p), f"param{i}"), p) for i, p in enumerate(items)]
            else:
                raise LandscapeError("params must be None, a callable name -> bool, names, or tensors")
        return cls([n for n, _ in sel], [p for _, p in sel])

    # -- layout
    @property
    def n(self) -> int:
        return self.offsets[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def slice_of(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors (None = zeros) into one flat vector."""
        parts = [
            torch.zeros(k, dtype=self.dtype, device=self.device) if t is None else t.reshape(-1)
            for t, k in zip(tensors, self.numels)
        ]
        return torch.cat(parts)

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters."""
        if vec.shape != (self.n,):
            raise LandscapeError(f"vector has shape {tuple(vec.shape)}, expected ({self.n},)")
        return [vec[a:b].view(s) for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def get_flat(self) -> torch.Tensor:
        """A detached copy of the current parameter values."""
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    @torch.no_grad()
    def set_flat(self, vec: torch.Tensor) -> None:
        for p, v in zip(self.params, self.unflatten(vec.to(self.dtype))):
            p.copy_(v)

    @torch.no_grad()
    def add_flat(self, vec: torch.Tensor, alpha: float = 1.0) -> None:
        for p, v in zip(self.params, self.unflatten(vec.to(self.dtype))):
            p.add_(v, alpha=alpha)

    def versions(self) -> tuple[int, ...]:
        """In-place version counters: tell whether parameters changed since a snapshot."""
        return tuple(p._version for p in self.params)

    @contextlib.contextmanager
    def grad_enabled(self) -> Iterator[None]:
        """Temporarily set ``requires_grad`` on selected frozen parameters (restored after)."""
        off = [p for p in self.params if not p.requires_grad]
        for p in off:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in off:
                p.requires_grad_(False)

    def mask(self, parts: Mapping[str, torch.Tensor | slice | None]) -> torch.Tensor:
        """Boolean mask over the flat vector from per-parameter masks.

        ``parts[name]`` is ``None`` (the whole parameter), a boolean tensor of the
        parameter's shape, or a slice of its flattened elements. Use it to build groups
        that cut *inside* a parameter, e.g. one layer's slice of a shared prefix table.
        """
        out = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        for name, part in parts.items():
            sl = self.slice_of(name)
            if part is None:
                out[sl] = True
            elif isinstance(part, slice):
                out[sl][part] = True
            else:
                i = self.names.index(name)
                if tuple(part.shape) != self.shapes[i]:
                    raise LandscapeError(f"mask for {name} has shape {tuple(part.shape)}, expected {self.shapes[i]}")
                out[sl] = part.reshape(-1).to(torch.bool)
        return out

    def chunk_groups(self, name: str, n: int, dim: int = -1, fmt: str = "{name}[{i}]") -> dict[str, torch.Tensor]:
        """Split one parameter into ``n`` equal chunks along ``dim``: one flat mask each.

        Why: per-layer quantities when layers share one tensor, e.g. a prefix table of
        shape ``(m, L * 2 * H)`` is ``chunk_groups(name, L, dim=1, fmt="layer {i}")``.
        Combine with other groups in a mapping for :meth:`groups`.
        """
        i = self.names.index(name)
        shape = self.shapes[i]
        d = dim % len(shape)
        if n < 1 or shape[d] % n:
            raise LandscapeError(f"{name}: dim {d} of size {shape[d]} does not split into {n} equal chunks")
        size = shape[d] // n
        out = {}
        for j in range(n):
            part = torch.zeros(shape, dtype=torch.bool, device=self.device)
            part.narrow(d, j * size, size).fill_(True)
            out[fmt.format(name=name, i=j)] = self.mask({name: part})
        return out

    def groups(self, spec: GroupSpec = None) -> dict[str, torch.Tensor]:
        """Resolve a group spec to ``{group name: index tensor into the flat vector}``.

        ``spec``: ``None``/``"param"`` = one group per parameter; ``"module"`` = one per
        parent module (``encoder.layer.3.attention.self``); ``"layer"`` = by the first
        ``layer.<i>`` / ``layers.<i>`` / ``h.<i>`` in the name (others keep their
        module); a callable ``name -> group or None`` (None = left out); or a mapping
        ``group -> list of names | boolean mask | index tensor`` over the flat vector.
        """
        if spec is None or spec == "param":
            return {n: torch.arange(self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)}
        if spec == "module":
            return self.groups(lambda n: n.rsplit(".", 1)[0] if "." in n else n)
        if spec == "layer":
            pat = re.compile(r"^(.*?\b(?:layer|layers|h|block|blocks)\.\d+)\.")
            return self.groups(lambda n: (m.group(1) if (m := pat.match(n)) else (n.rsplit(".", 1)[0] if "." in n else n)))
        if isinstance(spec, str):
            raise LandscapeError(f"unknown group spec {spec!r} (param | module | layer | callable | mapping)")
        out: dict[str, list[int] | torch.Tensor] = {}
        if callable(spec):
            acc: dict[str, list[torch.Tensor]] = {}
            for i, n in enumerate(self.names):
                g = spec(n)
                if g is not None:
                    acc.setdefault(str(g), []).append(torch.arange(self.offsets[i], self.offsets[i + 1]))
            return {g: torch.cat(v) for g, v in acc.items()}
        for g, v in spec.items():
            if isinstance(v, torch.Tensor):
                if v.dtype == torch.bool:
                    if v.shape != (self.n,):
                        raise LandscapeError(f"group {g!r}: boolean mask must have shape ({self.n},)")
                    out[g] = torch.nonzero(v.cpu(), as_tuple=False).flatten()
                else:
                    out[g] = v.cpu().long().flatten()
            else:
                out[g] = torch.cat([torch.arange(self.slice_of(n).start, self.slice_of(n).stop) for n in v])
        empty = [g for g, v in out.items() if len(v) == 0]
        if empty:
            raise LandscapeError(f"empty groups: {empty}")
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- modes
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off) inside, each submodule's own train flag restored after.

    Why per module: a model may be mixed (frozen backbone in eval, head in train);
    ``model.train(was)`` would flatten that.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


# --------------------------------------------------------------------------- batches
def batch_size(batch: Batch) -> int:
    """Number of examples: ``len(batch['labels'])`` for dicts, else the first tensor's dim 0."""
    if isinstance(batch, Mapping):
        if "labels" in batch and isinstance(batch["labels"], torch.Tensor):
            return int(batch["labels"].shape[0])
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
            if isinstance(v, (Mapping, tuple, list)):
                return batch_size(v)
    elif isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return int(batch.shape[0])
    raise LandscapeError(f"cannot tell the number of examples of a batch of type {type(batch).__name__}")


def as_batch_list(batches: Iterable[Batch] | Batch) -> list[Batch]:
    """Materialise ``batches`` as a fixed list (a single dict/tuple batch becomes a list of one)."""
    if isinstance(batches, Mapping):
        return [batches]
    if isinstance(batches, tuple) and batches and isinstance(batches[0], torch.Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise LandscapeError("no batches given")
    return out


def batch_weights(batches: Sequence[Batch]) -> list[float]:
    """Example weights ``n_b / N`` for the example-weighted mean over batches."""
    sizes = [batch_size(b) for b in batches]
    total = float(sum(sizes))
    if total <= 0:
        raise LandscapeError("batches hold no examples")
    return [s / total for s in sizes]


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _cat_pad(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    if ts[0].dim() >= 2 and len({t.shape[1] for t in ts}) > 1:
        L = max(t.shape[1] for t in ts)
        ts = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1])) for t in ts]
    return torch.cat(list(ts), dim=0)


def merge_batches(batches: Sequence[Batch], max_examples: int) -> list[Batch]:
    """Concatenate consecutive batches into eval batches of at most ``max_examples``.

    Why: a loss surface needs only forward passes, and few large batches are faster
    than many small ones. Tensors of shape (B, L, ...) with different L are right-padded
    with 0; with an attention mask (0 on padding) an encoder's outputs on real tokens are
    unchanged. The example-weighted dataset loss is unchanged by merging.
    """
    if max_examples < 1:
        raise LandscapeError("max_examples must be >= 1")
    out: list[Batch] = []
    cur: list[Batch] = []
    n = 0
    for b in batches:
        k = batch_size(b)
        if cur and n + k > max_examples:
            out.append(_merge(cur))
            cur, n = [], 0
        cur.append(b)
        n += k
    if cur:
        out.append(_merge(cur))
    return out


def _merge(bs: list[Batch]) -> Batch:
    if len(bs) == 1:
        return bs[0]
    first = bs[0]
    if isinstance(first, Mapping):
        return {k: (_cat_pad([b[k] for b in bs]) if isinstance(first[k], torch.Tensor) and first[k].dim() > 0 else first[k]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(
            _cat_pad([b[i] for b in bs]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x for i, x in enumerate(first)
        )
    if isinstance(first, torch.Tensor):
        return _cat_pad(bs)
    raise LandscapeError(f"cannot merge batches of type {type(first).__name__}")


def rebatch_by_length(batches: Sequence[Batch], group_size: int | None = None) -> list[Batch]:
    """Regroup HF dict batches by real length and cut the padding columns of each group.

    Why: an encoder's cost grows with the *padded* length, and a batch is padded to its
    longest sentence. Sorting the examples by ``attention_mask`` length and grouping
    neighbours wastes far fewer positions (64 SST-2 sentences in 4 batches of 16: 2656
    padded positions before, about 1870 after). With masked padding an encoder's outputs
    on real tokens do not depend on the padding, and the loss contract (a mean per batch,
    example-weighted over batches) makes the dataset loss -- hence its gradient and
    Hessian -- independent of how examples are grouped: the same numbers up to float
    summation order. ``group_size``: examples per group (default: the largest given
    batch). Batches that are not dicts with a 2-D ``attention_mask`` are returned as is.
    """
    bl = as_batch_list(batches)
    if not all(isinstance(b, Mapping) and isinstance(b.get("attention_mask"), torch.Tensor)
               and b["attention_mask"].dim() == 2 for b in bl):
        return bl
    keys = list(bl[0].keys())
    if any(list(b.keys()) != keys for b in bl):
        return bl
    size = max(batch_size(b) for b in bl) if group_size is None else int(group_size)
    if size < 1:
        raise LandscapeError("group_size must be >= 1")
    whole = _merge(bl) if len(bl) > 1 else dict(bl[0])
    mask = whole["attention_mask"]
    n, width = mask.shape
    lengths = mask.ne(0).long().cumsum(1).argmax(1) + 1  # position of the last real token + 1
    lengths = torch.where(mask.ne(0).any(1), lengths, torch.ones_like(lengths))
    order = torch.argsort(lengths, stable=True)
    out: list[Batch] = []
    for s in range(0, n, size):
        idx = order[s : s + size]
        w = int(lengths[idx].max())
        b = {}
        for k in keys:
            v = whole[k]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                v = v.index_select(0, idx.to(v.device))
                if v.dim() >= 2 and v.shape[1] == width:
                    v = v[:, :w]
            b[k] = v
        out.append(b)
    return out


# --------------------------------------------------------------------------- losses
@torch.no_grad()
def dataset_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> float:
    """Example-weighted mean loss over ``batches`` in eval mode, one no-grad pass each."""
    batches = as_batch_list(batches)
    ws = batch_weights(batches)
    with eval_mode(model):
        total = 0.0
        for w, b in zip(ws, batches):
            total += w * float(loss_fn(model, b))
    return total


def dataset_grad(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], pset: ParamSet
) -> tuple[float, torch.Tensor]:
    """(loss, flat gradient) of the example-weighted dataset loss, in eval mode."""
    batches = as_batch_list(batches)
    ws = batch_weights(batches)
    g = torch.zeros(pset.n, dtype=pset.dtype, device=pset.device)
    total = 0.0
    with eval_mode(model), pset.grad_enabled(), torch.enable_grad():
        for w, b in zip(ws, batches):
            loss = loss_fn(model, b)
            gs = torch.autograd.grad(loss, pset.params, allow_unused=True)
            g.add_(pset.flatten(gs), alpha=w)
            total += w * float(loss.detach())
    return total, g


def data_info(batches: Sequence[Batch]) -> dict[str, int]:
    bs = as_batch_list(batches)
    return {"n_batches": len(bs), "n_examples": sum(batch_size(b) for b in bs)}


__all__ = [
    "Batch",
    "GroupSpec",
    "LandscapeError",
    "LossFn",
    "ParamSet",
    "ParamSpec",
    "as_batch_list",
    "batch_size",
    "batch_weights",
    "data_info",
    "dataset_grad",
    "dataset_loss",
    "eval_mode",
    "merge_batches",
    "rebatch_by_length",
    "to_device",
]
