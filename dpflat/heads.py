"""The classification heads on the pooled (or mask-token) hidden state: LM-BFF label words scored
by the frozen MLM head (a decoder's: its LM head, the next token's logits), the readout to label descriptions, and which one ``head="auto"`` means.
The linear head is a plain ``nn.Linear`` built by ``models.PrefixModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import decoders
from .config import ModelConfig

class LabelWordHead(nn.Module):
    """Frozen MLM head restricted to the label words: logits_k = MLM(h_mask)[word_k] (LM-BFF).

    Nothing here is trained (the decoder is tied to the frozen word embeddings), so
    Opacus sees only the prefix: per-example gradients are unchanged in kind.
    """

    def __init__(self, mlm_head: nn.Module, word_ids: list[int]):
        super().__init__()
        self.mlm_head = mlm_head
        for p in self.mlm_head.parameters():
            p.requires_grad_(False)
        self.register_buffer("word_ids", torch.as_tensor(word_ids, dtype=torch.long), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the head (callers use ``model.head.weight.device``)."""
        return next(self.mlm_head.parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(h)[..., self.word_ids]


class ReadoutHead(nn.Module):
    """The zero-shot readout of a sentence embedder: logits_k = scale * cos(h, e_k) + b_k.

    ``e_k`` is the frozen backbone's embedding of class k's description ("a positive review"),
    computed once without a prefix; only the K-number bias trains. So, as with LM-BFF's label
    words, the prefix does the learning, and a model whose prefix is reset is (up to the bias)
    the zero-shot classifier. The bias is an ``nn.Embedding`` row looked up per example, which
    Opacus gives per-example gradients natively (a bare parameter would need a custom sampler).
    """

    def __init__(self, prototypes: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float(), dim=-1), persistent=False)
        self.scale = float(scale)
        self.offset = nn.Embedding(1, prototypes.shape[0])
        nn.init.zeros_(self.offset.weight)

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the head (callers use ``model.head.weight.device``)."""
        return self.offset.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(h, dim=-1) @ self.prototypes.to(h.dtype).T
        # (B, 1) indices: Opacus' embedding grad sampler reads the first dimension as the batch
        bias = self.offset(torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device))[:, 0]
        return self.scale * cos + bias


@torch.no_grad()
def label_prototypes(backbone: nn.Module, tokenizer, texts: list[str], pooling: str) -> torch.Tensor:
    """Pooled embeddings (K, H) of the label descriptions by the frozen backbone, no prefix, eval mode."""
    was = backbone.training
    backbone.eval()
    try:
        t = tokenizer(texts, return_tensors="pt", padding=True)
        dev = next(backbone.parameters()).device
        kw = {k: t[k].to(dev) for k in ("input_ids", "attention_mask", "token_type_ids") if k in t}
        hidden = backbone(**kw).last_hidden_state
    finally:
        backbone.train(was)
    if pooling == "cls":
        return hidden[:, 0]
    w = kw["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def resolve_head(cfg: ModelConfig, task: str | None) -> ModelConfig:
    """``head="auto"`` made concrete: the readout head where the task has label descriptions (or
    ``label_description`` is given), else the linear head. Why readout first: under the readout
    the prefix does the learning, so the flattening levels act on the part that learns."""
    if cfg.head != "auto":
        return cfg
    from dataclasses import replace

    if decoders.is_decoder(cfg.backbone):  # a causal LM: the next token's logits of the label words
        return replace(cfg, head="prompt")

    from . import tokens as tokens_mod

    described = cfg.label_description is not None or (task is not None and tokens_mod.has_readout(task))
    return replace(cfg, head="readout" if described else "linear")


__all__ = ["LabelWordHead", "ReadoutHead", "label_prototypes", "resolve_head"]
