"""A finished black-box run rebuilt, and its sharpness in prompt space (by the ``landscape`` tools)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..runs import RunDir
from ..session import prepare_data
from .box import PromptModel, build_prompt_model
from .zo import prompt_loss
from .zo import take_rows


@dataclass
class LoadedPromptRun:
    """A finished black-box run rebuilt: the prompt model at its selected z, and its data."""

    run_dir: Path
    cfg: RunConfig
    model: PromptModel
    card: Any
    data: dict[str, Any]
    result: dict[str, Any]


def load_prompt_run(run_dir: str | Path, device: str = "cpu") -> LoadedPromptRun:
    """Rebuild a finished black-box run (A and P0 are regenerated from the run seed)."""
    rd = RunDir(run_dir)
    if not rd.config_file.exists():
        raise FileNotFoundError(f"{rd.path} is not a run folder (no config.json)")
    if not rd.done or not rd.model_file.exists():
        raise ConfigError(f"{rd.path} is not finished: train it first (the same train command resumes it)")
    cfg = rd.config()
    if not cfg.blackbox.active:
        raise ConfigError(f"{rd.path} is a white-box run: use dpflat.analysis.load_run")
    card, _splits, tokd = prepare_data(cfg)
    model = build_prompt_model(cfg, card, device=device)
    model.z.data.copy_(rd.load_model_state()["z"])
    return LoadedPromptRun(rd.path, cfg, model, card, tokd, rd.result())


def prompt_batches(dataset, n_examples: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """A fixed list of batches of the first ``n_examples`` of ``dataset`` (the landscape's data)."""
    n = min(int(n_examples), len(dataset))
    return [take_rows(dataset, torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def prompt_sharpness(run: LoadedPromptRun | str | Path, *, n_examples: int = 128, rho: float = 1.0,
                     sam_steps: int = 1, n_random: int = 4, grid: int = 0, span: float = 2.0,
                     grad_directions: int = 16, seed: int = 0) -> dict[str, Any]:
    """Sharpness of a black-box run in prompt space, by the ``landscape`` tools.

    Data: the run's eval split (first ``n_examples``), as ``dpflat.analysis`` does for
    white-box runs, so the numbers cost no privacy. ``rho`` is an absolute radius in z
    (z has ``prompt_dim`` coordinates of order 1). Returns SAM sharpness (ascent along
    the SPSA gradient estimate of ``grad_directions`` directions), the random-direction
    indicator (losses only), and with ``grid > 1`` a 2D surface over two random unit
    directions spanning ``[-span, span]``.
    """
    import landscape as ls

    lr_ = run if isinstance(run, LoadedPromptRun) else load_prompt_run(run)
    m = lr_.model
    m.grad_directions, m.grad_seed = grad_directions, seed
    bl = prompt_batches(lr_.data["eval"], n_examples)
    sam = ls.sam_sharpness(m, prompt_loss, bl, rho=rho, steps=sam_steps, seed=seed)
    ind = ls.prefix_indicator(m, prompt_loss, bl, rho=rho, n_random=n_random, use_gradient=False, seed=seed)
    out: dict[str, Any] = {"run_id": lr_.run_dir.name, "variant": lr_.result.get("variant"),
                           "target_epsilon": lr_.result.get("target_epsilon"), "epsilon": lr_.result.get("epsilon"),
                           "guarantee": lr_.result.get("guarantee"), "accuracy": lr_.result.get("accuracy"),
                           "prompt_sam_sharpness": sam.value, "prompt_indicator": ind.value,
                           "prompt_loss": sam.base_loss, "z_norm": float(m.z.detach().norm()), "rho": rho,
                           "n_examples": sum(len(b["labels"]) for b in bl)}
    if grid > 1:
        d1 = ls.random_direction(m, seed=seed, norm="unit", ignore_1d=False)
        d2 = ls.random_direction(m, seed=seed + 1, norm="unit", ignore_1d=False)
        xs = np.linspace(-span, span, grid)
        out["surface"] = ls.loss_surface_2d(m, prompt_loss, bl, d1, d2, xs=xs, progress=False,
                                            label=str(lr_.result.get("variant")))
    return out


__all__ = ["LoadedPromptRun", "load_prompt_run", "prompt_batches", "prompt_sharpness"]
