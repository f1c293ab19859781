"""Smoke test of the normflows example (``--num-steps 2``): it trains, plots and reports a finite
held-out NLL."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "normflows_two_moons.py"


@pytest.mark.parametrize("net", ["ours", "normflows"])
def test_normflows_two_moons_smoke(tmp_path: Path, net: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--num-steps", "2", "--num-blocks", "2", "--num-test", "500",
         "--net", net, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"held-out NLL \(exact log-det\): (\S+)", result.stdout)
    assert match is not None, result.stdout
    assert math.isfinite(float(match.group(1)))
    assert (tmp_path / "normflows_two_moons.png").stat().st_size > 0


def test_normflows_two_moons_refuses_zero_steps(tmp_path: Path) -> None:
    """With no training step the first forward, which initialises ActNorm, would be on test data."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--num-steps", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2 and "--num-steps must be >= 1, got 0" in result.stderr
