"""Tiny in-memory models and a dense-Hessian reference for the landscape tests."""

from __future__ import annotations

import sys
from pathlib import Path

# An editable install made while landscape/ had no __init__.py maps it as a namespace
# package (the package's __init__ is then skipped); `pip install -e . --no-deps` fixes
# the environment; until then, put the repository root first and drop a stale namespace.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
if "landscape" in sys.modules and getattr(sys.modules["landscape"], "__file__", None) is None:
    for _k in [k for k in sys.modules if k == "landscape" or k.startswith("landscape.")]:
        del sys.modules[_k]

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from landscape import ParamSet  # noqa: E402
from landscape._params import eval_mode  # noqa: E402
from landscape._params import batch_weights  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread. With two OpenMP threads on a busy 2-core machine each
    small op waits on a barrier (we measured 6 ms vs 300+ ms per tiny-BERT HVP)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Quadratic(nn.Module):
    """L(theta) = 0.5 theta^T A theta + b^T theta: a known Hessian A and gradient A theta + b."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor | None = None, theta0: torch.Tensor | None = None):
        super().__init__()
        n = A.shape[0]
        self.register_buffer("A", A)
        self.register_buffer("b", torch.zeros(n, dtype=A.dtype) if b is None else b)
        self.theta = nn.Parameter(torch.zeros(n, dtype=A.dtype) if theta0 is None else theta0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.theta
        return 0.5 * t @ self.A @ t + self.b @ t + 0.0 * x.sum()


def quad_loss(m, b):
    return m(b[0])


def quad_batches(k: int = 2):
    return [(torch.zeros(3, 1, dtype=torch.float64),) for _ in range(k)]


def mlp(seed: int = 0, dtype=torch.float64, din: int = 4, hidden: int = 5, dout: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, hidden), nn.Tanh(), nn.Linear(hidden, dout)).to(dtype)


def mlp_batches(seed: int = 0, sizes=(6, 4), dtype=torch.float64, din: int = 4, dout: int = 3):
    g = torch.Generator().manual_seed(seed + 100)
    return [(torch.randn(s, din, generator=g, dtype=dtype), torch.randint(0, dout, (s,), generator=g)) for s in sizes]


def mlp_loss(m, b):
    x, y = b
    return F.cross_entropy(m(x), y)


class TinyBert(nn.Module):
    """Random 2-layer eager BERT + linear head; HF-style dict batches with labels."""

    def __init__(self, seed: int = 0, dropout: float = 0.1):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        cfg = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100,
            max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            attn_implementation="eager",
        )
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return self.head(h[:, 0])


TRAINABLE = ("head.weight", "head.bias", "bert.encoder.layer.1.attention.self.query.bias", "bert.encoder.layer.0.output.LayerNorm.weight")


def tiny_bert(seed: int = 0, dtype=torch.float64, dropout: float = 0.1) -> TinyBert:
    m = TinyBert(seed, dropout).to(dtype)
    for n, p in m.named_parameters():
        p.requires_grad_(n in TRAINABLE)
    return m


def bert_batches(seed: int = 0, sizes=(3, 2), lens=(7, 5)):
    g = torch.Generator().manual_seed(seed + 7)
    out = []
    for s, L in zip(sizes, lens):
        ids = torch.randint(1, 100, (s, L), generator=g)
        am = torch.ones(s, L, dtype=torch.long)
        am[0, -2:] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": am, "labels": torch.randint(0, 2, (s,), generator=g)})
    return out


def bert_loss(m, b):
    return F.cross_entropy(m(**{k: v for k, v in b.items() if k != "labels"}), b["labels"])


def dense_hessian(model: nn.Module, loss_fn, batches, params=None) -> torch.Tensor:
    """Reference: torch.autograd.functional.hessian of the example-weighted loss, eval mode."""
    ps = ParamSet.from_model(model, params)
    ws = batch_weights(batches)
    theta0 = ps.get_flat()

    def f(flat):
        pd = dict(zip(ps.names, ps.unflatten(flat)))
        tot = 0.0
        for w, b in zip(ws, batches):
            tot = tot + w * loss_fn(_Bound(model, pd), b)
        return tot

    with eval_mode(model):
        H = torch.autograd.functional.hessian(f, theta0)
    return H


class _Bound:
    def __init__(self, model, pd):
        self.model, self.pd = model, pd

    def __call__(self, *a, **k):
        return torch.func.functional_call(self.model, self.pd, a, k)
