"""``python -m dpflat train|sweep|landscape|demo|report|tasks``: the library without a notebook.

Every config field is a flag, generated from the dataclasses so the CLI can never
drift from the config. Bad input exits with status 2 and one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from typing import Any, Sequence

from .config import MODES, PRESETS, SECTIONS, VARIANTS, ConfigError, RunConfig, apply_preset, apply_variant

# Help texts for the flags whose meaning is not obvious from the name.
HELP = {
    "task": "task name (see `python -m dpflat tasks`)",
    "data_dir": "folder holding <task>/ files; else $DPFLAT_DATA_DIR, ./data, then the HF hub",
    "max_length": "tokens per example",
    "train_size": "subsample the private training split to this many examples (0: all)",
    "eval_size": "subsample the eval split (0: all)",
    "public_size": "public split carved from train (fraction <1 or count); DP-safe flattening reads only it",
    "cache_dir": "tokenisation cache folder",
    "backbone": "minilm (shipped offline), tiny-bert, tiny-roberta, a local HF model dir, or a hub id",
    "prefix_len": "prefix length m per layer",
    "prefix_init": "random, or tokens: start from the backbone's keys/values of real tokens",
    "attn": "attention kernel; eager supports double backward (Hessians)",
    "keep_layers": "comma-separated layers that keep a prefix (default all)",
    "enabled": "train with DP-SGD (--no-dp: non-private, same loop)",
    "epsilon": "target ε (the accountant's σ is searched so that ε_spent <= target)",
    "delta": "δ (default 1/N^1.1)",
    "max_grad_norm": "per-example clipping norm C",
    "accountant": "privacy accountant",
    "grad_sample_mode": "Opacus per-example gradient mode",
    "poisson": "Poisson sampling of batches (needed for the accounting)",
    "awp": "within-layer flattening: adversarial weight perturbation on the prefixes",
    "awp_mode": "safe: direction from the previous noisy DP gradient; paper: raw private ascent (not DP)",
    "awp_gamma": "relative perturbation size per layer",
    "awp_epochs": "AWP during this many epochs (a value <1 is a fraction of training)",
    "layers": "cross-layer flattening: drop the prefixes of the sharpest layers",
    "layers_mode": "safe: sharpness on the public split; paper: on private data (not DP)",
    "n_drop": "number of layers whose prefix is removed",
    "distill": "cross-model flattening: pull the prefix toward a non-private teacher",
    "distill_mode": "safe: teacher on public data; paper: teacher on private data (not DP)",
    "distill_lambda": "weight λ of ||P - P_teacher||",
    "batch_size": "logical (expected) batch size; q = batch_size / N",
    "physical_batch_size": "largest batch held in memory at once",
    "eval_every": "evaluate every N steps (0: once per epoch)",
    "checkpoint_every": "checkpoint every N steps",
    "device": "cpu, cuda[:N] or mps",
    "output_dir": "root folder of runs and results.parquet",
    "run_name": "folder name of the run (default: variant_task_eps_seed_hash)",
    "active": "black-box path (dpflat/blackbox.py): tune a soft prompt from forward queries only (the bb-* variants set it)",
    "prompt_tokens": "black box: soft prompt length in tokens",
    "prompt_dim": "black box: dimension d of z (fixed random projection to the prompt embeddings)",
    "proj_scale": "black box: prompt shift of a unit-scale z, in word-embedding standard deviations",
    "zo_mu": "black box: SPSA perturbation size (losses at z +- mu*u)",
    "zo_lr": "black box: step size on z",
    "zo_optimizer": "black box: sgd (DPZero), adam, or cma (CMA-ES, non-private only)",
    "zo_directions": "black box: random directions per step (their k differences are clipped jointly to C)",
    "readout_template": "black box: label description for the zero-shot readout, e.g. 'a {} review'",
    "readout_scale": "black box: logit scale of the cosine readout",
    "readout_bias": "black box: z also carries a per-class logit bias of the readout",
    "prompt_lambda": "black box with --distill: λ of λ||z - z_teacher||",
}
FLAG_NAME = {"enabled": "dp", "active": "blackbox"}


def _type_of(annot: str):
    a = str(annot)
    if "bool" in a:
        return bool
    if a.startswith("int"):
        return int
    if a.startswith("float"):
        return float
    return str


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section; defaults come from the dataclasses."""
    for sect, klass in SECTIONS.items():
        g = p.add_argument_group(f"{sect} options")
        for f in fields(klass):
            name = FLAG_NAME.get(f.name, f.name).replace("_", "-")
            default = f.default if f.default is not MISSING else None
            t = _type_of(f.type)
            h = HELP.get(f.name, "")
            if t is bool:
                g.add_argument(f"--{name}", dest=f"{sect}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=f"{h} (default: {default})")
            else:
                g.add_argument(f"--{name}", dest=f"{sect}.{f.name}", type=t, default=None,
                               metavar=t.__name__.upper(), help=f"{h} (default: {default})")


def config_from_args(ns: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """Variant first, then ``--preset``, then every flag the user gave explicitly."""
    cfg = base or RunConfig()
    variant = getattr(ns, "variant", None)
    if variant:
        cfg = apply_variant(cfg, variant, getattr(ns, "mode", "safe") or "safe")
    if getattr(ns, "preset", None):
        task = getattr(ns, "data.task", None)
        if task:  # the preset's layer choice depends on the task
            cfg = cfg.replace(data={"task": task})
        cfg = apply_preset(cfg, ns.preset, choose_variant=getattr(ns, "cmd", "train") != "sweep")
    changes: dict[str, dict[str, Any]] = {}
    for key, val in vars(ns).items():
        if "." in key and val is not None:
            sect, name = key.split(".", 1)
            changes.setdefault(sect, {})[name] = val
    return cfg.replace(**changes) if changes else cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpflat", description="DP-Flat: differentially private prefix-tuning through flatness")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one run (resumes an unfinished one)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--variant", choices=list(VARIANTS), help="named preset of privacy + flattening levels")
    t.add_argument("--mode", choices=MODES, default="safe", help="mode of every level of --variant")
    t.add_argument("--config", help="JSON config file (flags override it)")
    t.add_argument("--preset", choices=PRESETS, help="paper: the authors' protocol (docs/PROTOCOL.md); flags override it")
    t.add_argument("--no-resume", action="store_true", help="retrain even if the run folder has a checkpoint")
    t.add_argument("--max-steps", type=int, help="stop after this many steps without finishing")
    add_config_flags(t)

    s = sub.add_parser("sweep", help="variants x epsilons x seeds, skipping finished cells")
    s.add_argument("--variants", default="nonprivate,dp,dpflat", help="comma-separated variants")
    s.add_argument("--modes", default="safe", help="comma-separated modes for flattening variants (safe,paper)")
    s.add_argument("--epsilons", default="3,8", help="comma-separated target ε")
    s.add_argument("--seeds", default="0", help="comma-separated seeds")
    s.add_argument("--config", help="JSON config file (flags override it)")
    s.add_argument("--preset", choices=PRESETS, help="paper: the authors' hyperparameters for the base config "
                   "(docs/PROTOCOL.md); each cell's variant then sets its levels")
    add_config_flags(s)

    la = sub.add_parser("landscape", help="Hessian spectrum + 2D loss surface of a finished run")
    la.add_argument("run_dir")
    la.add_argument("--top-k", type=int, default=3)
    la.add_argument("--grid", type=int, default=21, help="points per axis of the 2D surface")
    la.add_argument("--span", type=float, default=1.0, help="surface spans [-span, span] along each direction")
    la.add_argument("--n-examples", type=int, default=256, help="fixed evaluation subset size")
    la.add_argument("--seed", type=int, default=0)
    la.add_argument("--no-surface", action="store_true")

    d = sub.add_parser("demo", help="the main job: small sweep + landscapes + report.html (a few minutes on a CPU)")
    d.add_argument("--output-dir", default="out/demo")
    d.add_argument("--epsilons", default="2,8", help="comma-separated target ε")
    d.add_argument("--seeds", default="0", help="comma-separated seeds")
    d.add_argument("--train-size", type=int, default=1500, help="private training examples")
    d.add_argument("--epochs", type=float, default=2.0)
    d.add_argument("--backbone", default="minilm")
    d.add_argument("--device", default="cpu")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--grid", type=int, default=9, help="points per axis of each 2D surface")

    r = sub.add_parser("report", help="write report.html for the runs of an output folder")
    r.add_argument("output_dir")
    r.add_argument("--title", default="dpflat report")

    au = sub.add_parser("audit", help="privacy evaluation of a finished run: membership inference, accountant "
                        "cross-check, optional canary audit; writes mia.json into the run folder")
    au.add_argument("run_dir")
    au.add_argument("--reference", default="init",
                    help="calibration reference: init (the run's model before training), a run folder, or none")
    au.add_argument("--max-examples", type=int, default=None, help="members (= non-members) attacked; default all")
    au.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--canaries", type=int, default=0,
                    help="also run a one-run canary audit with this many canaries (retrains the run's config)")
    au.add_argument("--device", default="cpu")

    sub.add_parser("tasks", help="list the registered tasks and where their data is found")
    return p


