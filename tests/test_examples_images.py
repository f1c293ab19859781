"""Smoke tests: the digits examples run end to end with tiny settings and write their outputs.

They run in-process (``main(argv)``) to skip a second interpreter start-up.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # the examples set their own
    yield
    torch.set_num_threads(threads)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")  # inside normflows' Glow
def test_digits_density_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = load_example("digits_density").main([
        "--num-steps", "2", "--hidden", "4", "--blocks", "1", "--repeats", "1",
        "--max-test", "16", "--num-samples", "4", "--out", str(tmp_path),
    ])
    out = capsys.readouterr().out
    assert "i-ResNet (pyro_iresnet)" in out and "Glow (normflows)" in out and "bits/dim" in out
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["results"] == results
    for r in results.values():
        assert 0.0 < r["test_bpd"] < 10.0 and r["test_bpd_se"] >= 0.0


def test_digits_classify_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = load_example("digits_classify").main([
        "--num-steps", "2", "--hidden", "4", "--channels", "8", "--blocks", "1", "--out", str(tmp_path),
    ])
    out = capsys.readouterr().out
    assert "i-ResNet" in out and "ResNet" in out and "max |x - f^-1(f(x))|" in out
    assert json.loads((tmp_path / "results.json").read_text())["results"] == results
    assert results["i-ResNet"]["reconstruction_max_abs_error"] < 1e-4
    assert results["i-ResNet"]["padding_max_abs"] < 1e-4
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in results.values())
