"""The main job (`make demo`): a small sweep, its landscapes, and one HTML report.

Sized for a 2-core CPU in under 10 minutes: MiniLM-L6 (shipped offline), SST-2, 1500
private examples, nonprivate / dp / dpflat (safe mode) at two ε. Every step is cached
(finished runs and analyses are skipped), so an interrupted demo picks up where it
stopped. On a GPU, pass larger sizes (``--train-size``, ``--epochs``, ``--device cuda``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import DataConfig, FlatConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig


# Few Hessian-vector products: the demo's budget is minutes on 2 CPU cores; the trace
# and density are rough at this size (their settings are stored with each result).
TRACE_MATVECS = 6
DENSITY_ITER = 12


def demo_config(output_dir: str, train_size: int = 1500, epochs: float = 2.0, backbone: str = "minilm",
                device: str = "cpu", data_dir: str | None = None) -> RunConfig:
    """The demo's base config (variants and ε are applied by the sweep)."""
    return RunConfig(
        data=DataConfig(task="sst2", data_dir=data_dir, max_length=48, train_size=train_size, eval_size=256,
                        public_size=256),
        model=ModelConfig(backbone=backbone, prefix_len=16),
        privacy=PrivacyConfig(max_grad_norm=1.0),
        flat=FlatConfig(n_drop=2, layers_warmup_steps=4, layers_examples=32, layers_directions=1,
                        teacher_epochs=1.0),
        train=TrainConfig(epochs=epochs, batch_size=128, physical_batch_size=64, lr=2e-2, output_dir=output_dir,
                          eval_every=0, checkpoint_every=4, device=device, progress=False),
    )


def run_demo(output_dir: str = "out/demo", epsilons: tuple[float, ...] = (2.0, 8.0), seeds: tuple[int, ...] = (0,),
             variants: tuple[str, ...] = ("nonprivate", "dp", "dpflat"), train_size: int = 1500, epochs: float = 2.0,
             backbone: str = "minilm", device: str = "cpu", data_dir: str | None = None, grid: int = 9,
             n_examples: int = 32, progress: bool = True) -> dict[str, Any]:
    """Sweep -> landscape analysis of each run -> report.html; returns paths and the summary."""
    from .analysis import analyze_run
    from .report import build_report
    from .sweep import markdown, summarize, sweep

    t0 = time.time()
    base = demo_config(output_dir, train_size, epochs, backbone, device, data_dir)
    table = sweep(base, list(variants), list(epsilons), list(seeds), ["safe"], progress=progress)
    for row in tqdm(table.to_dict("records"), desc="landscapes", disable=not progress):
        analyze_run(row["run_dir"], top_k=2, grid=grid, span=1.0, n_examples=n_examples, trace_matvecs=TRACE_MATVECS,
                    density_iter=DENSITY_ITER, progress=False)
    t_runs = time.time() - t0
    notes = [
        f"SST-2, backbone {backbone}, {train_size} private training examples, {epochs:g} epochs, batch 128, "
        f"prefix length 16; variants {', '.join(variants)} (flattening in DP-safe mode) at ε ∈ {list(epsilons)}, "
        f"seeds {list(seeds)}.",
        f"Landscapes on the first {n_examples} eval examples over the trainable parameters (prefix + head): "
        f"Lanczos top-2, Hutch++ trace ({TRACE_MATVECS} HVPs), SLQ density ({DENSITY_ITER} steps), SAM sharpness (ρ=0.05·‖θ‖, 3 ascent steps), "
        f"{grid}x{grid} surface along two filter-normalised random directions.",
        f"Produced by `python -m dpflat demo` in {t_runs / 60:.1f} min.",
    ]
    report = build_report(output_dir, title="dpflat demo: sharpness against ε", notes=notes)
    summary = summarize(table)
    return {"report": str(report), "results": str(Path(output_dir) / "results.parquet"),
            "minutes": round((time.time() - t0) / 60, 2), "table": markdown(summary)}


__all__ = ["demo_config", "run_demo"]
