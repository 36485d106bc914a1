"""What every notebook's first cells share: sizes, folders, the run config, a set-up status line.

Why one place: the six lessons share one run cache, so a run is reused only when its
config is identical; one preset name and one config builder keep them in step.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig


def project_root() -> Path:
    """The checkout that holds this package (editable install), else the working dir."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


# The lessons' sizes. "quick": the default path of every notebook in <= 10 min on 2 CPU cores
# (benchmarks/bench_notebooks.py measures it); "full": the earlier CPU setting (2-4x longer,
# smaller run-to-run noise). A notebook parameter left at None takes its value from here;
# the paper's GPU scale is in each parameters cell. Sharpness trajectories are on in both,
# on the public split (a diagnostic: the private split is never read for it).
SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(train_size=1000, eval_size=300, public_size=200, max_length=32, prefix_len=8, epochs=2.0,
                  batch_size=64, physical_batch_size=64, lr=0.05,
                  flat={"layers_warmup_steps": 8, "layers_examples": 64, "layers_directions": 1,
                        "teacher_epochs": 2.0},
                  sharpness_every=8, sharpness_examples=32),
    "full": dict(train_size=2000, eval_size=500, public_size=0.1, max_length=40, prefix_len=16, epochs=2.0,
                 batch_size=128, physical_batch_size=64, lr=0.02, flat={}, sharpness_every=8, sharpness_examples=64),
}


def sized(size: str, **given: Any) -> dict[str, Any]:
    """The size preset with every parameter the notebook gave (not None) on top.

    Why None means "from the preset": the lessons share one run cache, so a run is reused
    only when its config is identical; one preset name keeps the six notebooks in step.
    """
    if size not in SIZES:
        raise LessonInputError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    out = dict(SIZES[size])
    for k, v in given.items():
        if v is None:
            continue
        out[k] = ({**out.get("flat", {}), **v} if k == "flat" else v)
    return out


def default_out_dir(size: str) -> str:
    """One folder per size, shared by all six notebooks (their one run cache)."""
    return f"out/notebooks/{size}"


#: the data folder's environment variable (``dpflat.data`` searches it after an explicit data_dir)
DATA_ENV = "DPFLAT_DATA_DIR"


class LessonInputError(ConfigError):
    """A lesson parameter that cannot work (a missing data folder, an unknown size).

    Shown in a notebook as its one line, without a traceback (IPython prints what
    ``_render_traceback_`` returns): the line says what was tried and what to change.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def resolve_folder(path: str | Path, what: str) -> Path:
    """``path`` as an absolute folder: a relative one is taken from the project root; one that is not a
    folder is refused in one line that names the absolute path tried."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = project_root() / p
    p = Path(os.path.normpath(p))
    if not p.is_dir():
        raise LessonInputError(f"{what}: no such folder {p} (a relative path is taken from the project root "
                               f"{project_root()}); give an absolute path or fix the name")
    return p


