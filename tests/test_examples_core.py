"""The main demo runs end to end in smoke mode and writes its plot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_moons_smoke(tmp_path: Path) -> None:
    out = tmp_path / "two_moons.png"
    metrics = load_example("two_moons").main(["--num-steps", "2", "--num-blocks", "2", "--out", str(out)])
    assert out.stat().st_size > 0
    assert math.isfinite(metrics["nll"]) and metrics["lipschitz_bound"] < 1
