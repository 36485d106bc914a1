"""How a logical batch is cut into physical batches: grouped by length, padding cut.

Why: the tokeniser pads every example to ``max_length`` so cached tensors stack, and a
physical batch costs what its *padded* positions cost (every position goes through the
frozen encoder forward and backward). SST-2 sentences are short and their lengths
spread wide, so an arbitrary cut computes about 4.8 encoder positions per real token
(``benchmarks/bench_padding.py``). Sorting a logical batch by length and cutting it
where the padding is least, each physical batch trimmed to its longest member, computes
about 1.3. What is computed does not change: the logical batch (its Poisson draw), each
example's clipped gradient, their sum, the noise and the ledger are the same; only the
order of a float sum does (and, where dropout is on, which mask an example draws).

Opacus' ``BatchMemoryManager`` cuts a batch's indices in arrival order into equal parts;
:class:`GroupedSplittingSampler` is the same contract (it tells the DP optimizer which
physical batch ends the logical one) with the cut chosen by :func:`plan_chunks`. Written
by hand because no library we use groups *inside* a Poisson batch: length-grouping
samplers (e.g. transformers' ``LengthGroupedSampler``) choose the batches themselves,
which would break the Poisson sampling the accountant assumes.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

#: a physical batch's fixed cost, in encoder positions: Python, hooks, kernel launches and the
#: per-example clipping of one more batch. Measured on the 2-core CPU (bench_train --grouping):
#: one more physical batch costs about as much as 48 more positions of MiniLM forward + backward.
CHUNK_COST = 48


def real_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last real token + 1 (1 for an all-padding row)."""
    mask = attention_mask.ne(0)
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device).expand_as(mask)
    return (pos * mask).amax(1).clamp_min(1).long()


def dataset_lengths(dataset) -> torch.Tensor:
    """:func:`real_lengths` of every row of a tokenised (torch-formatted) dataset, in row order."""
    mask = dataset[:]["attention_mask"] if len(dataset) else torch.zeros(0, 1, dtype=torch.long)
    return real_lengths(torch.as_tensor(mask))


def plan_chunks(lengths: Sequence[int], max_examples: int, chunk_cost: int = CHUNK_COST) -> list[list[int]]:
    """Positions into ``lengths`` grouped into physical batches, shortest first.

    Minimises the computed positions, sum over batches of (size x longest length), plus
    ``chunk_cost`` per batch, with at most ``max_examples`` per batch: sorted by length,
    an optimal cut is contiguous, so a dynamic programme over cut points finds it exactly
    (n <= a few thousand: O(n x max_examples)). Ties keep the arrival order (stable sort).
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    order = sorted(range(n), key=lambda i: int(lengths[i]))
    ls = [int(lengths[i]) for i in order]
    best = [0.0] + [float("inf")] * n  # best[j]: cost of cutting the first j sorted examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_examples), j):  # the last batch is sorted[i:j], its longest ls[j-1]
            c = best[i] + (j - i) * ls[j - 1] + chunk_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the columns that are padding in every row (the encoder's outputs on real tokens do not
    depend on masked positions)."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return batch
    width, full = int(real_lengths(mask).max()), mask.shape[1]
    if width >= full:
        return batch
    return {k: (v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == full else v)
            for k, v in batch.items()}


def split_batch(batch: dict[str, torch.Tensor], max_examples: int,
                chunk_cost: int = CHUNK_COST) -> list[dict[str, torch.Tensor]]:
    """A collated batch cut by :func:`plan_chunks`, each part trimmed (the non-private path)."""
    n = len(batch["labels"])
    if n == 0:
        return [batch]
    lengths = real_lengths(batch["attention_mask"]) if "attention_mask" in batch else torch.ones(n, dtype=torch.long)
    parts = []
    for idx in plan_chunks(lengths.tolist(), max_examples, chunk_cost):
        sel = torch.as_tensor(idx, dtype=torch.long)
        parts.append(trim({k: v.index_select(0, sel) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
                           else v for k, v in batch.items()}))
    return parts


class GroupedSplittingSampler(Sampler[list[int]]):
    """Opacus' ``BatchSplittingSampler`` with the cut of :func:`plan_chunks`.

    Wraps the DP loader's batch sampler (the Poisson sampler): each logical batch of indices
    is regrouped by length and yielded as physical batches; before each one the DP optimizer
    is told whether it ends the logical batch (``signal_skip_step``), exactly as Opacus'
    ``BatchMemoryManager`` does. An empty Poisson batch is yielded once, as empty.
    """

    def __init__(self, sampler, lengths: torch.Tensor, max_examples: int, optimizer,
                 chunk_cost: int = CHUNK_COST):
        self.sampler, self.lengths, self.max_examples = sampler, lengths, int(max_examples)
        self.optimizer, self.chunk_cost = optimizer, chunk_cost

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.sampler:
            idx = list(idx)
            if not idx:
                self.optimizer.signal_skip_step(do_skip=False)
                yield []
                continue
            parts = plan_chunks(self.lengths[idx].tolist(), self.max_examples, self.chunk_cost)
            for k, part in enumerate(parts):
                self.optimizer.signal_skip_step(do_skip=k < len(parts) - 1)
                yield [idx[i] for i in part]

    def __len__(self) -> int:
        return len(self.sampler)  # logical batches; the physical count varies with the draw


def grouped_loader(loader: DataLoader, lengths: torch.Tensor, max_examples: int, optimizer,
                   chunk_cost: int = CHUNK_COST) -> DataLoader:
    """The DP loader with its logical batches cut by :class:`GroupedSplittingSampler`.

    Same dataset, collate function and generator as ``loader`` (a new iterator draws its base
    seed from the generator, the secret sampler's, as Opacus' ``wrap_data_loader`` keeps it).
    """
    return DataLoader(dataset=loader.dataset,
                      batch_sampler=GroupedSplittingSampler(loader.batch_sampler, lengths, max_examples, optimizer,
                                                            chunk_cost),
                      collate_fn=loader.collate_fn, generator=loader.generator)


__all__ = ["CHUNK_COST", "GroupedSplittingSampler", "dataset_lengths", "grouped_loader", "plan_chunks",
           "real_lengths", "split_batch", "trim"]
