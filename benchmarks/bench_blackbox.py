"""Black-box DP-Flat on SST-2: accuracy of bb-nonprivate, bb-dp and bb-dpflat (safe, paper).

The default MiniLM backbone queried forward only (dpflat/blackbox/): a soft prompt
z (d = 50, plus a 2-number readout bias) tuned by SPSA / DPZero at ε 3 and 8, 3 seeds,
through ``dpflat.sweep.sweep`` (run folders, results table, guarantees; finished cells
are reused, so an interrupted benchmark continues). Sized for a 2-core CPU with one
torch thread: about 35 minutes. Also measures the untuned readout (no prompt; and
z = 0, the random initial prompt) and the dev set's majority class, and appends the
table to benchmarks/RESULTS.md.

    python benchmarks/bench_blackbox.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import _report  # noqa: E402


def majority_rate(data_dir: Path) -> float:
    rows = (data_dir / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    labels = [r.rsplit("\t", 1)[-1] for r in rows if r.strip()]
    return Counter(labels).most_common(1)[0][1] / len(labels)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(ROOT / "out" / "bench_blackbox"))
    p.add_argument("--data-dir", default=os.environ.get("DPFLAT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--epsilons", default="3,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    _report.start(a.threads)
    import pandas as pd
    import torch

    import dpflat as dp
    from dpflat import blackbox as bbm
    from dpflat.config import DataConfig, RunConfig, TrainConfig
    from dpflat.sweep import sweep
    from dpflat.train import prepare_data

    eps = [float(x) for x in a.epsilons.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    steps = int(round(a.epochs * -(-a.train_size // a.batch_size)))
    base = RunConfig(
        data=DataConfig(task="sst2", data_dir=a.data_dir, train_size=a.train_size, public_size=500, eval_size=None),
        train=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, output_dir=a.output_dir, progress=False,
                          eval_every=10 * steps, checkpoint_every=20, num_threads=a.threads),
    ).replace(flat={"teacher_epochs": 2.0})
    base = dp.apply_variant(base, "bb-dp")
    load0, t_all = os.getloadavg()[0], time.time()

    # references: the readout without any prompt, and at z = 0 (random initial prompt P0, bias 0)
    card, _s, tokd = prepare_data(base)
    ref_rows = []
    for seed in seeds:
        m = bbm.build_prompt_model(base.replace(train={"seed": seed}), card)
        with torch.no_grad():
            bl = bbm.prompt_batches(tokd["eval"], len(tokd["eval"]), 128)
            if seed == seeds[0]:
                pred = torch.cat([m.box.logits(b, None).argmax(-1) for b in bl])
                y = torch.cat([b["labels"] for b in bl])
                no_prompt = float((pred == y).float().mean())
        ref_rows.append(bbm.evaluate_prompt(m, tokd["eval"])["accuracy"])
        del m

    times: dict[str, float] = {}
    last = [time.time()]

    def on_cell(res: dict) -> None:
        now = time.time()
        times[res["run_id"]] = now - last[0]
        last[0] = now
        print(f"{res['variant']:16s} ε={res.get('target_epsilon')} seed={res['seed']} acc={res['accuracy']:.4f} "
              f"{res['guarantee']} ({times[res['run_id']]:.0f} s)", flush=True)

    last[0] = time.time()
    table = sweep(base, ["bb-nonprivate", "bb-dp", "bb-dpflat"], eps, seeds, ["safe", "paper"], on_cell=on_cell,
                  progress=False)
    wall = time.time() - t_all
    t = table.copy()
    t["seconds"] = t["run_id"].map(times)
    t["eps_key"] = pd.to_numeric(t["target_epsilon"], errors="coerce").fillna(float("inf"))
    maj = majority_rate(Path(a.data_dir))
    order = {"bb-nonprivate": 0, "bb-dp": 1, "bb-dpflat-safe": 2, "bb-dpflat-paper": 3}
    lines = [
        f"- command: `{_report.command()}`",
        f"- machine: {_report.machine()}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"total wall time {wall / 60:.1f} min (cells already in {a.output_dir} are reused and show no time)",
        f"- setting: SST-2, {a.train_size} private training examples (public 500), eval = the whole dev set "
        f"({len(tokd['eval'])} sentences, evaluated once at the end: no best-on-dev selection), MiniLM-L6 frozen and "
        f"queried forward only; soft prompt of {base.blackbox.prompt_tokens} tokens = P0 + A z, z in R^"
        f"{base.blackbox.prompt_dim} (+ a 2-class readout bias), A fixed random; readout = {20:g} · cos(sentence "
        f"embedding, embedding of \"{bbm.readout_texts(base, card)[0]}\" / \"{bbm.readout_texts(base, card)[1]}\")",
        f"- optimiser: SPSA, 1 direction per step, μ={base.blackbox.zo_mu}, Adam lr {base.blackbox.zo_lr}, "
        f"expected batch {a.batch_size} (Poisson for DP), {steps} steps = {2 * a.batch_size * steps} example "
        f"queries per run; DP = DPZero (per-example finite difference clipped to C={base.privacy.max_grad_norm}, "
        f"Gaussian noise σC on the sum), RDP accountant, δ=1/N^1.1",
        f"- bb-dpflat: + λ‖z − z_teacher‖, λ={base.blackbox.prompt_lambda}; teacher tuned non-privately by the same "
        f"SPSA for 2 epochs of its data: the public split (safe) or the private split (paper, not DP); one teacher "
        f"per seed and mode, shared by both ε",
        f"- references: majority class {maj:.4f}; readout without a prompt {no_prompt:.4f}; untuned z = 0 "
        f"(random initial prompt) {pd.Series(ref_rows).mean():.4f} ± {pd.Series(ref_rows).std():.4f} over seeds",
        "",
        "| variant | target ε | guarantee | seeds | accuracy (mean ± std) | ε claimed (max) | teacher accuracy | "
        "time per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (v, e), g in sorted(t.groupby(["variant", "eps_key"]), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        claims = pd.to_numeric(g["epsilon"], errors="coerce")
        claim = "—" if claims.isna().all() else f"{claims.max():.2f}"
        teach = pd.to_numeric(g.get("info_teacher_accuracy", pd.Series(dtype=float)), errors="coerce")
        teach_s = "—" if teach.isna().all() else f"{teach.mean():.4f}"
        secs = g["seconds"].dropna()
        time_s = "—" if secs.empty else f"{secs.mean():.0f} s"
        lines.append(f"| {v} | {'—' if e == float('inf') else f'{e:g}'} | {' / '.join(sorted(set(g['guarantee'])))} "
                     f"| {g['seed'].nunique()} | {g['accuracy'].mean():.4f} ± {g['accuracy'].std():.4f} | {claim} "
                     f"| {teach_s} | {time_s} |")
    print("\n".join(lines), flush=True)
    if not a.no_append:
        _report.append("bench_blackbox: black-box DP-Flat (SPSA / DPZero soft prompt) on SST-2", lines)


if __name__ == "__main__":
    main()
