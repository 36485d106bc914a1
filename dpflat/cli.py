"""``python -m dpflat train|sweep|landscape|demo|report|tasks``: the library without a notebook.

Every config field is a flag, generated from the dataclasses so the CLI can never
drift from the config. Bad input exits with status 2 and one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import typing
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Any, Iterator, Sequence

from .config import (MAX_GRID, MODES, PRESETS, SECTIONS, VARIANTS, ConfigError, RunConfig, apply_preset,
                     apply_variant, check_device, check_variant, field_types, split_optional)

FLAG_NAME = {"enabled": "dp", "active": "blackbox"}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block of ``train`` alone is 40 lines)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(minimum: int, maximum: int | None = None):
    """argparse type: a whole number >= ``minimum`` (and <= ``maximum``), refused by name at parse time."""
    want = f"a whole number >= {minimum}" if maximum is None else f"a whole number in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    parse.__name__ = "int"
    return parse


def _flag_type(t: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) of a config field's resolved annotation."""
    base, _optional = split_optional(t)
    if typing.get_origin(base) is typing.Literal:
        return str, [str(a) for a in typing.get_args(base)]
    if base in (bool, int, float):
        return base, None
    return str, None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section; default and help come from the dataclass field."""
    for sect, klass in SECTIONS.items():
        g = p.add_argument_group(f"{sect} options")
        hints = field_types(klass)
        for f in fields(klass):
            name = FLAG_NAME.get(f.name, f.name).replace("_", "-")
            default = f.default if f.default is not MISSING else None
            t, choices = _flag_type(hints[f.name])
            h = str(f.metadata.get("help", ""))
            if "(default:" not in h:  # a help text may say what None means ("default: all") itself
                h = f"{h} (default: {default})".strip()
            if t is bool:
                # default None: only the flags a user gives override the --config file / the variant
                g.add_argument(f"--{name}", dest=f"{sect}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=h)
            else:
                g.add_argument(f"--{name}", dest=f"{sect}.{f.name}", type=t, default=None, choices=choices,
                               metavar=("{" + ",".join(choices) + "}") if choices else t.__name__.upper(), help=h)


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


def add_rng_flags(p: argparse.ArgumentParser) -> None:
    """The DP mechanism's randomness: not config fields (never in config.json or the run id)."""
    p.add_argument("--noise-seed", type=_whole(0), default=None, metavar="INT",
                   help="seed of the DP sampling and noise, for reproducible runs (default: OS entropy; keep it "
                        "secret: whoever knows it can replay the noise)")
    p.add_argument("--secure-rng", action="store_true", help="Opacus secure_mode (needs torchcsprng)")


