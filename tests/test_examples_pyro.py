"""Smoke runs of the Pyro examples and the GPU check (``--num-steps 2``, tiny sizes, in-process)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(relative: str) -> ModuleType:
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyro_density_2d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load("examples/pyro_density_2d.py")
    table = example.main([
        "--num-steps", "2", "--batch-size", "64", "--blocks", "2", "--spline-layers", "1", "--hidden", "16",
        "--n-test", "200", "--n-plot", "300", "--grid", "16", "--out", str(tmp_path),
    ])
    assert set(table) == {"moons", "8gaussians", "checkerboard"}
    for row in table.values():
        assert all(math.isfinite(value) for value in row.values())
        assert row["iresnet_lip"] < 1.0
    assert (tmp_path / "pyro_density_2d.png").stat().st_size > 0
    assert "held-out NLL" in capsys.readouterr().out


def test_pyro_vi(capsys: pytest.CaptureFixture[str]) -> None:
    example = load("examples/pyro_vi.py")
    table = example.main([
        "--num-steps", "2", "--blocks", "2", "--hidden", "16", "--train-particles", "1",
        "--num-particles", "1000",
    ])
    guides = ("i-ResNet", "AutoNormal", "AutoIAFNormal")
    assert set(table) == {(m, g) for m in ("funnel", "logistic") for g in guides}
    for row in table.values():
        assert math.isfinite(row["elbo"]) and row["ms_per_step"] > 0
    assert all(table[m, "i-ResNet"]["max_lip"] < 1.0 for m in ("funnel", "logistic"))
    # the funnel is normalised: every ELBO is a lower bound of log Z = 0 (up to Monte Carlo error)
    assert all(row["elbo"] < 0.5 for (model, _), row in table.items() if model == "funnel")
    assert "final ELBO" in capsys.readouterr().out


def test_gpu_check(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("benchmarks/gpu_check.py")
    assert bench.main(["--num-steps", "2", "--n-data", "100", "--hidden", "16", "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "steps/s" in out
    else:
        assert "no CUDA device" in out
