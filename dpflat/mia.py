"""Membership inference against a finished run: loss threshold, and its calibrated variant.

Who is a member. Members are the run's private training examples. Non-members are
rows of the *same raw train file* that the run's split used neither as private nor
as public (``make_splits`` draws private and public from one seeded permutation of
the train file, so the leftover rows are exchangeable with the members: same
distribution, never seen). We do not use the eval split when we can avoid it: for
SST-2, e.g., train holds short phrases and dev full sentences, so "member vs eval"
would measure the distribution shift, not memorisation. Only when the run used
(nearly) the whole train file do we fall back to the eval split, and the result says
so (``nonmember_source = "eval"``). The two sides are balanced (same count; seeded
subsample of the larger side).

Privacy of the attack itself. The attack is an auditor's tool: it reads the run's
private examples *after* training, to measure leakage. That read is outside the run
(its ledger, which describes how the released model was made, is unchanged), and the
attack's numbers are not covered by the run's (ε, δ) guarantee: treat ``mia.json`` as
private to whoever holds the data.

Scores (higher = "more likely a member"):
- ``loss``: minus the cross-entropy of the true label (Yeom et al. 2018).
- ``calibrated``: minus (loss - reference loss) (Watson et al. 2022 "difficulty
  calibration"): an example that is easy anyway is not evidence of membership. The
  reference is either another run folder whose private split is disjoint from every
  attacked example (overlapping examples are dropped from both sides), or, by default,
  the run's own model at initialisation (frozen backbone + initial prefix + head: what
  the run started from, so no member ever influenced it; weak when the head starts
  random, but free).

Metrics, each with a seeded percentile-bootstrap confidence interval (members and
non-members resampled separately):
- best-threshold accuracy, as the DP-Flat paper reports it. The threshold is chosen on
  the same examples it is scored on, so it is optimistic: with n examples per side its
  chance level is about 0.5 + 0.6/sqrt(n), not 0.5 (0.55 at n = 128). Read AUC for a
  threshold-free number.
- AUC (ties count one half).
- TPR at 1% and 0.1% FPR (Carlini et al. 2022): the best TPR over thresholds whose FPR
  is at most the target. With n non-members, FPR resolves in steps of 1/n, so below
  1/n the number is "TPR at zero false positives" (``fpr_resolution`` says 1/n).
- advantage: the best TPR − FPR over thresholds (Yeom et al. 2018's membership advantage;
  2·accuracy − 1 when the sides are balanced). An (ε, δ)-DP run bounds it for *every*
  attacker by ``dp_advantage_bound`` = (e^ε − 1 + 2δ)/(e^ε + 1). Like the accuracy it is
  optimistic: with n examples per side and no leakage at all it is about 0.89/√n
  (``advantage_chance_level``), not 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOW_FPRS = (0.01, 0.001)


# --------------------------------------------------------------------------- metrics
def roc_points(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); "member" = score >= t."""
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("need at least one member and one non-member score")
    s = np.concatenate([m, n])
    y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.diff(s) != 0, True]  # a threshold sits after the last of each tied run
    tp = np.r_[0.0, np.cumsum(y)[last]]
    fp = np.r_[0.0, np.cumsum(1 - y)[last]]
    return fp / len(n), tp / len(m)


def attack_point_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                         low_fprs: tuple[float, ...] = LOW_FPRS) -> dict[str, float]:
    """Best-threshold accuracy, AUC and TPR at each low FPR, from one ROC."""
    fpr, tpr = roc_points(member_scores, nonmember_scores)
    P, N = len(member_scores), len(nonmember_scores)
    acc = float(np.max((tpr * P + (1 - fpr) * N) / (P + N)))
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    out = {"accuracy": acc, "auc": auc, "advantage": float(np.max(tpr - fpr))}
    for a in low_fprs:
        out[_tpr_key(a)] = float(np.max(tpr[fpr <= a + 1e-12]))
    return out


def dp_advantage_bound(epsilon: float, delta: float = 0.0) -> float:
    """The largest membership advantage TPR − FPR that any attacker can reach against an (ε, δ)-DP run.

    The corner of the region TPR <= e^ε·FPR + δ, 1 − FPR <= e^ε·(1 − TPR) + δ (Kairouz, Oh &
    Viswanath 2015; ``widgets.dp_roc_bound`` draws the whole curve): (e^ε − 1 + 2δ)/(e^ε + 1),
    i.e. tanh(ε/2) at δ = 0. An attack measured above it refutes the claim.
    """
    e = math.exp(float(epsilon))
    return min(1.0, (e - 1.0 + 2.0 * float(delta)) / (e + 1.0))