def _cmd_train(ns) -> int:
    from .sweep import trainer

    base = RunConfig.load(ns.config) if ns.config else None
    cfg = config_from_args(ns, base)
    res = trainer(cfg)(cfg, resume=not ns.no_resume, max_steps=ns.max_steps)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the row: print it once
        print(json.dumps({k: v for k, v in res.items() if k != "info"}, default=str, ensure_ascii=False))
    return 0


def _cmd_sweep(ns) -> int:
    from .sweep import sweep

    base = RunConfig.load(ns.config) if ns.config else None
    cfg = config_from_args(ns, base)
    split = lambda s, f: [f(x) for x in str(s).split(",") if x.strip()]  # noqa: E731
    try:
        eps = split(ns.epsilons, float)
        seeds = split(ns.seeds, int)
    except ValueError:
        raise ConfigError("--epsilons and --seeds take comma-separated numbers") from None
    table = sweep(cfg, split(ns.variants, str), eps, seeds, split(ns.modes, str))
    print(table.to_string(index=False))
    return 0


def _cmd_landscape(ns) -> int:
    from .analysis import analyze_run

    out = analyze_run(ns.run_dir, top_k=ns.top_k, grid=ns.grid, span=ns.span, n_examples=ns.n_examples,
                      seed=ns.seed, surface=not ns.no_surface)
    print(json.dumps(out, default=str, ensure_ascii=False))
    return 0


