"""SmolLM2-135M (a decoder LLM, --backbone smollm2) beside MiniLM-L6: cost of a DP step, and the prompt's zero-shot floor.

For each backbone, one batch of B real SST-2 training rows (tokenised as a run tokenises them:
MiniLM with its default readout head, SmolLM2 with its label-word prompt), padding trimmed as
the loop trims it, through

- a DP-SGD step: Opacus (hooks, or --mode ghost) forward + backward + clip + noise + optimizer step;
- a non-private step: the same model without Opacus, forward + backward + step;

median over ``--steps`` after ``--warmup``; examples/s = B / median step time. Memory: the
process's peak RSS sampled every 5 ms (psutil) during the steps, and ``ru_maxrss``. Then SmolLM2's
zero-shot accuracy (every prefix removed: the pretrained LM with the prompt) on the validation
split, the floor each run reports as ``info.zero_shot_val_accuracy``.

The training rows are only timed here (no result of them is written); val is public.

    python benchmarks/bench_llm.py                 # B 32, max_length 64, 1 thread, 2 warm-up + 5 timed steps
    python benchmarks/bench_llm.py --threads 2 --val 0 --peft prefix,lora
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dpflat import decoders  # noqa: E402
from dpflat.cli import quiet_libraries  # noqa: E402
from dpflat.config import DataConfig, ModelConfig, PrivacyConfig, RunConfig  # noqa: E402
from dpflat.engine import backward_private, make_private  # noqa: E402
from dpflat.evaluate import evaluate, model_inputs  # noqa: E402
from dpflat.models import build_model, load_tokenizer  # noqa: E402
from dpflat.session import prepare_data  # noqa: E402

PROC = psutil.Process()


class Peak:
    """Peak RSS of the process while active (a 5 ms sampling thread)."""

    def __enter__(self):
        self.peak, self.run = PROC.memory_info().rss, True
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()
        return self

    def _loop(self):
        while self.run:
            self.peak = max(self.peak, PROC.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *a):
        self.run = False
        self.t.join()


def timed(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench(backbone: str, peft: str, a) -> dict:
    t0 = time.perf_counter()
    cfg = RunConfig(data=DataConfig(task="sst2", max_length=a.max_length, train_size=max(a.batch, 64), eval_size=64,
                                    public_size=64),
                    model=ModelConfig(backbone=backbone, prefix_len=a.prefix_len, peft=peft))
    tok = load_tokenizer(cfg.model)
    card, _, tokd = prepare_data(cfg, tok)
    model = build_model(cfg.model, len(card.labels), seed=0, task=card.name, tokenizer=tok)
    load_s = time.perf_counter() - t0
    batch = tokd["private"][: a.batch]  # a dict of tensors (torch format)
    inputs = model_inputs(batch, "cpu")
    y = batch["labels"]
    res = {"backbone": backbone, "peft": peft, "head": model.cfg.head, "load_s": load_s, "batch": a.batch,
           "tokens_per_row": float(inputs["attention_mask"].sum(1).float().mean()), "width": inputs["input_ids"].shape[1],
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "params": sum(p.numel() for p in model.parameters())}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)

    def plain():
        F.cross_entropy(model(**inputs).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with Peak() as pk:
        ts = timed(plain, a.warmup, a.steps)
    res["nonprivate"] = {"ex_per_s": a.batch / statistics.median(ts), "step_s": statistics.median(ts),
                         "peak_rss_mb": pk.peak / 2**20}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(256, 1)), batch_size=a.batch)
    dp = make_private(model, torch.optim.SGD(params, lr=0.01), loader,
                      PrivacyConfig(epsilon=8.0, grad_sample_mode=a.mode), total_steps=100, n_private=256)

    def private():
        per_ex = F.cross_entropy(dp.model(**inputs).float(), y, reduction="none")
        backward_private(dp, per_ex)
        dp.optimizer.step()
        dp.optimizer.zero_grad(set_to_none=True)

    with Peak() as pk:
        ts = timed(private, a.warmup, a.steps)
    res["dp"] = {"mode": a.mode, "ex_per_s": a.batch / statistics.median(ts), "step_s": statistics.median(ts),
                 "peak_rss_mb": pk.peak / 2**20}
    res["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.val and getattr(model, "causal", False) and peft == "prefix":
        val = tokd["val"]
        val = val.select(range(min(a.val, len(val))))
        t = time.perf_counter()
        with decoders.prefixes_removed(model):
            r = evaluate(model, val, 32)
        res["zero_shot_val"] = {"accuracy": r["accuracy"], "n": r["n"], "ex_per_s": r["n"] / (time.perf_counter() - t)}
    del dp, model
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="minilm,smollm2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=16)
    p.add_argument("--peft", default="prefix", help="trainable families, comma-separated: prefix,lora")
    p.add_argument("--mode", default="hooks", choices=["hooks", "ghost"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val", type=int, default=10_000, help="zero-shot on at most this many val rows (0: skip)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(a.threads)
    out = {"threads": a.threads, "torch": torch.__version__, "cpus": psutil.cpu_count(),
           "results": [bench(b, f, a) for b in a.backbones.split(",") for f in a.peft.split(",")]}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
