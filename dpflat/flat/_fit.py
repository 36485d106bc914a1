"""Short non-private fits used by the flattening levels (teacher, warm-up).

Why a separate tiny loop: these fits must not touch the DP optimizer or Opacus
hooks, and each caller must say which data it reads (public, or private through the
ledger as an unaccounted read).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate import model_inputs


def fit_nonprivate(
    model: nn.Module,
    dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` trained ``steps`` AdamW steps on ``dataset``; ``model`` is untouched."""
    student = copy.deepcopy(model)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=g)
    done = 0
    while done < steps:
        for b in loader:
            loss = F.cross_entropy(student(**model_inputs(b, device)), b["labels"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_batch:
                on_batch(len(b["labels"]))
            done += 1
            if done >= steps:
                break
    student.eval()
    return student


def steps_for_epochs(epochs: float, n: int, batch_size: int) -> int:
    return max(1, int(round(epochs * max(1, -(-n // max(1, batch_size))))))