def advantage_chance_level(n_per_side: int, quantile: float | None = None, draws: int = 4000) -> float:
    """The best-threshold advantage an attack that learns nothing still shows with n members and n non-members.

    The threshold is picked on the scored examples, so with scores of one distribution on both
    sides the advantage is the one-sided two-sample Kolmogorov-Smirnov statistic: distribution-free
    (only the ranks matter), so it is computed exactly here by simulating random rankings (seeded:
    the same number in every process). ``quantile=None``: its mean (about 0.057 at n = 200; 0.89/√n
    for large n); ``quantile=0.95``: the level that 95% of useless attacks stay below. A measured
    advantage under it is no evidence that the attack found anything.
    """
    n = max(1, int(n_per_side))
    rng = np.random.default_rng([n, 0xAD7])
    labels = np.tile(np.r_[np.ones(n), np.zeros(n)], (draws, 1))
    labels = rng.permuted(labels, axis=1)  # the ranking of 2n scores of one distribution
    adv = np.max(np.cumsum(labels, axis=1) / n - np.cumsum(1 - labels, axis=1) / n, axis=1).clip(min=0.0)
    return float(np.mean(adv) if quantile is None else np.quantile(adv, quantile))


def _tpr_key(fpr: float) -> str:
    return f"tpr_at_{fpr * 100:g}%fpr".replace(".", "_")


@dataclass
class AttackMetrics:
    """One score's attack: point estimates and bootstrap intervals (lo, hi)."""

    score: str  # "loss" or "calibrated"
    accuracy: float  # best-threshold accuracy (optimistic: the threshold is fit on the same data)
    auc: float
    tpr_at_1_fpr: float
    tpr_at_0_1_fpr: float

    accuracy_ci: tuple[float, float]
    auc_ci: tuple[float, float]
    tpr_at_1_fpr_ci: tuple[float, float]
    tpr_at_0_1_fpr_ci: tuple[float, float]
    advantage: float = math.nan  # best TPR − FPR (mia.json files older than this field have none)
    advantage_ci: tuple[float, float] = (math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def attack_metrics(member_scores, nonmember_scores, *, score: str = "loss", n_bootstrap: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> AttackMetrics:
    """Point metrics plus percentile-bootstrap CIs (members and non-members resampled apart)."""
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    point = attack_point_metrics(m, n)
    keys = list(point)
    rng = np.random.default_rng([int(seed), 0xB007])
    boot = np.empty((n_bootstrap, len(keys)))
    for b in range(n_bootstrap):
        r = attack_point_metrics(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))])
        boot[b] = [r[k] for k in keys]
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    ci = {k: (float(np.quantile(boot[:, i], lo_q)), float(np.quantile(boot[:, i], hi_q))) if n_bootstrap else (math.nan, math.nan)
          for i, k in enumerate(keys)}
    k1, k01 = _tpr_key(0.01), _tpr_key(0.001)
    return AttackMetrics(
        score=score, accuracy=point["accuracy"], auc=point["auc"], tpr_at_1_fpr=point[k1],
        tpr_at_0_1_fpr=point[k01], accuracy_ci=ci["accuracy"], auc_ci=ci["auc"],
        tpr_at_1_fpr_ci=ci[k1], tpr_at_0_1_fpr_ci=ci[k01], advantage=point["advantage"],
        advantage_ci=ci["advantage"],
    )