def _cmd_demo(ns) -> int:
    from .demo import run_demo

    split = lambda s, f: tuple(f(x) for x in str(s).split(",") if x.strip())  # noqa: E731
    try:
        eps, seeds = split(ns.epsilons, float), split(ns.seeds, int)
    except ValueError:
        raise ConfigError("--epsilons and --seeds take comma-separated numbers") from None
    out = run_demo(ns.output_dir, eps, seeds, train_size=ns.train_size, epochs=ns.epochs, backbone=ns.backbone,
                   device=ns.device, data_dir=ns.data_dir, grid=ns.grid)
    print(out["table"])
    print(f"report: {out['report']}  (results table: {out['results']}; {out['minutes']} min)")
    return 0


def _cmd_report(ns) -> int:
    from .report import build_report

    print(build_report(ns.output_dir, title=ns.title))
    return 0


def _cmd_audit(ns) -> int:
    from .accountants import from_ledger
    from .mia import attack_run, save_result

    ref = None if str(ns.reference).lower() == "none" else ns.reference
    res = attack_run(ns.run_dir, reference=ref, max_per_side=ns.max_examples, n_bootstrap=ns.bootstrap,
                     seed=ns.seed, device=ns.device)
    path = save_result(res)
    print(res.table())
    try:
        print("\naccountants (same q, σ, steps, δ):\n" + from_ledger(ns.run_dir).table())
    except ValueError as e:  # non-private run: no mechanism to account
        print(f"\naccountants: {e}")
    if ns.canaries:
        from .audit import audit_run

        print("\n" + audit_run(ns.run_dir, canaries=ns.canaries, seed=ns.seed).table())
    print(f"\nwrote {path}")
    return 0


def _cmd_tasks(ns) -> int:
    from . import data

    for name, card in data.TASKS.items():
        where = data.resolve_data_dir(card)
        print(f"{name:10s} labels={len(card.labels)} metric={card.metric:9s} data={where or 'hub: ' + str(card.hub)}")
    return 0


def quiet_libraries() -> None:
    """Our own progress bar shows training; the libraries' loading bars are noise here."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    quiet_libraries()
    from .data import DataError
    from .models import ModelError
    from .runs import RunLocked

    handlers = {"train": _cmd_train, "sweep": _cmd_sweep, "landscape": _cmd_landscape, "tasks": _cmd_tasks,
                "demo": _cmd_demo, "report": _cmd_report, "audit": _cmd_audit}
    try:
        return handlers[ns.cmd](ns)
    except (ConfigError, DataError, ModelError, FileExistsError, FileNotFoundError, RunLocked) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dpflat: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpflat: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
