"""Claimed ε vs independent accountants (dp-accounting RDP and PLD) for the demo-sized runs.

For each cell the mechanism is what a run of that config records in its ledger: Poisson
rate q = 1 / len(loader) (Opacus' rate), the step count, δ = 1/N^1.1, and σ searched for
the target ε by ``engine.noise_for_target`` exactly as training does (Opacus RDP over
the project's wide α grid). The claimed ε (Opacus RDP at that σ) is then recomputed by
Google's dp-accounting RDP and PLD accountants, and the independent ledger check
(claim >= PLD ε, within 10% of dp-accounting RDP) is applied. A second σ column shows
what Opacus' default α grid (largest order 63) would have needed for the same target.

``--runs-dir DIR``: also check the ledgers of finished runs under DIR (recorded q, σ,
steps, δ, and the Poisson test of their recorded batch sizes).

    python benchmarks/bench_accounting.py                       # the demo configs (no training)
    python benchmarks/bench_accounting.py --runs-dir out/demo   # plus the runs' own ledgers

Prints a markdown table and appends it to benchmarks/RESULTS.md with machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

from dpflat.accountants import from_ledger  # noqa: E402
from dpflat.config import PrivacyConfig  # noqa: E402
from dpflat.engine import noise_for_target  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilons", default="2,8", help="target ε of the demo (python -m dpflat demo)")
    p.add_argument("--train-sizes", default="1500", help="private examples N (demo: 1500)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--runs-dir", default=None, help="also check the ledgers of the runs under this folder")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args(argv)


def default_grid_sigma(eps: float, q: float, steps: int, delta: float) -> tuple[float, bool]:
    """σ that Opacus' own default α grid needs for the target, and whether it warned about its edge."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                 accountant="rdp", epsilon_tolerance=0.01)
    return float(s), any("largest alpha" in str(x.message) for x in w)


def row(label: str, led: dict, extra: str = "") -> str:
    c = from_ledger(led)
    e = c.epsilons
    yes = {True: "yes", False: "NO", None: "n/a"}
    pois = "—"
    if c.poisson is not None and c.poisson.get("steps"):
        pois = f"{'yes' if c.poisson['consistent'] else 'NO'} (mean {c.poisson['mean']:.1f} / {c.poisson['expected_mean']:.1f})"
    return (f"| {label} | {c.sample_rate:.4g} | {c.noise_multiplier:.4g} | {extra} | {c.steps} | {c.delta:.2e} | "
            f"{c.ledger_epsilon:.4f} | {e['dp_accounting_rdp']:.4f} | {e['dp_accounting_pld']:.4f} | "
            f"{yes[c.claim_above_pld]} | {yes[c.claim_near_rdp]} | {pois} |")


def main(argv=None) -> None:
    ns = parse(argv)
    from dpflat.engine import epsilon_for

    lines = ["| run | q | σ | σ with Opacus' default α grid | steps | δ | claimed ε (Opacus RDP) | dp-accounting RDP ε "
             "| dp-accounting PLD ε | claim ≥ PLD | within 10% of RDP | batch sizes Poisson |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in [int(x) for x in ns.train_sizes.split(",")]:
        steps_per_epoch = math.ceil(n / ns.batch_size)
        q, steps = 1.0 / steps_per_epoch, max(1, int(round(ns.epochs * steps_per_epoch)))
        delta = 1.0 / n**1.1
        for eps in [float(x) for x in ns.epsilons.split(",")]:
            sigma = noise_for_target(PrivacyConfig(epsilon=eps), q, steps, delta)
            claimed = epsilon_for("rdp", q, sigma, steps, delta)
            s_old, warned = default_grid_sigma(eps, q, steps, delta)
            led = {"mechanism": "dp-sgd", "sample_rate": q, "noise_multiplier": sigma, "steps": steps, "delta": delta,
                   "accountant": "rdp", "epsilon": claimed, "n_private": n}
            extra = f"{s_old:.4g}" + (" (Opacus warned: optimum at the grid edge)" if warned else "")
            lines.append(row(f"demo config N={n}, target ε={eps:g} (mechanism only)", led, extra))
    if ns.runs_dir:
        for f in sorted(Path(ns.runs_dir).rglob("ledger.json")):
            led = json.loads(f.read_text())
            if led.get("mechanism") not in ("dp-sgd", "dpzero") or not led.get("steps"):
                continue
            lines.append(row(f"{f.parent.name} ({led.get('guarantee')})", led, ""))
    lines += ["", "claimed ε: what the run's accountant (Opacus RDP, wide α grid) states; PLD (pessimistic "
              "discretisation) is an upper bound on the true ε of the recorded mechanism, so a claim at or above "
              "it holds. " + f"Machine: {_report.machine()}. Command: `{_report.command()}`."]
    print("\n".join(lines))
    if not ns.no_append:
        _report.append("Claimed ε vs dp-accounting RDP and PLD (issue 14)", lines)


if __name__ == "__main__":
    main()