# --------------------------------------------------------------------------- result
@dataclass
class MIAResult:
    """A membership-inference attack on one run, with the run's privacy claim beside it."""

    run_id: str
    variant: str
    task: str
    n_members: int
    n_nonmembers: int
    nonmember_source: str  # "train-unused" (same distribution) or "eval" (fallback)
    loss: AttackMetrics
    calibrated: AttackMetrics | None
    reference: str | None  # "init", a run folder, or None
    guarantee: str
    claimed_epsilon: float | None  # None unless the whole run is DP
    dpsgd_part_epsilon: float | None  # paper mode: what the DP-SGD part alone spent (not the run's ε)
    delta: float | None
    member_accuracy: float  # the model's task accuracy on the attacked members...
    nonmember_accuracy: float  # ...and non-members (their gap is the generalisation gap)
    member_loss: float
    nonmember_loss: float
    n_bootstrap: int
    confidence: float
    seed: int
    fpr_resolution: float  # 1 / n_nonmembers: TPR at lower FPR means "at zero false positives"
    dropped_for_reference: int = 0
    run_dir: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("loss", "calibrated")}
        d["loss"] = self.loss.to_dict()
        d["calibrated"] = self.calibrated.to_dict() if self.calibrated else None
        return d

    def table(self) -> str:
        """Short text table for the CLI."""
        ci = lambda v, c: f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
        eps = f"ε={self.claimed_epsilon:.3g}, δ={self.delta:.2g}" if self.claimed_epsilon is not None else "no ε claimed"
        lines = [
            f"run {self.run_id}: {self.variant}, {self.task}; guarantee: {self.guarantee} ({eps})",
            f"members {self.n_members} (private split), non-members {self.n_nonmembers} ({self.nonmember_source}); "
            f"task accuracy {self.member_accuracy:.3f} / {self.nonmember_accuracy:.3f}, "
            f"loss {self.member_loss:.3f} / {self.nonmember_loss:.3f}",
            f"{'score':11s} {'accuracy (best thr.)':24s} {'AUC':24s} {'TPR@1%FPR':24s} {'TPR@0.1%FPR':24s}",
        ]
        for a in (self.loss, self.calibrated):
            if a is None:
                continue
            lines.append(f"{a.score:11s} {ci(a.accuracy, a.accuracy_ci):24s} {ci(a.auc, a.auc_ci):24s} "
                         f"{ci(a.tpr_at_1_fpr, a.tpr_at_1_fpr_ci):24s} {ci(a.tpr_at_0_1_fpr, a.tpr_at_0_1_fpr_ci):24s}")
        lines.append(f"[{self.confidence:.0%} bootstrap CIs, {self.n_bootstrap} resamples; FPR resolution "
                     f"{self.fpr_resolution:.2g}; best-threshold accuracy is optimistic (threshold fit on the same data)]")
        if self.calibrated is not None:
            lines.append(f"calibrated = loss minus reference ({self.reference}) loss")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- run folders
def load_run_model(run_dir: str | Path, device: str = "cpu", trained: bool = True):
    """(cfg, model) of a run folder: the config's model, with ``model.safetensors`` loaded.

    ``trained=False`` gives the model as the run built it before training (same seed).
    """
    from .data import get_task
    from .models import build_model
    from .runs import RunDir

    rd = RunDir(run_dir)
    cfg = rd.config()
    model = build_model(cfg.model, get_task(cfg.data.task).num_labels, seed=cfg.train.seed, task=cfg.data.task)
    if trained:
        if not rd.model_file.is_file():
            raise FileNotFoundError(f"{rd.path} has no model.safetensors (unfinished run?)")
        model.load_trainable_state(rd.load_model_state())
    return cfg, model.to(device).eval()


def row_ids(ds) -> np.ndarray:
    """The ``idx`` column (train-file row numbers) of a split, as int64, whatever its format."""
    return np.asarray(ds.with_format(None)["idx"][:], dtype=np.int64)


def _private_idx(cfg) -> set[int]:
    """Train-file rows that a run used as private (without tokenising anything)."""
    from . import data as data_mod
    from . import splits as splits_mod

    raw = data_mod.load_raw(data_mod.get_task(cfg.data.task), cfg.data.data_dir)
    s = splits_mod.splits_for_config(raw, cfg.data, cfg.train.seed)  # the run's own splits (val_size included)
    return set(int(i) for i in data_mod.column(s.private, "idx"))


