"""The black box and the prompt model: a frozen encoder queried forward only, z -> soft prompt -> logits.

See the package docstring (``dpflat/blackbox/__init__.py``) for the setting and the readout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, RunConfig
from ..evaluate import model_inputs, per_example_losses
from .. import tokens as tokens_mod
from ..models import load_backbone, load_tokenizer



# --------------------------------------------------------------------------- the black box
class BlackBox:
    """A frozen encoder behind a forward-only interface: losses/logits for (batch, prompt).

    ``queries`` counts the examples sent through the encoder (the API bill).
    """

    def __init__(self, backbone: nn.Module, label_texts: list[str], tokenizer, scale: float,
                 pooling: str = "mean", device: torch.device | str = "cpu", physical_batch_size: int = 64):
        self.model = backbone.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.pooling = pooling
        self.scale = float(scale)
        self.physical = int(physical_batch_size)
        self.queries = 0
        self.embed = self.model.get_input_embeddings()
        conf = self.model.config
        self.hidden = int(conf.hidden_size)
        self.max_positions = int(getattr(conf, "max_position_embeddings", 512))
        t = tokenizer(label_texts, return_tensors="pt", padding=True)
        batch = {k: t[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in t}
        self.prototypes = F.normalize(self.encode(batch, None), dim=-1)  # (K, H), no prompt: fixed readout
        self.queries = 0  # the readout is part of the box, not a query of the task data

    @property
    def word_embedding_std(self) -> float:
        return float(self.embed.weight.detach().float().std())

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], prompts: torch.Tensor | None) -> torch.Tensor:
        """Pooled embeddings; ``prompts`` (M, T, H) or (T, H) or None -> (M*B, H) / (B, H).

        With M prompts the batch is repeated M times (prompt-major): row m*B + i is
        example i under prompt m. The encoder runs in chunks of ``physical_batch_size``.
        """
        inp = model_inputs(batch, self.device)
        ids, am = inp["input_ids"], inp.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        tt = inp.get("token_type_ids")
        e = self.embed(ids)
        pool = am
        B = ids.shape[0]
        if prompts is not None:
            if prompts.dim() == 2:
                prompts = prompts.unsqueeze(0)
            M, T = prompts.shape[:2]
            if T + ids.shape[1] > self.max_positions:
                raise ConfigError(f"prompt ({T}) + max_length ({ids.shape[1]}) exceeds the backbone's "
                                  f"{self.max_positions} positions")
            P = prompts.to(e.dtype).to(self.device).repeat_interleave(B, dim=0)  # (M*B, T, H)
            rep = lambda x: x.repeat(M, *([1] * (x.dim() - 1)))  # noqa: E731
            e, am = rep(e), rep(am)
            e = torch.cat([e[:, :1], P, e[:, 1:]], dim=1)
            pool = torch.cat([am[:, :1], torch.zeros(M * B, T, dtype=am.dtype, device=am.device), am[:, 1:]], dim=1)
            am = torch.cat([am[:, :1], torch.ones(M * B, T, dtype=am.dtype, device=am.device), am[:, 1:]], dim=1)
            if tt is not None:
                tt = rep(tt)
                tt = torch.cat([tt[:, :1], torch.zeros(M * B, T, dtype=tt.dtype, device=tt.device), tt[:, 1:]], dim=1)
        out = []
        for i in range(0, e.shape[0], self.physical):
            kw: dict[str, Any] = {"inputs_embeds": e[i:i + self.physical], "attention_mask": am[i:i + self.physical]}
            if tt is not None:
                kw["token_type_ids"] = tt[i:i + self.physical]
            h = self.model(**kw).last_hidden_state
            m = pool[i:i + self.physical]  # the text's tokens: the prompt acts through attention only
            if self.pooling == "cls":
                out.append(h[:, 0])
            else:
                w = m.unsqueeze(-1).to(h.dtype)
                out.append((h * w).sum(1) / w.sum(1).clamp_min(1.0))
        self.queries += int(e.shape[0])
        return torch.cat(out) if out else torch.zeros(0, self.hidden)

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor], prompts: torch.Tensor | None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``scale * cos`` to each label description (+ ``bias``): (B, K), or (M, B, K) for M prompts."""
        emb = F.normalize(self.encode(batch, prompts), dim=-1)
        lg = self.scale * emb @ self.prototypes.T
        if prompts is not None and prompts.dim() == 3:
            lg = lg.view(prompts.shape[0], -1, lg.shape[-1])
        if bias is not None:
            lg = lg + (bias.to(lg.device).unsqueeze(-2) if lg.dim() == 3 else bias.to(lg.device))
        return lg

    @torch.no_grad()
    def losses(self, batch: dict[str, torch.Tensor], prompts: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example cross-entropy under each of M prompts (and biases (M, K)): (M, B)."""
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0)
            bias = None if bias is None else bias.reshape(1, -1)
        lg = self.logits(batch, prompts, bias)
        y = batch["labels"].to(lg.device)
        return F.cross_entropy(lg.flatten(0, 1).float(), y.repeat(lg.shape[0]), reduction="none").view(lg.shape[:2])


class Projection:
    """z (d,) -> prompt (T, H) = P0 + reshape(A z); A and P0 fixed by ``seed``.

    With ``n_bias = K`` the tuned vector has d + K coordinates: the last K are a
    per-class logit bias of the fixed readout (a K-number "head", tuned by the same
    zeroth-order steps; the zero-shot readout's decision threshold is rarely right).

    A's entries are N(0, (proj_scale * std_e)^2 / d), so a z with ||z||^2 = d moves each
    prompt coordinate by about proj_scale times the word embeddings' std (BBT's scaling).
    """

    def __init__(self, box: BlackBox, tokens: int, dim: int, proj_scale: float, seed: int, n_bias: int = 0):
        g = torch.Generator().manual_seed(int(seed) * 7919 + 13)
        vocab = box.embed.weight.shape[0]
        ids = torch.randint(min(1000, vocab // 2), vocab, (tokens,), generator=g)
        self.P0 = box.embed.weight.detach()[ids.to(box.embed.weight.device)].float().cpu().clone()
        std = box.word_embedding_std * proj_scale / math.sqrt(dim)
        self.A = torch.randn(tokens * box.hidden, dim, generator=g) * std
        self.tokens, self.prompt_dim, self.hidden, self.n_bias = tokens, dim, box.hidden, int(n_bias)
        self.dim = dim + self.n_bias  # the tuned vector's length

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(d [+ K],) -> (T, H); (M, d [+ K]) -> (M, T, H)."""
        flat = z[..., : self.prompt_dim].float() @ self.A.T
        return self.P0 + flat.view(*z.shape[:-1], self.tokens, self.hidden)

    def bias(self, z: torch.Tensor) -> torch.Tensor | None:
        """The readout bias part of z: (K,) / (M, K), or None without one."""
        return z[..., self.prompt_dim:].float() if self.n_bias else None

    def losses(self, box: BlackBox, batch: dict[str, torch.Tensor], zs: torch.Tensor) -> torch.Tensor:
        """Per-example losses at each of the M vectors ``zs`` (M, dim): (M, B), one query of M*B examples."""
        return box.losses(batch, self(zs), self.bias(zs))

# --------------------------------------------------------------------------- the model view
class PromptModel(nn.Module):
    """z as the only parameter; ``forward(**inputs)`` returns the black box's logits.

    What ``dpflat.evaluate`` and the ``landscape`` tools see: an ``nn.Module`` whose
    single trainable parameter is z. The encoder is *not* a submodule, so no tool can
    reach its weights; for gradients w.r.t. z use :func:`prompt_loss`, whose backward is
    a zeroth-order estimate (the black box is never differentiated).
    """

    def __init__(self, box: BlackBox, proj: Projection, z: torch.Tensor | None = None,
                 grad_directions: int = 16, grad_mu: float = 0.05, grad_seed: int = 0):
        super().__init__()
        self.__dict__["box"] = box  # plain attribute: keep the encoder out of parameters()/modules()
        self.proj = proj
        self.z = nn.Parameter(torch.zeros(proj.dim) if z is None else z.detach().clone().float())
        self.grad_directions, self.grad_mu, self.grad_seed = grad_directions, grad_mu, grad_seed
        self._calls = 0

    def prompt(self, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj((self.z if z is None else z).detach())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return self.box.logits({k: v for k, v in batch.items() if v is not None}, self.prompt(),
                               self.proj.bias(self.z.detach()))


# --------------------------------------------------------------------------- building
def readout_texts(cfg: RunConfig, card) -> list[str]:
    """The zero-shot readout's label descriptions (``tokens.READOUTS``; a bare label name otherwise)."""
    return tokens_mod.readout_texts(card, cfg.blackbox.readout_template, fallback="{}")


def build_prompt_model(cfg: RunConfig, card, tokenizer=None, device: torch.device | str = "cpu",
                       backbone: nn.Module | None = None) -> PromptModel:
    """The black box, its fixed projection (seeded by the run seed) and z = 0."""
    if not cfg.blackbox.active:
        raise ConfigError("build_prompt_model needs a black-box config (variant bb-*, or --blackbox)")
    tok = tokenizer or load_tokenizer(cfg.model)
    bb = cfg.blackbox
    backbone = backbone if backbone is not None else load_backbone(cfg.model, seed=cfg.train.seed)
    box = BlackBox(backbone, readout_texts(cfg, card), tok, bb.readout_scale, cfg.model.pooling, device,
                   cfg.train.physical_batch_size)
    if bb.prompt_tokens + cfg.data.max_length > box.max_positions:
        raise ConfigError(f"prompt_tokens ({bb.prompt_tokens}) + max_length ({cfg.data.max_length}) exceeds "
                          f"the backbone's {box.max_positions} positions")
    proj = Projection(box, bb.prompt_tokens, bb.prompt_dim, bb.proj_scale, cfg.train.seed,
                      n_bias=len(card.labels) if bb.readout_bias else 0)
    return PromptModel(box, proj, grad_mu=bb.zo_mu, grad_seed=cfg.train.seed)

def _accuracy(model: PromptModel, z: torch.Tensor, dataset, batch_size: int) -> float:
    with torch.no_grad():
        old = model.z.data.clone()
        model.z.data.copy_(z)
        try:
            r = per_example_losses(model, dataset, batch_size)
        finally:
            model.z.data.copy_(old)
    return float((r["pred"] == r["label"]).mean()) if len(r["loss"]) else float("nan")


def evaluate_prompt(model: PromptModel, dataset, batch_size: int = 256) -> dict[str, Any]:
    """Mean loss and accuracy of the black box at the model's z."""
    r = per_example_losses(model, dataset, batch_size)
    n = len(r["loss"])
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}
    return {"loss": float(r["loss"].mean()), "accuracy": float((r["pred"] == r["label"]).mean()), "n": n}


__all__ = ["BlackBox", "Projection", "PromptModel", "build_prompt_model", "evaluate_prompt",
           "readout_texts"]
