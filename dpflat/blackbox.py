"""Black-box DP-Flat: a soft prompt tuned from forward queries of a frozen model only.

The setting (Black-Box Tuning, Sun et al. 2022): the language model is an API that
returns outputs for inputs; no gradient, no weights. What we tune is a low-dimensional
vector z in R^d, mapped by a *fixed random* projection A to the embeddings of a soft
prompt, ``prompt = P0 + reshape(A z)`` (P0: embeddings of random vocabulary tokens,
as BBT initialises its prompt), prepended after the first ([CLS] / <s>) token. Every
call of the frozen encoder happens under ``torch.no_grad()`` (``BlackBox.encode``),
and its parameters never require grad.

The readout is fixed and queried forward too: logits are ``s * cos(e(x; z), e(t_k))``
where ``e`` is the encoder's pooled sentence embedding and ``t_k`` a label description
("a negative review", "a positive review"). Why this readout: the default backbone
(all-MiniLM-L6-v2) is a sentence embedder without an MLM head, so BBT's verbaliser
words are not available; embedding-similarity to label descriptions is the zero-shot
classifier such an embedding API offers (0.70 on SST-2 dev without any prompt), it
needs no data (so it costs no privacy), and it leaves z as the only tuned variable.

Zeroth-order gradient (SPSA): for a direction u ~ N(0, I_d) and each example i,
``delta_i = (l_i(z + mu u) - l_i(z - mu u)) / (2 mu)``; the estimate is
``mean_i(delta_i) * u``. With k directions per step the per-example vector
``(delta_i1..delta_ik)`` is formed from the same forward queries.

DP (DPZero, Zhang et al. 2023): each example's vector of k finite differences is
clipped to L2 norm C (for k = 1: to [-C, C]), summed over a Poisson-sampled batch
(rate q), and Gaussian noise N(0, sigma^2 C^2 I_k) is added; the sum is divided by
the expected batch size q N. Adding or removing one example changes the sum by at
most C in L2, so one step is the Gaussian mechanism with sensitivity C on a Poisson
subsample: exactly the sampled Gaussian mechanism of DP-SGD, only k-dimensional
instead of p-dimensional. The same accountant therefore applies unchanged: sigma is
found by ``privacy.noise_for_target`` for (target ε, δ, q, steps) and ε is tracked
by an Opacus accountant of the configured kind. The directions u are drawn from a
seed independent of the data, and everything after the noisy sum (the multiplication
by u, the optimiser, the distillation pull) is post-processing.

Cross-model flattening: the update adds the gradient of ``λ ||z - z_teacher||`` (or
its square). That term is a known function of z and of the teacher prompt, computed
exactly without any query on private data, so it costs no privacy by itself; whether
the *run* is DP depends on where the teacher came from: tuned (non-privately, by the
same SPSA loop) on the public split in safe mode -> DP; on the private split in paper
mode -> an unaccounted read -> "not DP (paper mode)".

The ledger and the run folder work as in the white-box path: every read of the
private split goes through ``PrivateSplit``, the ledger's mechanism is recorded as
"dpzero" (one of ``privacy.SAMPLED_GAUSSIAN``: the ledger and the cross-check
accountants treat it as DP-SGD's mechanism), and a non-DP run claims no ε.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig
from .evaluate import evaluate_test, model_inputs, per_example_losses
from .models import load_backbone, load_tokenizer
from .privacy import (MechanismRNG, DPSetup, PrivacyLedger, PrivateSplit, fill_ledger, fill_release, noise_for_target,
                      spent_epsilon)
from .runs import RunDir, check_before_work, finish_run

TRAIN_WHO = "train/dpzero"
TRAIN_HOW = "per-example clipped zeroth-order differences (SPSA) + Gaussian noise (DPZero)"
NONPRIVATE_WHO = "train/non-private-zo"
NONPRIVATE_HOW = "plain zeroth-order differences (no DP)"
PAPER_WHO = "bb-distill/paper-teacher"
PAPER_HOW = "non-private teacher prompt tuned on the private split"
#: label descriptions per task for the zero-shot readout ("{}" = the card's label name)
TEMPLATES = {"sst2": "a {} review", "mpqa": "a {} opinion", "disaster": "a {} tweet"}


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


# --------------------------------------------------------------------------- building
def readout_texts(cfg: RunConfig, card) -> list[str]:
    template = cfg.blackbox.readout_template or TEMPLATES.get(card.name, "{}")
    return [template.format(n.replace("_", " ")) for n in card.label_names]


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


# --------------------------------------------------------------------------- the optimiser core
@dataclass
class ZOState:
    """z, the optimiser and where the loop is; everything a checkpoint holds besides the ledger."""

    z: torch.Tensor
    opt: torch.optim.Optimizer
    param: nn.Parameter


def _make_opt(z: torch.Tensor, kind: str, lr: float) -> ZOState:
    p = nn.Parameter(z.detach().clone().float())
    opt = torch.optim.Adam([p], lr=lr) if kind == "adam" else torch.optim.SGD([p], lr=lr, momentum=0.9)
    return ZOState(p.data, opt, p)


def _poisson(n: int, q: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) < q).nonzero().flatten()


def _take(dataset, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = dataset[idx.tolist()]
    return {k: v for k, v in rows.items() if isinstance(v, torch.Tensor)}


def zo_step(model: PromptModel, state: ZOState, batch: dict[str, torch.Tensor] | None, step_seed: int,
            k: int, mu: float, *, dp: tuple[float, float, float] | None = None,
            pull: Callable[[torch.Tensor], torch.Tensor] | None = None,
            noise_generator: torch.Generator | None = None) -> dict[str, float]:
    """One SPSA / DPZero update of z in place; ``dp = (clip, sigma, expected_batch)``.

    ``noise_generator``: the DP noise's secret generator (``privacy.MechanismRNG``); the
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
    kind = "sgd" if optimizer == "cma" else optimizer
    state = _make_opt(torch.zeros(model.proj.dim) if z0 is None else z0, kind, lr)
    n = len(dataset)
    g = torch.Generator().manual_seed(int(seed))
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            batch = _take(dataset, perm[i:i + batch_size])
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
        batch = _take(dataset, idx)
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