def membership_sets(cfg, *, max_per_side: int | None = None, seed: int = 0, min_unused: int = 100, tokenizer=None,
                    exclude: set[int] | None = None):
    """Tokenised (members, non-members, source) for a run config, balanced and seeded.

    ``min_unused``: below this many unused train rows, fall back to the eval split.
    ``exclude``: train rows that may not serve as non-members (e.g. an audit's canaries,
    which are outside the split but were trained on when included).
    """
    from . import data as data_mod
    from . import tokens as tokens_mod
    from .models import load_tokenizer
    from .session import prepare_data

    tok = tokenizer or load_tokenizer(cfg.model)
    card, splits, tokd = prepare_data(cfg, tok)
    raw = data_mod.load_raw(card, cfg.data.data_dir)
    used = set(data_mod.column(splits.private, "idx")) | set(data_mod.column(splits.public, "idx"))
    used |= set(exclude or ())
    unused = np.array(sorted(set(range(len(raw["train"]))) - used), dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x4D1A])
    members = tokd["private"]
    if len(unused) >= min(min_unused, len(members)):
        source = "train-unused"
        k = min(len(members), len(unused), max_per_side or len(members))
        rows = np.sort(rng.choice(unused, size=k, replace=False))
        nonmembers = tokens_mod.tokenize(raw["train"].select(rows).add_column("idx", rows), tok,
                                       cfg.data.max_length, cfg.data.cache_dir)
    else:
        source = "eval"
        nonmembers = tokd["eval"]
        k = min(len(members), len(nonmembers), max_per_side or len(members))
        nonmembers = nonmembers.select(np.sort(rng.choice(len(nonmembers), size=k, replace=False)))
    if len(members) > k:
        members = members.select(np.sort(rng.choice(len(members), size=k, replace=False)))
    return members, nonmembers, source


@torch.inference_mode()
def example_losses(model, dataset, batch_size: int = 256, device: str = "cpu") -> dict[str, np.ndarray]:
    """Per-example cross-entropy in float64, with predictions and labels.

    Why not ``evaluate.per_example_losses``: it works in float32, where a confident
    example's loss rounds to exactly 0 once the logit margin passes ~17, so the most
    memorised examples tie and TPR at low FPR loses its resolution. log-softmax in
    float64 resolves margins up to ~700.
    """
    from .evaluate import batches, model_inputs

    was = model.training
    model.eval()
    losses, preds, labels = [], [], []
    try:
        for b in batches(dataset, batch_size):
            logits = model(**model_inputs(b, device)).double()
            y = b["labels"].to(logits.device)
            losses.append(-torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0].cpu())
            preds.append(logits.argmax(-1).cpu())
            labels.append(y.cpu())
    finally:
        model.train(was)
    cat = lambda xs, dt: torch.cat(xs).numpy() if xs else np.zeros(0, dtype=dt)  # noqa: E731
    return {"loss": cat(losses, float), "pred": cat(preds, int), "label": cat(labels, int)}


def attack_run(run_dir: str | Path, *, reference: str | Path | None = "init", max_per_side: int | None = None,
               n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0, batch_size: int | None = None,
               device: str = "cpu") -> MIAResult:
    """Loss-threshold (and calibrated) membership inference on a finished run folder.

    ``reference``: "init" (the run's model before training), a run folder trained on
    other data, or None (no calibrated score).
    """
    from .config import ConfigError

    from .runs import RunDir

    rd = RunDir(run_dir)
    run_dir = rd.path
    if not rd.ledger_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no ledger.json (unfinished run?)")
    ledger = rd.ledger() or {}  # a hand-edited ledger states no guarantee ("?")
    cfg, model = load_run_model(run_dir, device)
    bs = batch_size or cfg.train.eval_batch_size
    notes: list[str] = []
    exclude = rd.canaries() or None  # a canary-audit run (dpflat.audit): its canaries are neither side
    if exclude:
        notes.append(f"{len(exclude)} audit canaries excluded from both sides")
    members, nonmembers, source = membership_sets(cfg, max_per_side=max_per_side, seed=seed, exclude=exclude)
    if source == "eval":
        notes.append("non-members come from the eval split (the run used nearly all train rows): "
                     "a distribution shift between train and eval also separates the sets")
    dropped = 0
    ref_model, ref_name = None, None
    if reference is not None and str(reference) == "init":
        _, ref_model = load_run_model(run_dir, device, trained=False)
        ref_name = "init"
    elif reference is not None:
        ref_cfg, ref_model = load_run_model(reference, device)
        if ref_cfg.data.task != cfg.data.task:
            raise ConfigError(f"reference run is on task {ref_cfg.data.task}, the attacked run on {cfg.data.task}")
        ref_seen = _private_idx(ref_cfg)
        ids_m = row_ids(members)
        ids_n = row_ids(nonmembers) if source == "train-unused" else np.array([], dtype=np.int64)
        keep_m = np.array([int(i) not in ref_seen for i in ids_m])
        keep_n = np.array([int(i) not in ref_seen for i in ids_n]) if len(ids_n) else np.ones(len(nonmembers), bool)
        k = int(min(keep_m.sum(), keep_n.sum()))
        if k < 2:
            raise ConfigError(f"the reference run {reference} trained on (nearly) all attacked examples; "
                              "use a reference whose private split is disjoint (another seed, or a public-data run)")
        dropped = int(len(ids_m) - k)
        members = members.select(np.flatnonzero(keep_m)[:k])
        nonmembers = nonmembers.select(np.flatnonzero(keep_n)[:k])
        ref_name = str(reference)
        if dropped:
            notes.append(f"{dropped} examples per side dropped: the reference run trained on them")
    pm = example_losses(model, members, bs, device)
    pn = example_losses(model, nonmembers, bs, device)
    loss_attack = attack_metrics(-pm["loss"], -pn["loss"], score="loss", n_bootstrap=n_bootstrap,
                                 confidence=confidence, seed=seed)
    cal = None
    if ref_model is not None:
        rm = example_losses(ref_model, members, bs, device)["loss"]
        rn = example_losses(ref_model, nonmembers, bs, device)["loss"]
        cal = attack_metrics(-(pm["loss"] - rm), -(pn["loss"] - rn), score="calibrated", n_bootstrap=n_bootstrap,
                             confidence=confidence, seed=seed)
    return MIAResult(
        run_id=run_dir.name, variant=cfg.variant, task=cfg.data.task, n_members=len(pm["loss"]),
        n_nonmembers=len(pn["loss"]), nonmember_source=source, loss=loss_attack, calibrated=cal,
        reference=ref_name, guarantee=ledger.get("guarantee", "?"), claimed_epsilon=ledger.get("claimed_epsilon"),
        dpsgd_part_epsilon=ledger.get("dpsgd_part_epsilon"), delta=ledger.get("delta"),
        member_accuracy=float((pm["pred"] == pm["label"]).mean()),
        nonmember_accuracy=float((pn["pred"] == pn["label"]).mean()),
        member_loss=float(pm["loss"].mean()), nonmember_loss=float(pn["loss"].mean()),
        n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, fpr_resolution=1.0 / len(pn["loss"]),
        dropped_for_reference=dropped, run_dir=str(run_dir), notes=notes,
    )