def _parser() -> _Parser:
    p = _Parser(prog="dpflat", description="DP-Flat: differentially private prefix-tuning through flatness")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        return c

    t = command("train", "train one run (resumes an unfinished one)")
    t.add_argument("--variant", choices=list(VARIANTS), help="named preset of privacy + flattening levels")
    t.add_argument("--mode", choices=MODES, default="safe", help="mode of every level of --variant (default: safe)")
    t.add_argument("--config", help="JSON config file (flags override it)")
    t.add_argument("--preset", choices=PRESETS, help="paper: the authors' protocol (docs/PROTOCOL.md); flags override it")
    t.add_argument("--no-resume", action="store_true", help="retrain even if the run folder has a checkpoint")
    t.add_argument("--max-steps", type=_whole(1), metavar="INT",
                   help="stop after this many steps without finishing (default: train to the end)")
    add_rng_flags(t)
    add_config_flags(t)

    s = command("sweep", "variants x epsilons x seeds, skipping finished cells")
    s.add_argument("--variants", default="nonprivate,dp,dpflat",
                   help="comma-separated variants (default: nonprivate,dp,dpflat)")
    s.add_argument("--modes", default="safe", help="comma-separated modes of the flattening variants: safe,paper "
                   "(default: safe)")
    s.add_argument("--epsilons", default="3,8", help="comma-separated target ε (default: 3,8)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    s.add_argument("--config", help="JSON config file (flags override it)")
    s.add_argument("--preset", choices=PRESETS, help="paper: the authors' hyperparameters for the base config "
                   "(docs/PROTOCOL.md); each cell's variant then sets its levels")
    add_rng_flags(s)
    add_config_flags(s)

    la = command("landscape", "Hessian spectrum + 2D loss surface of a finished run")
    la.add_argument("run_dir", help="a finished run folder")
    la.add_argument("--top-k", type=_whole(1), default=3, metavar="INT", help="top Hessian eigenvalues (default: 3)")
    la.add_argument("--grid", type=_whole(3, MAX_GRID), default=21, metavar="INT",
                    help=f"points per axis of the 2D surface, at most {MAX_GRID} (default: 21)")
    la.add_argument("--span", type=float, default=1.0,
                    help="surface spans [-span, span] along each direction (default: 1.0)")
    la.add_argument("--n-examples", type=_whole(1), default=256, metavar="INT",
                    help="fixed evaluation subset size (default: 256)")
    la.add_argument("--seed", type=int, default=0, help="seed of the random directions (default: 0)")
    la.add_argument("--no-surface", action="store_true", help="skip the 2D surface")

    d = command("demo", "the main job: small sweep + landscapes + report.html (a few minutes on a CPU)")
    d.add_argument("--output-dir", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--epsilons", default="2,8", help="comma-separated target ε (default: 2,8)")
    d.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    d.add_argument("--train-size", type=_whole(1), default=1500, metavar="INT",
                   help="private training examples (default: 1500)")
    d.add_argument("--epochs", type=float, default=2.0, help="epochs per run (default: 2.0)")
    d.add_argument("--backbone", default="minilm", help="backbone (default: minilm)")
    d.add_argument("--device", default="cpu", help="cpu, cuda[:N] or mps (default: cpu)")
    d.add_argument("--data-dir", default=None, help="folder holding <task>/ files (default: $DPFLAT_DATA_DIR, ./data)")
    d.add_argument("--grid", type=_whole(3, MAX_GRID), default=9, metavar="INT",
                   help=f"points per axis of each 2D surface, at most {MAX_GRID} (default: 9)")

    r = command("report", "write report.html for the runs of an output folder")
    r.add_argument("output_dir", help="an output folder holding results.parquet")
    r.add_argument("--title", default="dpflat report", help="page title (default: dpflat report)")

    au = command("audit", "privacy evaluation of a finished run: membership inference, accountant "
                 "cross-check, optional canary audit; writes mia.json into the run folder")
    au.add_argument("run_dir", help="a finished run folder")
    au.add_argument("--reference", default="init",
                    help="calibration reference: init (the run's model before training), a run folder, or none "
                         "(default: init)")
    au.add_argument("--max-examples", type=_whole(1), default=None, metavar="INT",
                    help="members (= non-members) attacked (default: all)")
    au.add_argument("--bootstrap", type=_whole(1), default=1000, metavar="INT",
                    help="bootstrap resamples for the confidence intervals (default: 1000)")
    au.add_argument("--seed", type=int, default=0, help="seed of the attack's sampling (default: 0)")
    au.add_argument("--canaries", type=_whole(0), default=0, metavar="INT",
                    help="also run a one-run canary audit with this many canaries (retrains the run's config; "
                         "default: 0)")
    au.add_argument("--device", default="cpu", help="cpu, cuda[:N] or mps (default: cpu)")
    add_rng_flags(au)

    command("tasks", "list the registered tasks and where their data is found")
    return p


def _cmd_train(ns) -> int:
    from .sweep import trainer

    base = RunConfig.load(ns.config) if ns.config else None
    cfg = config_from_args(ns, base)
    check_variant(cfg)  # the variant goes into the run id and the table: it must say what the run computes
    res = trainer(cfg)(cfg, resume=not ns.no_resume, max_steps=ns.max_steps, noise_seed=ns.noise_seed,
                       secure_rng=ns.secure_rng)
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
        raise ConfigError(f"--epsilons and --seeds take comma-separated numbers, got {ns.epsilons!r} and "
                          f"{ns.seeds!r}") from None
    table = sweep(cfg, split(ns.variants, str), eps, seeds, split(ns.modes, str), noise_seed=ns.noise_seed,
                  secure_rng=ns.secure_rng)
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
    if not eps or not seeds:
        raise ConfigError("the demo needs at least one epsilon (--epsilons) and one seed (--seeds)")
    check_device(ns.device)
    out = run_demo(ns.output_dir, eps, seeds, train_size=ns.train_size, epochs=ns.epochs, backbone=ns.backbone,
                   device=ns.device, data_dir=ns.data_dir, grid=ns.grid)
    print(out["table"])
    print(f"report: {out['report']}  (results table: {out['results']}; {out['minutes']} min)")
    return 0


def _cmd_report(ns) -> int:
    from .report import build_report

    print(build_report(ns.output_dir, title=ns.title))
    return 0


def _finished_run(path: str) -> None:
    """A finished run folder with a readable model, or one line saying which and what to do (seconds)."""
    from .runs import RunDir

    rd = RunDir(path)
    rd.config()  # not a run folder / corrupt config.json
    if not rd.done:
        raise ConfigError(f"{rd.path} is not finished: train it first (the same train command resumes it)")
    rd.load_model_state()  # missing or cut: the same advice as `train` and `landscape`


def _cmd_audit(ns) -> int:
    from .accountants import from_ledger
    from .mia import attack_run, save_result

    check_device(ns.device)
    _finished_run(ns.run_dir)
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

        print("\n" + audit_run(ns.run_dir, canaries=ns.canaries, seed=ns.seed, noise_seed=ns.noise_seed,
                                secure_rng=ns.secure_rng).table())
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


def _message(e: BaseException) -> str:
    """One line for an error: its own first line, or what an OSError means for the user."""
    import errno

    if isinstance(e, OSError) and e.errno is not None:
        where = f" {e.filename}" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on the device writing{where}: free some space, then run the same command again"
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write{where}: {e.strerror}; choose a writable --output-dir"
        return f"{e.strerror}:{where}" if e.strerror else str(e)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _user_error(e: BaseException) -> bool:
    """Errors that are about the input (a config, a file, a folder), not a bug of ours."""
    from .runs import RunLocked

    return isinstance(e, (ValueError, OSError, RunLocked)) or type(e).__module__.startswith("dpflat")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit): unwound like Ctrl-C, so the run folder's lock
    is released and a fresh folder that did no work is removed, then one line and status 143."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (the default handler died silently with 143)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; any error is one line on stderr (``--debug``: and its traceback), status 2.

    130 after Ctrl-C (also during the first seconds of imports), 143 after SIGTERM, 1 for an
    error that is a bug of ours rather than a bad input.
    """
    with _sigterm_unwinds():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("DPFLAT_DEBUG"))
    cmd = ""
    try:
        try:
            ns = _parser().parse_args(args)
        except SystemExit as e:  # --help, or a flag argparse refused (its one line is printed)
            return e.code if isinstance(e.code, int) else 2
        cmd = ns.cmd
        quiet_libraries()
        handlers = {"train": _cmd_train, "sweep": _cmd_sweep, "landscape": _cmd_landscape, "tasks": _cmd_tasks,
                    "demo": _cmd_demo, "report": _cmd_report, "audit": _cmd_audit}
        rc = handlers[ns.cmd](ns)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at interpreter exit
        return rc
    except KeyboardInterrupt as e:
        if debug:
            import traceback

            traceback.print_exc()
        again = "; run the same command again to resume from the last checkpoint" if cmd in ("train", "sweep") else ""
        if isinstance(e, Terminated):
            print(f"dpflat: terminated (SIGTERM){again}", file=sys.stderr)
            return 143  # 128 + SIGTERM, what a shell reports for a terminated command
        print(f"dpflat: interrupted{again}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`dpflat tasks | head`): nothing to say, as `yes | head`
        try:  # Python would report the failed flush of stdout at exit: point it at /dev/null instead
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # not a real file (captured output)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off by a closed pipe
    except Exception as e:  # noqa: BLE001 - the one place where errors become a line
        if debug:
            import traceback

            traceback.print_exc()
        if _user_error(e):
            print(f"dpflat: error: {_message(e)}", file=sys.stderr)
            return 2
        print(f"dpflat: error: unexpected {type(e).__name__}: {_message(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