# --------------------------------------------------------------------------- teachers
def _teacher_key(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    d.pop("privacy"), d.pop("variant")
    d["train"] = {k: v for k, v in d["train"].items()
                  if k not in ("output_dir", "run_name", "progress", "device", "num_threads", "eval_every",
                               "checkpoint_every", "eval_batch_size")}
    d["flat"] = {k: d["flat"][k] for k in ("distill_mode", "teacher_epochs")}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def teacher_prompt(cfg: RunConfig, model: PromptModel, public, private: PrivateSplit, eval_ds) -> tuple[torch.Tensor, dict]:
    """The teacher z_t: non-private SPSA on the public (safe) or private (paper) split.

    Cached under ``<output_dir>/.bb-teachers/`` (it does not depend on ε), so a sweep
    tunes one teacher per seed and mode. A paper-mode teacher read the private split
    whether it was tuned now or loaded: the read is recorded in this run's ledger
    either way (with the counts of the original tuning).
    """
    fc, tc, bb = cfg.flat, cfg.train, cfg.blackbox
    paper = fc.distill_mode == "paper"
    if paper:
        data = private.read(PAPER_WHO, PAPER_HOW, accounted=False)
    else:
        data = public
        if data is None or len(data) == 0:
            raise ConfigError("black-box distillation in safe mode tunes its teacher on the public split: "
                              "set --public-size > 0")
    cache = Path(tc.output_dir) / ".bb-teachers" / f"{_teacher_key(cfg)}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if paper:
            for _ in range(saved["batches"]):
                private.count(PAPER_WHO, PAPER_HOW, False, 0)
            r = next(r for r in private.ledger.reads if r.who == PAPER_WHO)
            r.examples += saved["examples"]
        return saved["z"], {**saved["info"], "teacher_cached": True}
    steps = max(1, int(round(fc.teacher_epochs * max(1, -(-len(data) // tc.batch_size)))))
    counts = {"batches": 0, "examples": 0}

    def count(nb: int) -> None:
        counts["batches"] += 1
        counts["examples"] += nb
        if paper:
            private.count(PAPER_WHO, PAPER_HOW, False, nb)

    z = fit_prompt(model, data, steps=steps, batch_size=min(tc.batch_size, len(data)), lr=bb.zo_lr, mu=bb.zo_mu,
                   k=bb.zo_directions, optimizer=bb.zo_optimizer, seed=tc.seed + 17, on_batch=count)
    acc = _accuracy(model, z, eval_ds, tc.eval_batch_size)
    info = {"teacher_accuracy": acc, "teacher_steps": steps,
            "teacher_data": "public split" if not paper else "private split (not DP)"}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"z": z, "info": info, **counts}, tmp)
    tmp.replace(cache)
    return z, {**info, "teacher_cached": False}


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


# --------------------------------------------------------------------------- the run
def train(cfg: RunConfig, *, resume: bool = True, max_steps: int | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None, noise_seed: int | None = None,
          secure_rng: bool = False) -> dict[str, Any]:
    """Tune one black-box run into its folder and return its result row (as ``dpflat.train.train``).

    A finished run is returned as is; an unfinished one resumes from its last
    checkpoint (z, optimiser, accountant, ledger, teacher), so it ends at the same ε.
    """
    if not cfg.blackbox.active:
        raise ConfigError("dpflat.blackbox.train needs a black-box config (variant bb-*, or --blackbox)")
    check_before_work(cfg, max_steps)  # device and max_steps, before any folder or data
    rd = RunDir.for_config(cfg)
    res = rd.finished_result(cfg) if resume else None  # a different config in the folder is refused
    if res is not None:
        return res
    made = rd.create(cfg)
    with rd.removed_on_failure(made), rd.lock():  # no config-only folder left by a failure
        return _train(cfg, rd, resume, max_steps, on_step, noise_seed, secure_rng)


def _train(cfg: RunConfig, rd: RunDir, resume: bool, max_steps: int | None,
           on_step: Callable[[dict[str, Any]], None] | None, noise_seed: int | None = None,
           secure_rng: bool = False) -> dict[str, Any]:
    from .train import LOSS_KEY, check_finite, prepare_data, split_overlap, start_run

    device = start_run(cfg)
    bb, tc, pc = cfg.blackbox, cfg.train, cfg.privacy
    tokenizer = load_tokenizer(cfg.model)
    card, _splits, tokd = prepare_data(cfg, tokenizer)
    n = len(tokd["private"])
    B = tc.batch_size
    if B > n:
        raise ConfigError(f"batch_size {B} is larger than the private training split ({n} examples)")
    ledger = PrivacyLedger()
    ledger.split_overlap = split_overlap(_splits)
    private = PrivateSplit(tokd["private"], ledger)
    model = build_prompt_model(cfg, card, tokenizer, device)
    accounted = pc.enabled
    who, how = (TRAIN_WHO, TRAIN_HOW) if accounted else (NONPRIVATE_WHO, NONPRIVATE_HOW)
    if bb.zo_optimizer == "cma":
        how = "CMA-ES on raw private mini-batch losses (no DP)"
    train_ds = private.read(who, how, accounted=accounted)
    q = B / n
    steps_per_epoch = max(1, -(-n // B))
    total_steps = max(1, int(round(tc.epochs * steps_per_epoch)))
    dp = None
    if accounted:
        from opacus.accountants import create_accountant

        delta = pc.resolve_delta(n)
        sigma = noise_for_target(pc, q, total_steps, delta)
        # the secret Poisson sampling and DPZero noise (CPU: both are drawn there)
        rng = MechanismRNG.create(noise_seed, secure_rng, "cpu")
        dp = DPSetup(None, None, None, SimpleNamespace(accountant=create_accountant(pc.accountant)), sigma, q, delta,
                     rng=rng)

    ckpt = rd.latest_checkpoint() if resume else None
    best_file = rd.path / "best.safetensors"
    best_z: torch.Tensor | None = None  # the selected z so far (private state, saved with checkpoints)
    if ckpt is not None and ckpt[1].get("best_params") is not None:
        best_z = ckpt[1]["best_params"]["z"]
    info: dict[str, Any] = {"readout": readout_texts(cfg, card), "prompt_dim": bb.prompt_dim,
                            "prompt_tokens": bb.prompt_tokens}
    teacher: torch.Tensor | None = None
    if cfg.flat.distill and ckpt is None:
        teacher, tinfo = teacher_prompt(cfg, model, tokd["public"], private, tokd["val"])
        info.update(tinfo)
    state = _make_opt(torch.zeros(model.proj.dim), "sgd" if bb.zo_optimizer == "cma" else bb.zo_optimizer, bb.zo_lr)
    step, best = 0, {"accuracy": -1.0, "step": 0}
    if ckpt is not None:
        trainable, st = ckpt
        state.param.data.copy_(trainable["z"])
        state.opt.load_state_dict(st["optimizer"])
        if dp:
            dp.engine.accountant.load_state_dict(st["accountant"])
            if st.get("mechanism_rng") is not None:  # replay: the same batches and noise as before the crash
                dp.rng.load_state_dict(st["mechanism_rng"])
            elif dp.rng.source == "secure":
                dp.rng.load_state_dict({"source": "secure"})  # refuses: nothing to replay from
        step, best = st["step"], st["best"]
        restored = PrivacyLedger.from_dict(st["ledger"])
        ledger.reads, ledger.batch_sizes = restored.reads, restored.batch_sizes
        if st.get("best_params") is not None:  # best.safetensors as of this checkpoint
            rd.save_tensors(best_file, st["best_params"])
        else:
            best_file.unlink(missing_ok=True)
        teacher = st.get("teacher")
        info.update(st.get("info", {}))
        rd.truncate_metrics(step)
    last_eval: dict[str, Any] = {}

    def checkpoint() -> None:
        st = {"step": step, "optimizer": state.opt.state_dict(), "best": best, "ledger": ledger.to_dict(),
              "accountant": dp.engine.accountant.state_dict() if dp else None, "teacher": teacher, "info": info,
              "best_params": None if best_z is None else {"z": best_z},
              # secret: the generators' states (never the seed)
              "mechanism_rng": dp.rng.state_dict() if dp and dp.rng.source != "secure" else None}
        rd.save_checkpoint(step, {"z": state.param.data}, st)

    def run_eval() -> dict[str, Any]:
        nonlocal best, best_z
        model.z.data.copy_(state.param.data)
        r = evaluate_prompt(model, tokd["val"], tc.eval_batch_size)  # selection reads val only
        last_eval.update(r, step=step)
        if r["accuracy"] > best["accuracy"]:
            best = {"accuracy": r["accuracy"], "step": step}
            best_z = state.param.data.detach().clone()
            rd.save_tensors(best_file, {"z": best_z})
        return r

    if bb.zo_optimizer == "cma":
        return _train_cma(cfg, rd, model, private, train_ds, tokd, card, ledger, info, total_steps, best_file,
                          run_eval, on_step)

    pull = None
    if teacher is not None and bb.prompt_lambda > 0:
        t = teacher.clone()
        pull = lambda z: distill_grad(z, t, bb.prompt_lambda, cfg.flat.distill_squared)  # noqa: E731
    eval_every = tc.eval_every or steps_per_epoch
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=total_steps, initial=step, desc=rd.path.name, disable=not tc.progress, leave=False)
    t0, seen, q0 = time.time(), 0, model.box.queries
    try:
        while step < stop_at:
            if dp:  # secret, and continued (not reseeded) across steps; its state is checkpointed
                idx = _poisson(n, q, dp.rng.sampler)
            else:  # non-private: public, resumable shuffle
                g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
                idx = torch.randperm(n, generator=g)[:B]
            batch = _take(train_ds, idx) if len(idx) else None
            out = zo_step(model, state, batch, tc.seed * 1_000_003 + step + 500_009, bb.zo_directions, bb.zo_mu,
                          dp=(pc.max_grad_norm, dp.sigma, q * n) if dp else None, pull=pull,
                          noise_generator=dp.rng.noise if dp else None)
            if dp:
                dp.engine.accountant.step(noise_multiplier=dp.sigma, sample_rate=q)
                ledger.record_batch(out["batch"])
            private.count(who, how, accounted, out["batch"])
            seen += out["batch"]
            step += 1
            if out["batch"]:
                check_finite(out["loss"], step)
            bar.update(1)
            row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch, LOSS_KEY: out["loss"],
                                   "z_norm": float(state.param.data.norm())}
            if dp:
                row["clipped_fraction"] = out["clipped"]
            milestone = step % eval_every == 0 or step == total_steps
            if milestone:
                row.update({f"eval_{k}": v for k, v in run_eval().items()})
            if dp and (milestone or step % tc.checkpoint_every == 0):
                row["epsilon" if not ledger.unaccounted else "dpsgd_part_epsilon"] = spent_epsilon(
                    dp.engine.accountant, dp.delta)
            row["examples_per_s"] = seen / max(time.time() - t0, 1e-9)
            row["queries"] = model.box.queries - q0
            rd.log(row)
            bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in (LOSS_KEY, "eval_accuracy", "epsilon")
                             and isinstance(v, float) and math.isfinite(v)})
            if on_step:
                on_step(row)
            if step % tc.checkpoint_every == 0 or step == total_steps:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        raise
    bar.close()
    info["queries"] = info.get("queries", 0) + model.box.queries - q0
    if step < total_steps:
        fill_ledger(ledger, pc, dp, step, mechanism="dpzero")
        return {"run_id": rd.path.name, "finished": False, "step": step, "run_dir": str(rd.path)}
    known = dict(last_eval) if last_eval.get("step") == step == best["step"] else None  # z_last is selected
    return _finish(cfg, rd, model, state.param.data, tokd, card, ledger, dp, best, best_file, step, info, known)


def _train_cma(cfg: RunConfig, rd: RunDir, model: PromptModel, private: PrivateSplit, train_ds, tokd, card,
               ledger: PrivacyLedger, info: dict, total_steps: int, best_file: Path, run_eval, on_step) -> dict:
    """Non-private CMA-ES baseline with the same query budget as SPSA (2 k B per step)."""
    bb, tc = cfg.blackbox, cfg.train
    budget = 2 * bb.zo_directions * tc.batch_size * total_steps
    who, how = NONPRIVATE_WHO, "CMA-ES on raw private mini-batch losses (no DP)"
    z, gens = fit_prompt_cma(model, train_ds, evaluations=budget, batch_size=tc.batch_size, sigma0=bb.zo_mu,
                             seed=tc.seed, on_batch=lambda nb: private.count(who, how, False, nb),
                             on_generation=lambda g, l: rd.log({"step": g, "train_loss_private": l}))
    info["cma_generations"] = gens
    info["queries"] = model.box.queries
    return _finish(cfg, rd, model, z, tokd, card, ledger, None, {"accuracy": -1.0, "step": gens}, best_file,
                   gens, info)


def _finish(cfg: RunConfig, rd: RunDir, model: PromptModel, z_last: torch.Tensor, tokd, card, ledger, dp, best,
            best_file: Path, step: int, info: dict, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """Select the best-on-val z (as the white-box loop does), read the test split once, write model,
    ledger, result, row."""
    from safetensors.torch import load_file

    rd.save_tensors(rd.path / "last.safetensors", {"z": z_last})
    z = load_file(str(best_file))["z"] if best_file.exists() else z_last
    model.z.data.copy_(z)
    rd.save_tensors(rd.model_file, {"z": model.z.data})
    # ``known``: the validation of this same z at the last step (the black box is deterministic)
    val = known if known is not None else evaluate_prompt(model, tokd["val"], cfg.train.eval_batch_size)
    final, per_example = evaluate_test(model, tokd["eval"], cfg.train.eval_batch_size)  # the test split, once
    fill_ledger(ledger, cfg.privacy, dp, step, mechanism="dpzero")
    fill_release(ledger)
    rd.write_json(rd.ledger_file, ledger.to_dict())
    return finish_run(cfg, rd, card.metric, ledger, final, best["step"], step, "", info, val=val,
                      test_examples=per_example)


# --------------------------------------------------------------------------- a finished run
@dataclass
class LoadedPromptRun:
    """A finished black-box run rebuilt: the prompt model at its selected z, and its data."""

    run_dir: Path
    cfg: RunConfig
    model: PromptModel
    card: Any
    data: dict[str, Any]
    result: dict[str, Any]


def load_prompt_run(run_dir: str | Path, device: str = "cpu") -> LoadedPromptRun:
    """Rebuild a finished black-box run (A and P0 are regenerated from the run seed)."""
    from .train import prepare_data

    rd = RunDir(run_dir)
    if not rd.config_file.exists():
        raise FileNotFoundError(f"{rd.path} is not a run folder (no config.json)")
    if not rd.done or not rd.model_file.exists():
        raise ConfigError(f"{rd.path} is not finished: train it first (the same train command resumes it)")
    cfg = rd.config()
    if not cfg.blackbox.active:
        raise ConfigError(f"{rd.path} is a white-box run: use dpflat.analysis.load_run")
    card, _splits, tokd = prepare_data(cfg)
    model = build_prompt_model(cfg, card, device=device)
    model.z.data.copy_(rd.load_model_state()["z"])
    return LoadedPromptRun(rd.path, cfg, model, card, tokd, rd.result())


def prompt_batches(dataset, n_examples: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """A fixed list of batches of the first ``n_examples`` of ``dataset`` (the landscape's data)."""
    n = min(int(n_examples), len(dataset))
    return [_take(dataset, torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def prompt_sharpness(run: LoadedPromptRun | str | Path, *, n_examples: int = 128, rho: float = 1.0,
                     sam_steps: int = 1, n_random: int = 4, grid: int = 0, span: float = 2.0,
                     grad_directions: int = 16, seed: int = 0) -> dict[str, Any]:
    """Sharpness of a black-box run in prompt space, by the ``landscape`` tools.

    Data: the run's eval split (first ``n_examples``), as ``dpflat.analysis`` does for
    white-box runs, so the numbers cost no privacy. ``rho`` is an absolute radius in z
    (z has ``prompt_dim`` coordinates of order 1). Returns SAM sharpness (ascent along
    the SPSA gradient estimate of ``grad_directions`` directions), the random-direction
    indicator (losses only), and with ``grid > 1`` a 2D surface over two random unit
    directions spanning ``[-span, span]``.
    """
    import landscape as ls

    lr_ = run if isinstance(run, LoadedPromptRun) else load_prompt_run(run)
    m = lr_.model
    m.grad_directions, m.grad_seed = grad_directions, seed
    bl = prompt_batches(lr_.data["eval"], n_examples)
    sam = ls.sam_sharpness(m, prompt_loss, bl, rho=rho, steps=sam_steps, seed=seed)
    ind = ls.prefix_indicator(m, prompt_loss, bl, rho=rho, n_random=n_random, use_gradient=False, seed=seed)
    out: dict[str, Any] = {"run_id": lr_.run_dir.name, "variant": lr_.result.get("variant"),
                           "target_epsilon": lr_.result.get("target_epsilon"), "epsilon": lr_.result.get("epsilon"),
                           "guarantee": lr_.result.get("guarantee"), "accuracy": lr_.result.get("accuracy"),
                           "prompt_sam_sharpness": sam.value, "prompt_indicator": ind.value,
                           "prompt_loss": sam.base_loss, "z_norm": float(m.z.detach().norm()), "rho": rho,
                           "n_examples": sum(len(b["labels"]) for b in bl)}
    if grid > 1:
        d1 = ls.random_direction(m, seed=seed, norm="unit", ignore_1d=False)
        d2 = ls.random_direction(m, seed=seed + 1, norm="unit", ignore_1d=False)
        xs = np.linspace(-span, span, grid)
        out["surface"] = ls.loss_surface_2d(m, prompt_loss, bl, d1, d2, xs=xs, progress=False,
                                            label=str(lr_.result.get("variant")))
    return out


__all__ = [
    "BlackBox",
    "LoadedPromptRun",
    "Projection",
    "PromptModel",
    "build_prompt_model",
    "clip_rows",
    "distill_grad",
    "dpzero_coefficients",
    "evaluate_prompt",
    "finite_differences",
    "fit_prompt",
    "fit_prompt_cma",
    "load_prompt_run",
    "prompt_batches",
    "prompt_loss",
    "prompt_sharpness",
    "teacher_prompt",
    "train",
    "zo_step",
]
