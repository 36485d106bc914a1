"""The privacy ledger: what touched the private split, and the guarantee that follows.

The ledger is the single gate to the private training split: code that wants
private examples asks ``PrivateSplit.read(who, accounted=...)`` and the read is
recorded. A run's guarantee is "(ε, δ)-DP" only if *every* read was accounted by
the DP-SGD accountant; one unaccounted read (paper-mode flattening, non-private
training) makes the run "not DP", and nothing downstream may claim an ε for it.

This module is bookkeeping only (no Opacus, no torch): readers of run folders
(report, tables, widgets) import it without the training stack. The Opacus wiring
that fills the ledger's mechanism fields lives in ``dpflat/engine.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DP = "(ε, δ)-DP"
UNKNOWN = "unknown guarantee (no valid ledger)"
NOT_DP_PAPER = "not DP (paper mode)"
NOT_DP_NONPRIVATE = "not DP (non-private)"
# Both are the Poisson-subsampled Gaussian mechanism (per-example contribution clipped to C,
# noise σC on the sum), so the same accountants apply: DP-SGD on gradients, DPZero on the
# scalar finite differences of the black-box path.
SAMPLED_GAUSSIAN = ("dp-sgd", "dpzero")
#: the one read of the private split each mechanism accounts for (the training loops' ``TRAIN_WHO``);
#: any other read recorded as accounted is not covered by it (``dpflat.verify``)
MECHANISM_READ = {"dp-sgd": "train/dp-sgd", "dpzero": "train/dpzero"}
#: the fields of an accounted read that are functions of the secret sampling (left out of ledger.json)
PRIVATE_READ_FIELDS = ("count", "examples")
#: metrics.jsonl columns computed from private batches: private diagnostics, not covered
PRIVATE_METRICS = ("train_loss_private", "examples_per_s", "clipped_fraction", "queries")


@dataclass
class Read:
    """One kind of access to the private split (aggregated over steps)."""

    who: str  # e.g. "train/dp-sgd", "awp/paper-ascent", "teacher/paper"
    how: str  # short description of what was computed from the data
    accounted: bool  # covered by the DP-SGD accountant?
    count: int = 0  # number of accesses (batches)
    examples: int = 0  # examples touched (with multiplicity)


@dataclass
class PrivacyLedger:
    """What touched private data, and the guarantee that follows."""

    mechanism: str = "none"
    accountant: str | None = None
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    steps: int = 0
    target_epsilon: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    n_private: int = 0
    reads: list[Read] = field(default_factory=list)
    nonprivate: bool = False
    secure_rng: bool = False  # Opacus secure_mode (csprng) off: fine for research, not production
    # where the mechanism's secret randomness (Poisson sampling, noise) came from:
    # os-entropy (default), operator-supplied (--noise-seed; reproducible, the operator must keep it
    # secret) or secure (Opacus secure_mode). Never the seed itself.
    noise_source: str | None = None
    # logical batch size per DP step, as count / sum / sum of squares (Poisson check, see accountants.py).
    # A function of the secret sampling: private, so written to private_diagnostics.json, never to ledger.json
    batch_sizes: dict[str, float] = field(default_factory=lambda: {"steps": 0, "sum": 0.0, "sumsq": 0.0})
    release: dict[str, Any] = field(default_factory=dict)  # what the guarantee covers (see RELEASE)

    def record_batch(self, size: int) -> None:
        """One DP step's logical batch size (the union over ranks under torchrun)."""
        b = self.batch_sizes
        b["steps"] = int(b.get("steps", 0)) + 1
        b["sum"] = float(b.get("sum", 0.0)) + size
        b["sumsq"] = float(b.get("sumsq", 0.0)) + float(size) ** 2

    def record(self, who: str, how: str, accounted: bool, examples: int) -> None:
        for r in self.reads:
            if r.who == who and r.how == how and r.accounted == accounted:
                r.count += 1
                r.examples += int(examples)
                return
        self.reads.append(Read(who, how, accounted, 1, int(examples)))

    def record_many(self, who: str, how: str, accounted: bool, batches: int, examples: int) -> None:
        """Counts of reads made elsewhere and replayed here (a cached paper-mode teacher's tuning)."""
        self.declare(who, how, accounted)
        r = next(r for r in self.reads if r.who == who and r.how == how and r.accounted == accounted)
        r.count += int(batches)
        r.examples += int(examples)

    def resume_counts(self, saved: dict[str, Any]) -> None:
        """Take the read counts and batch sizes of a checkpoint's ledger (a resumed run continues them)."""
        restored = PrivacyLedger.from_dict(saved)
        self.reads, self.batch_sizes = restored.reads, restored.batch_sizes

    def declare(self, who: str, how: str, accounted: bool) -> None:
        """Register a read path before it happens (so a run that dies early still says it)."""
        if not any(r.who == who and r.how == how and r.accounted == accounted for r in self.reads):
            self.reads.append(Read(who, how, accounted, 0, 0))

    @property
    def unaccounted(self) -> list[Read]:
        return [r for r in self.reads if not r.accounted]

    @property
    def is_dp(self) -> bool:
        return self.mechanism in SAMPLED_GAUSSIAN and not self.unaccounted and self.epsilon is not None

    @property
    def guarantee(self) -> str:
        if self.mechanism not in SAMPLED_GAUSSIAN:
            return NOT_DP_NONPRIVATE
        if self.unaccounted:
            return NOT_DP_PAPER
        return DP

    @property
    def claimed_epsilon(self) -> float | None:
        """The ε a run may claim: None unless the whole run is DP."""
        return self.epsilon if self.guarantee == DP else None

    def label(self) -> str:
        """Short text for plots and tables, e.g. "(ε, δ)-DP, ε=2.98"."""
        if self.guarantee == DP and self.epsilon is not None:
            return f"{DP}, ε={self.epsilon:.2f}, δ={self.delta:.1e}"
        return self.guarantee

    @property
    def dpsgd_part_epsilon(self) -> float | None:
        """ε of the sampled Gaussian part of a run that is not DP as a whole (paper mode), else None."""
        return self.epsilon if self.mechanism in SAMPLED_GAUSSIAN and self.guarantee != DP else None

    def to_dict(self) -> dict[str, Any]:
        """Everything, batch sizes and every read's counts included: the checkpoint's private state."""
        d = asdict(self)
        d["guarantee"] = self.guarantee
        d["claimed_epsilon"] = self.claimed_epsilon
        d["unaccounted_reads"] = len(self.unaccounted)
        if self.guarantee != DP:  # no ε under a name that reads as the run's: only as the DP-SGD part's
            d["dpsgd_part_epsilon"] = d.pop("epsilon")
        return d

    def public_dict(self) -> dict[str, Any]:
        """ledger.json: the accounting without the private statistics (see :meth:`private_dict`).

        Why: a DP run's ledger.json is covered by its guarantee, so it may hold only what the
        mechanism releases or the config fixes. The batch sizes and the counts of accounted
        reads (examples: their sum; physical batches: how many exceeded the memory limit) are
        functions of the secret Poisson sampling; ``steps`` is the public count of releases.
        Unaccounted reads keep their counts: they are why such a run claims nothing.
        """
        d = self.to_dict()
        d.pop("batch_sizes")
        d["reads"] = [{k: v for k, v in r.items() if not (r["accounted"] and k in PRIVATE_READ_FIELDS)}
                      for r in d["reads"]]
        return d

    def private_dict(self) -> dict[str, Any]:
        """What :meth:`public_dict` leaves out: the batch sizes and every read's counts (private diagnostics)."""
        return {"batch_sizes": dict(self.batch_sizes), "reads": [asdict(r) for r in self.reads]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
        d = dict(d)
        if "epsilon" not in d and "dpsgd_part_epsilon" in d:
            d["epsilon"] = d["dpsgd_part_epsilon"]
        for k in ("guarantee", "claimed_epsilon", "unaccounted_reads", "dpsgd_part_epsilon"):
            d.pop(k, None)
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["reads"] = [Read(**r) for r in d.get("reads", [])]
        return cls(**d)


def valid_ledger(d: Any) -> dict[str, Any] | None:
    """A parsed ledger.json if it is well-formed and its reads support its stated guarantee, else None.

    Why: a run without a valid ledger has no record of what touched its private data,
    so readers (report, landscape) must show "unknown guarantee", never an ε. The file
    itself is read by ``runs.RunDir.ledger`` (the run folder's layout lives there).
    """
    if not isinstance(d, dict) or not {"guarantee", "mechanism", "reads"} <= set(d):
        return None
    try:
        led = PrivacyLedger.from_dict(d)
    except (TypeError, ValueError):
        return None
    if led.guarantee != d["guarantee"]:  # edited by hand: the reads no longer support the stated guarantee
        return None
    return d


def guarantee_of(d: dict[str, Any] | None) -> str:
    """The guarantee a (validated) ledger supports, or :data:`UNKNOWN` when there is none."""
    return UNKNOWN if d is None else str(d["guarantee"])


class PrivateSplit:
    """The only handle on the private training data: every read goes through the ledger."""

    def __init__(self, dataset, ledger: PrivacyLedger):
        self._dataset = dataset
        self.ledger = ledger
        ledger.n_private = len(dataset)

    def __len__(self) -> int:
        return len(self._dataset)

    def read(self, who: str, how: str, accounted: bool):
        """Hand out the dataset for a declared purpose; per-batch use is counted by ``count``."""
        self.ledger.declare(who, how, accounted)
        return self._dataset

    def count(self, who: str, how: str, accounted: bool, examples: int) -> None:
        self.ledger.record(who, how, accounted, examples)

    def count_replayed(self, who: str, how: str, accounted: bool, batches: int, examples: int) -> None:
        """Reads made by an earlier process whose outcome is reused (a cached teacher): counted here too."""
        self.ledger.record_many(who, how, accounted, batches, examples)


#: what a run's (ε, δ) covers, and what it does not (ledger.json "release", README): every file a
#: run folder holds is named on one side (``tests/test_privacy_boundary.py`` checks it)
RELEASE = {
    "covered": [
        "model.safetensors (the selected parameters; post-processing of the DP training)",
        "eval-split metrics of the selected model (result.json, results table: accuracy, eval_loss, test_*, "
        "val_*; test_predictions.npz: per-example test correctness; info: what the setup found on public data)",
        "metrics.jsonl step, epoch, epsilon, eval_* and z_norm (functions of the DP iterates and public data); "
        "sharpness.jsonl (measured on public or test data)",
        "config.json, ledger.json (public inputs and the accounting: mechanism, q, σ, steps, δ, ε, which "
        "reads were accounted)",
    ],
    "private_diagnostics_not_covered": [
        f"metrics.jsonl {', '.join(PRIVATE_METRICS)} (computed from the private batches, per step)",
        "private_diagnostics.json (logical batch sizes, each read's counts, the split-overlap duplicate counts, "
        "black-box query counts)",
        "checkpoints (ckpt-*/: parameters and the secret generator state in state.pt; a generator state "
        "holds its seed, so whoever reads any checkpoint, ckpt-0000000 included, can replay every noise "
        "draw from step 0: keep checkpoints as private as the data), LATEST, best.safetensors, last.safetensors",
        "training time and memory (result.json, results table: wall_s, setup_s, train_s, examples_per_s, "
        "peak_mem_mb, processes; side channels of the batch sizes; examples_per_s there is the expected qN per step)",
        "loss landscapes and Hessians computed on the private split",
        "membership-inference reads (mia.json; the results table's mia_* columns) and canary audits "
        "(canaries.json, audit.json)",
    ],
    "note": "release only the covered artifacts; the others read private data outside the accountant",
}


def fill_release(ledger: PrivacyLedger) -> None:
    """The release boundary, stated in the ledger (for every run; a non-DP run covers nothing)."""
    ledger.release = {**RELEASE, "guarantee": ledger.guarantee} if ledger.guarantee == DP else {
        "covered": [], "guarantee": ledger.guarantee,
        "private_diagnostics_not_covered": RELEASE["private_diagnostics_not_covered"],
        "note": "this run makes no DP claim: nothing it writes is covered"}



__all__ = [
    "DP",
    "NOT_DP_NONPRIVATE",
    "NOT_DP_PAPER",
    "MECHANISM_READ",
    "PRIVATE_METRICS",
    "PRIVATE_READ_FIELDS",
    "RELEASE",
    "SAMPLED_GAUSSIAN",
    "UNKNOWN",
    "PrivacyLedger",
    "PrivateSplit",
    "Read",
    "fill_release",
    "guarantee_of",
    "valid_ledger",
]
