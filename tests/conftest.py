"""Shared fixtures: deterministic seeding, dtype/device options and small factories."""

from __future__ import annotations

import pytest
import torch

from pyro_iresnet import LipschitzMLP, SpectralNormLinear


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for device-parametrised tests")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    run_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


def make_active_mlp(dims: list[int], coeff: float, dtype: torch.dtype = torch.float64, scale: float = 5.0,
                    activation: str = "lipswish") -> LipschitzMLP:
    """A LipschitzMLP whose weights were scaled up so that every normalisation is active, with
    power iteration converged on the scaled weights."""
    net = LipschitzMLP(dims, coeff=coeff, activation=activation).to(dtype)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, SpectralNormLinear):
                layer.weight.mul_(scale)
                layer._converge_power_iteration(rtol=1e-6)
    return net
