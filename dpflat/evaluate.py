"""Accuracy and per-example losses, with the model in eval mode and no autograd; the one
cross-entropy loss function (``ce_loss``) and fixed-batch builder (``fixed_batches``) that the
landscape figures, the layer scorer and the sharpness trajectory share."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The keys the model takes, on ``device`` (labels/idx stay out).

    Trailing columns that are padding in every row are cut: the tokeniser pads to
    ``max_length`` (so cached tensors stack), but SST-2 sentences use a third of it,
    and attention cost grows with the padded length. Masked positions do not change
    the outputs, so this is exact (up to float summation order).
    """
    out = {k: batch[k] for k in MODEL_KEYS if k in batch}
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] > 1:
        used = mask.bool().any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        if width < mask.shape[1]:
            out = {k: (v[:, :width] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()}


def batches(dataset, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Fixed-order batches of a torch-formatted dataset (large: evaluation has no per-example state)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    yield from loader


def ce_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a tokenised batch, in fp32 (the ``landscape`` tools' loss_fn contract).

    On the device of the model's trainable parameters (every parameter when none trains).
    """
    p = next((p for p in model.parameters() if p.requires_grad), None)
    dev = (p if p is not None else next(model.parameters())).device
    return F.cross_entropy(model(**model_inputs(batch, dev)).float(), batch["labels"].to(dev))


#: the columns a fixed batch keeps with ``keys=BATCH_KEYS`` (the model's inputs and the labels)
BATCH_KEYS = (*MODEL_KEYS, "labels")


def fixed_batches(dataset, n: int, batch_size: int = 128, *, keys: tuple[str, ...] | None = None,
                  group: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` rows as a fixed list of batches (the splits are already shuffled by the splitter).

    ``keys``: keep only these columns (None: all). ``group``: regroup the rows by length into groups
    of that many and cut each group's padding (``landscape.rebatch_by_length``): every
    example-weighted figure is the same up to float summation order, at a fraction of the cost.
    """
    sub = dataset.select(range(min(n, len(dataset))))
    out = [b if keys is None else {k: v for k, v in b.items() if k in keys}
           for b in torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False)]
    if group:
        from landscape import rebatch_by_length

        out = rebatch_by_length(out, int(group))
    return out


def length_order(dataset) -> np.ndarray | None:
    """Row order by real length (stable), so that evaluation batches hold sentences of similar
    length and ``model_inputs`` cuts most padding (eval mode: every row's output is the same in
    any batch, up to float summation order). None when the rows have no attention mask."""
    if len(dataset) == 0 or "attention_mask" not in (getattr(dataset, "column_names", None) or ()):
        return None
    from .batching import dataset_lengths

    return torch.argsort(dataset_lengths(dataset), stable=True).numpy()


def autocast(device: str | torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is bf16; a no-op context for fp32."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.inference_mode()
def per_example_losses(
    model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu", precision: str = "fp32"
) -> dict[str, np.ndarray]:
    """Cross-entropy, prediction and correctness per example (for MIA and reports)."""
    was = model.training
    model.eval()
    losses, preds, labels, idx = [], [], [], []
    order = length_order(dataset)
    try:
        for b in batches(dataset if order is None else dataset.select(order), batch_size):
            with autocast(device, precision):
                logits = model(**model_inputs(b, device))
            logits = logits.float()
            y = b["labels"].to(logits.device)
            losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
            preds.append(logits.argmax(-1).cpu())
            labels.append(y.cpu())
            if "idx" in b:
                idx.append(b["idx"])
    finally:
        model.train(was)
    out = {
        "loss": torch.cat(losses).numpy() if losses else np.zeros(0),
        "pred": torch.cat(preds).numpy() if preds else np.zeros(0, dtype=int),
        "label": torch.cat(labels).numpy() if labels else np.zeros(0, dtype=int),
    }
    if idx:
        out["idx"] = torch.cat(idx).numpy()
    if order is not None:  # back to the dataset's row order
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        out = {k: v[back] for k, v in out.items()}
    return out


def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu",
             precision: str = "fp32") -> dict[str, Any]:
    """Mean loss and accuracy on ``dataset``."""
    r = per_example_losses(model, dataset, batch_size, device, precision)
    n = len(r["loss"])
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}
    return {"loss": float(r["loss"].mean()), "accuracy": float((r["pred"] == r["label"]).mean()), "n": n}


__all__ = ["BATCH_KEYS", "MODEL_KEYS", "autocast", "batches", "ce_loss", "evaluate", "fixed_batches", "model_inputs",
           "per_example_losses"]


# --------------------------------------------------------------------------- test split and run cost
@torch.inference_mode()
def evaluate_test(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The one read of the test split: mean loss/accuracy plus the per-example arrays
    (idx, label, pred, loss, correct) that paired statistics bootstrap over."""
    r = per_example_losses(model, dataset, batch_size, device, precision)
    n = len(r["loss"])
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}, {}
    correct = (r["pred"] == r["label"])
    per_ex = {"idx": r.get("idx", np.arange(n)).astype(np.int64), "label": r["label"].astype(np.int64),
              "pred": r["pred"].astype(np.int64), "loss": r["loss"].astype(np.float32), "correct": correct}
    return {"loss": float(r["loss"].mean()), "accuracy": float(correct.mean()), "n": n}, per_ex


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a run's GPU peak-memory count (CPU RSS peaks cannot be reset: see peak_memory_mb)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's
    peak resident set size (``getrusage``; for a sweep in one process it is the peak so far)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


__all__ += ["evaluate_test", "peak_memory_mb", "reset_peak_memory"]