def roc_curve(run_dir: str | Path, *, max_per_side: int | None = None, seed: int = 0,
              device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) of the loss-threshold attack on a run.

    Built from the same pieces ``attack_run`` uses (same member / non-member sets for
    the same ``max_per_side`` and ``seed``), because its result keeps the metrics but
    not the per-example scores a ROC curve needs.
    """
    cfg, model = load_run_model(run_dir, device)
    members, nonmembers, _src = membership_sets(cfg, max_per_side=max_per_side, seed=seed)
    bs = cfg.train.eval_batch_size
    lm = example_losses(model, members, bs, device)["loss"]
    ln = example_losses(model, nonmembers, bs, device)["loss"]
    return roc_points(-lm, -ln)


def record_result(result: MIAResult) -> dict[str, Any] | None:
    """Add the attack's numbers as ``mia_*`` columns to the run's row of its results table.

    Why: the explorer (notebook 04) offers every ``mia_*`` column as a metric, so an
    audited sweep can plot leakage against ε next to accuracy and sharpness.
    ``mia_per_side`` (members = non-members attacked) is a count, not a metric: it sets the
    advantage's chance level (``advantage_chance_level``).
    """
    from .runs import update_result

    run_dir = Path(result.run_dir)
    cols = dict(mia_auc=result.loss.auc, mia_tpr_at_1_fpr=result.loss.tpr_at_1_fpr, mia_accuracy=result.loss.accuracy,
                mia_advantage=result.loss.advantage, mia_per_side=min(result.n_members, result.n_nonmembers))
    if result.calibrated is not None:
        cols["mia_calibrated_auc"] = result.calibrated.auc
    return update_result(run_dir.parent, run_dir.name, cols)  # the one writer of the results table


def save_result(result: MIAResult, run_dir: str | Path | None = None) -> Path:
    """Write ``mia.json`` into the run folder (atomically, through ``RunDir``)."""
    from .runs import RunDir

    return RunDir(run_dir or result.run_dir).write_mia(result.to_dict())


__all__ = [
    "AttackMetrics",
    "MIAResult",
    "advantage_chance_level",
    "attack_metrics",
    "attack_point_metrics",
    "attack_run",
    "dp_advantage_bound",
    "example_losses",
    "load_run_model",
    "membership_sets",
    "record_result",
    "roc_curve",
    "roc_points",
    "row_ids",
    "save_result",
]