def setup_notebook(out_dir: str | Path | None, data_dir: str | Path | None = None, threads: int | None = None,
                   size: str = "quick") -> tuple[Path, str | None]:
    """Quiet library logs, set torch's threads, resolve the output and data folders.

    A relative ``out_dir`` is taken from the project root, so runs land in
    ``out/notebooks/NN`` whether Jupyter was started in the repo, in ``notebooks/`` or in
    the lab's working copy (``make lab``). So is a relative ``data_dir`` or ``$DPFLAT_DATA_DIR``
    (the kernel's working folder is the notebook's, where ``../shared/data`` means something
    else): a folder that is not there stops the lesson with one line naming the absolute path
    tried. With no ``data_dir`` and no ``$DPFLAT_DATA_DIR``, the offline data beside the
    checkout (``../shared/data``, as the Makefile uses) is picked when it exists.
    """
    from ..cli import quiet_libraries

    if size not in SIZES:
        raise LessonInputError(f"size must be one of {', '.join(SIZES)}, got {size!r}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    # Opacus' RDP hint that a larger order could tighten ε: true, repeated per call, not a lesson
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    out = Path(out_dir if out_dir is not None else default_out_dir(size)).expanduser()
    if not out.is_absolute():
        out = project_root() / out
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        data_dir = resolve_folder(data_dir, "data_dir")
    env = os.environ.get(DATA_ENV)
    if env:
        os.environ[DATA_ENV] = str(resolve_folder(env, f"${DATA_ENV}={env}"))
    if data_dir is None and not os.environ.get(DATA_ENV):
        beside = project_root().parent / "shared" / "data"
        if (beside / "MANIFEST.txt").is_file():
            data_dir = beside
    return out, (str(data_dir) if data_dir is not None else None)


def base_config(*, out_dir: str | Path, backbone: str = "minilm", task: str = "sst2", data_dir: str | None = None,
                size: str | None = None, train_size: int | None = 2000, eval_size: int | None = 500,
                public_size: float = 0.1, max_length: int = 40, prefix_len: int = 16, epochs: float = 2.0,
                batch_size: int = 128, physical_batch_size: int = 64, lr: float = 2e-2, epsilon: float = 3.0,
                seed: int = 0, device: str = "cpu", progress: bool = True, flat: Mapping[str, Any] | None = None,
                **train_extra: Any) -> RunConfig:
    """The notebooks' shared run config, from their ``parameters`` cell (one place, one meaning).

    With ``size`` ("quick" or "full", see :data:`SIZES`) every parameter passed as None
    takes the preset's value; ``train_size=0`` means all of the private split.
    """
    from ..config import DataConfig, ModelConfig, PrivacyConfig, TrainConfig

    if size is not None:
        given = dict(train_size=train_size, eval_size=eval_size, public_size=public_size, max_length=max_length,
                     prefix_len=prefix_len, epochs=epochs, batch_size=batch_size,
                     physical_batch_size=physical_batch_size, lr=lr, flat=flat, **train_extra)
        p = sized(size, **given)
        train_size, eval_size, public_size = p.pop("train_size"), p.pop("eval_size"), p.pop("public_size")
        max_length, prefix_len, epochs = p.pop("max_length"), p.pop("prefix_len"), p.pop("epochs")
        batch_size, physical_batch_size, lr = p.pop("batch_size"), p.pop("physical_batch_size"), p.pop("lr")
        flat = p.pop("flat")
        train_extra = p

    try:
        cfg = RunConfig(
            data=DataConfig(task=task, data_dir=data_dir, max_length=max_length, train_size=train_size,
                            eval_size=eval_size, public_size=public_size),
            model=ModelConfig(backbone=backbone, prefix_len=prefix_len),
            privacy=PrivacyConfig(epsilon=epsilon),
            train=TrainConfig(epochs=epochs, batch_size=batch_size, physical_batch_size=physical_batch_size, lr=lr,
                              seed=seed, device=device, output_dir=str(out_dir), progress=progress, **train_extra),
            variant="dp",
        )
        return cfg.replace(flat=dict(flat)) if flat else cfg
    except LessonInputError:
        raise
    except ConfigError as e:  # a parameter of the lesson's first cell: its one line, no traceback
        raise LessonInputError(str(e)) from None


# What each slow step before a run's first training step is doing (the training loop's own
# bar starts only after them): the phase the library names (``session.PhaseCallback``) -> its line.
SETUP_PHASES = {
    "data": "loading and tokenising the data",
    "layers": "cross-layer level: warming up a prefix and scoring each layer's sharpness on the public split",
    "distill": "cross-model level: training the teacher on the public split",
    "awp": "within-layer level: setting up",
    "trajectory": "sharpness trajectory: preparing its public/eval batches",
    "training": "training (the run's own progress bar)",
}


class StatusLine:
    """One live line (tqdm: text and elapsed time) that says what a long cell is doing now.

    ``set(text)`` changes the text and restarts the clock; a small thread refreshes the
    elapsed time every second, so a phase of several minutes never looks hung. Disabled
    (``enabled=False``: tests, ``progress=False``) it only records the texts it was given.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.phase = ""
        self.phases: list[tuple[str, float]] = []  # (phase, seconds), for tests and summaries
        self.texts: list[str] = []  # every text set, in order
        self._bar = None
        self._stop = None

    def set(self, phase: str) -> None:
        """Show ``phase`` from now on (its clock starts at 0)."""
        import time

        self.phase = phase
        self.texts.append(phase)
        self._t0 = time.monotonic()
        if self._bar is not None:
            self._bar.reset()
            self._bar.set_description_str(phase, refresh=True)

    def __enter__(self):
        import threading

        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, bar_format="{desc} · {elapsed}", leave=False)
            self._stop = threading.Event()

            def tick() -> None:
                while not self._stop.wait(1.0):
                    self._bar.refresh()

            threading.Thread(target=tick, daemon=True).start()
        self.set("starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._bar is not None:
            self._bar.close()


class SetupStatus(StatusLine):
    """A live status line (tqdm, elapsed seconds) for the set-up phases of ``train``/``sweep``.

    Why here and not in the levels: the levels' code stays free of display concerns. The
    library names each phase as it begins (``on_phase=``, a ``session.PhaseCallback`` that
    ``train``, ``sweep`` and the black-box loop take); pass this line's :meth:`on_phase`::

        with SetupStatus(enabled=progress) as status:
            sweep(base, variants, epsilons, seeds, on_phase=status.on_phase)

    ``phases`` records (line, seconds) of every set-up phase that ended.
    """

    def __init__(self, enabled: bool = True):
        super().__init__(enabled)
        self._current: str | None = None

    def on_phase(self, name: str) -> None:
        """The library's callback: phase ``name`` begins (the one before it ended)."""
        import time

        self._close_phase(time.monotonic())
        self._current = None if name == "training" else name
        self.set(SETUP_PHASES.get(name, f"{name}: setting up"))

    def _close_phase(self, now: float) -> None:
        if self._current is not None:
            self.phases.append((SETUP_PHASES.get(self._current, self._current), now - self._t0))
            self._current = None

    def __exit__(self, *exc: Any) -> None:
        import time

        self._close_phase(time.monotonic())
        super().__exit__(*exc)


def train_run(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    """The run's loop (``dpflat.sweep.trainer``, the one dispatcher) with a status line for every
    set-up step (see :class:`SetupStatus`)."""
    from ..sweep import trainer

    with SetupStatus(enabled=cfg.train.progress) as status:
        return trainer(cfg)(cfg, on_phase=status.on_phase, **kw)

