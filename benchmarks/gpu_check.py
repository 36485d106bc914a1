"""One-shot check for a machine with a GPU: step time, peak memory, Hessian, surface.

Built for one H200 with its preinstalled torch (~2.11, CUDA 13) plus carried wheels
(opacus, dp-accounting, pyhessian, datasets, transformers): nothing is downloaded and
no weights are needed -- the backbone is a *randomly initialised* roberta-base-sized
encoder (12 layers, hidden 768, 12 heads; the cost of a forward does not depend on
the weights' values), wrapped in dpflat's prefix model (m=16) + head. Inputs are
random token ids. It measures, in bf16 autocast on CUDA (fp32 on CPU):

* step time: non-private prefix tuning vs DP-SGD (Opacus hooks, fixed batch, noise
  multiplier 1) vs DP-Flat (the DP step + safe AWP perturb/restore along the previous
  noisy gradient + the per-example distillation term inside clipping, as
  dpflat.train composes them); medians after warm-up; peak GPU memory per variant;
* Hessian top eigenvalue of the prefix + head (fp32, eager attention): landscape
  Lanczos (cached gradient graphs) vs PyHessian 0.1, values and times;
* 2D loss surface: ms per grid point (one no-grad pass per point).

It prints a markdown table for benchmarks/RESULTS.md (and appends it with --append).
Sized to finish well within 8 minutes on one H200. ``--device cpu --tiny`` is a dry
run with a tiny encoder (seconds; the tests run it), which checks the script, not
the hardware.

    python benchmarks/gpu_check.py                     # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="dry run: a tiny random encoder, a few steps")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 64; tiny 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 128; tiny 12)")
    p.add_argument("--prefix-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--hessian-batches", type=int, default=None, help="batches of 16 for the Hessian (default 4; tiny 1)")
    p.add_argument("--grid", type=int, default=None, help="surface points per axis (default 11; tiny 2)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-pyhessian", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny default: 1)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    t = a.tiny
    a.batch_size = a.batch_size or (4 if t else 64)
    a.seq_len = a.seq_len or (12 if t else 128)
    a.steps = a.steps or (2 if t else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if t else 3)
    a.hessian_batches = a.hessian_batches or (1 if t else 4)
    a.grid = a.grid or (2 if t else 11)
    if a.prefix_len < 1 or a.batch_size < 1 or a.seq_len < 2 or a.steps < 1:
        p.error("sizes must be positive (seq-len >= 2)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU (use --device cpu --tiny for a dry run)")
    if a.threads or a.tiny:
        torch.set_num_threads(a.threads or 1)
    a.precision = ("bf16" if a.device.startswith("cuda") else "fp32") if a.precision == "auto" else a.precision
    return a


def build(a, attn: str):
    """dpflat's prefix model around a random roberta-base-sized (or tiny) encoder."""
    from transformers import AutoModel, RobertaConfig

    from dpflat.config import ModelConfig
    from dpflat.models import PrefixModel, register_attention, tiny_config

    register_attention()
    conf = tiny_config("tiny-roberta") if a.tiny else RobertaConfig(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    conf._attn_implementation = f"dpflat_{attn}"
    torch.manual_seed(0)
    backbone = AutoModel.from_config(conf, attn_implementation=f"dpflat_{attn}")
    cfg = ModelConfig(backbone="tiny-roberta", prefix_len=a.prefix_len, prefix_init="random", attn=attn)
    return PrefixModel(backbone, 2, cfg).to(a.device), conf


def batch(a, conf, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, conf.vocab_size, (n, a.seq_len), generator=g)
    lens = torch.randint(max(2, a.seq_len // 4), a.seq_len + 1, (n,), generator=g)
    am = (torch.arange(a.seq_len).unsqueeze(0) < lens.unsqueeze(1)).long()
    ids = torch.where(am.bool(), ids, torch.full_like(ids, conf.pad_token_id))
    return {"input_ids": ids.to(a.device), "attention_mask": am.to(a.device),
            "labels": torch.randint(0, 2, (n,), generator=g).to(a.device)}


def sync(a) -> None:
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(a):
    import contextlib

    if a.precision == "bf16":
        return torch.autocast(device_type=torch.device(a.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_reset(a) -> None:
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_mb(a) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if a.device.startswith("cuda") else None


def time_steps(a, step) -> list[float]:
    for _ in range(a.warmup):
        step()
    sync(a)
    out = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        sync(a)
        out.append(time.perf_counter() - t)
    return out


def train_steps(a, conf) -> dict:
    """Median step times and peak memory: non-private, DP (Opacus hooks), DP-Flat (DP + AWP + distill)."""
    import warnings

    from opacus import PrivacyEngine

    from dpflat.flat.distill import distill_term

    warnings.filterwarnings("ignore")
    b = batch(a, conf, a.batch_size, seed=1)
    x = {k: v for k, v in b.items() if k != "labels"}
    res = {}

    # non-private
    model, _ = build(a, "sdpa")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def np_step():
        with autocast(a):
            logits = model(**x)
        loss = F.cross_entropy(logits.float(), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peak_reset(a)
    res["non-private"] = {"steps_s": time_steps(a, np_step), "peak_mb": peak_mb(a)}
    del model, opt

    def dp_variant(flat: bool):
        model, _ = build(a, "sdpa")
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ds = torch.utils.data.TensorDataset(torch.zeros(a.batch_size * 4, 1))
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size)
        gm, opt, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0,
                                                 max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
        w = model.prefix.embedding.weight
        teacher = torch.randn_like(w).reshape(1, -1)[:, : w.numel()].reshape(-1) * 0.01
        prev = {"g": None}

        def step():
            v = None
            if flat and prev["g"] is not None:  # safe AWP: perturb along the previous noisy gradient, then restore
                v = 0.01 * w.detach().norm() * prev["g"] / prev["g"].norm().clamp_min(1e-30)
                w.data.add_(v)
            with autocast(a):
                out = gm(**x, return_prefix=flat)
            logits, pout = (out if flat else (out, None))
            per_ex = F.cross_entropy(logits.float(), b["labels"], reduction="none")
            if flat:
                per_ex = per_ex + distill_term(pout.float(), teacher.view(pout.shape[1:]), None, 0.01, False)
            opt.zero_grad(set_to_none=True)
            per_ex.mean().backward()
            if v is not None:
                w.data.sub_(v)
            opt.step()
            if flat:
                prev["g"] = w.grad.detach().clone() if w.grad is not None else None

        peak_reset(a)
        out = {"steps_s": time_steps(a, step), "peak_mb": peak_mb(a)}
        del gm, opt, model
        return out

    res["DP-SGD (Opacus hooks)"] = dp_variant(False)
    res["DP-Flat (DP + safe AWP + distill)"] = dp_variant(True)
    return res


def hessian_and_surface(a, conf) -> dict:
    from landscape import HessianOperator, lanczos, loss_surface_2d, random_direction

    model, _ = build(a, "eager")
    model.eval()
    hb = [batch(a, conf, 16 if not a.tiny else 4, seed=10 + i) for i in range(a.hessian_batches)]

    def loss_fn(m, bb):
        return F.cross_entropy(m(**{k: v for k, v in bb.items() if k != "labels"}), bb["labels"])

    out: dict = {}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["n_params"] = n_params
    sync(a)
    t = time.perf_counter()
    op = HessianOperator(model, loss_fn, hb)
    r = lanczos(op, k=1, max_iter=100, tol=1e-3, which="LM", criterion="change", seed=0)
    sync(a)
    out["ours"] = {"value": float(r.eigenvalues[0]), "s": time.perf_counter() - t, "hvps": r.convergence.n_matvecs}
    op.clear()
    if not a.no_pyhessian:
        try:
            from landscape.pyhessian_bridge import pyhessian_eigenvalues

            t = time.perf_counter()
            ph = pyhessian_eigenvalues(model, loss_fn, hb, top_n=1, max_iter=100, tol=1e-3, seed=0)
            sync(a)
            out["pyhessian"] = {"value": float(ph.eigenvalues[0]), "s": time.perf_counter() - t,
                                "hvps": ph.convergence.n_matvecs}
        except ImportError as e:
            out["pyhessian"] = {"error": f"not installed ({e})"}
    import numpy as np

    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    xs = np.linspace(-1, 1, a.grid)
    sync(a)
    t = time.perf_counter()
    s = loss_surface_2d(model, loss_fn, hb, d1, d2, xs, progress=False, precision=a.precision)
    sync(a)
    out["surface"] = {"ms_per_point": 1000 * (time.perf_counter() - t) / s.losses.size, "points": int(s.losses.size),
                      "center": float(s.center_loss)}
    return out


def main(argv=None) -> str:
    a = parse(argv)
    t0 = time.perf_counter()
    from transformers import RobertaConfig

    from dpflat.models import tiny_config

    conf = tiny_config("tiny-roberta") if a.tiny else RobertaConfig(vocab_size=50265, pad_token_id=1)
    steps = train_steps(a, conf)
    hs = hessian_and_surface(a, conf)
    med = statistics.median
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "CPU"
    base = med(steps["non-private"]["steps_s"])
    size = "tiny random roberta (dry run)" if a.tiny else "random roberta-base-sized encoder (12x768, 125M frozen)"
    lines = [
        f"- command: `python {' '.join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])}`",
        f"- machine: {dev} ({a.device}), torch {torch.__version__}, {platform.platform()}",
        f"- model: dpflat prefix model (m={a.prefix_len}) + head on a {size}; random tokens, batch {a.batch_size} x "
        f"{a.seq_len} tokens; {a.precision} autocast for training and the surface; Hessian in fp32 (eager attention), "
        f"{a.hessian_batches} batch(es) of {16 if not a.tiny else 4}, {hs['n_params']:,} trainable parameters",
        "",
        "| measure | value | vs non-private / PyHessian | peak memory (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in steps.items():
        m = med(r["steps_s"])
        pk = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a (CPU)"
        lines.append(f"| step: {name} | {1000 * m:.1f} ms | {m / base:.2f}x | {pk} |")
    o = hs["ours"]
    ph = hs.get("pyhessian", {})
    if "value" in ph:
        diff = abs(o["value"] - ph["value"]) / abs(ph["value"])
        lines.append(f"| Hessian top eigenvalue, landscape Lanczos | {o['value']:.5g} ({o['hvps']} HVPs, {o['s']:.2f} s) | "
                     f"{ph['s'] / o['s']:.2f}x faster, rel. diff {diff:.1e} | |")
        lines.append(f"| Hessian top eigenvalue, PyHessian 0.1 | {ph['value']:.5g} ({ph['hvps']} HVPs, {ph['s']:.2f} s) | 1.00x | |")
    else:
        lines.append(f"| Hessian top eigenvalue, landscape Lanczos | {o['value']:.5g} ({o['hvps']} HVPs, {o['s']:.2f} s) | "
                     f"PyHessian: {ph.get('error', 'skipped')} | |")
    sf = hs["surface"]
    lines.append(f"| 2D surface, {a.grid}x{a.grid} points | {sf['ms_per_point']:.1f} ms/point | | |")
    lines += ["", f"Total wall time of this check: {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": steps, "hessian_surface": hs, "args": vars(a)}, indent=2, default=str))
    if a.append:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import _report

        _report.append("gpu_check: step time, memory, Hessian, surface", lines)
    return text


if __name__ == "__main__":
    main()
