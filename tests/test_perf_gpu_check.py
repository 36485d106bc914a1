"""benchmarks/gpu_check.py runs end to end in its CPU dry mode (the GPU run itself needs a GPU)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_dry_run_prints_every_row_and_writes_json(tmp_path):
    out = tmp_path / "gpu.json"
    t = time.process_time()
    text = gpu_check.main(["--device", "cpu", "--tiny", "--json", str(out)])
    cpu = time.process_time() - t
    for row in ("step: non-private", "step: DP-SGD (Opacus hooks)", "step: DP-Flat (DP + safe AWP + distill)",
                "Hessian top eigenvalue, landscape Lanczos", "Hessian top eigenvalue, PyHessian 0.1", "2D surface"):
        assert f"| {row}" in text, row
    data = json.loads(out.read_text())
    assert set(data["steps"]) == {"non-private", "DP-SGD (Opacus hooks)", "DP-Flat (DP + safe AWP + distill)"}
    hs = data["hessian_surface"]
    # the two Hessian methods agree on the dry-run model (same tolerance notion)
    assert hs["ours"]["value"] == pytest.approx(hs["pyhessian"]["value"], rel=1e-2)
    assert cpu < 20, f"dry run used {cpu:.1f} s of CPU"


def test_bad_sizes_and_missing_gpu_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse(["--device", "cpu", "--tiny", "--seq-len", "1"])
    if not gpu_check.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse(["--device", "cuda"])
    assert "error" in capsys.readouterr().err
