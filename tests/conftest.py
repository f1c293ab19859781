"""Shared setup: one thread, deterministic seeding, marker handling and test-net factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_iresnet import LipschitzMLP, SpectralNormLinear


def pytest_configure(config: pytest.Config) -> None:
    # The tests use tiny tensors: one thread avoids oversubscribing the CI machine's two cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    run_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


def activate(module: nn.Module, scale: float = 5.0) -> nn.Module:
    """Warm-up: scale the weights up so every spectral normalisation is active (g non-trivial,
    Lip(g) close to coeff), with power iteration converged on the scaled weights."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, SpectralNormLinear):
                layer.weight.mul_(scale)
                layer._converge_power_iteration(rtol=1e-6)
    return module


def _orthonormal_columns(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, max(rows, cols), dtype=dtype))
    return q[:, :cols] if rows >= cols else torch.linalg.qr(torch.randn(cols, rows, dtype=dtype))[0].T


def make_active_mlp(dims: list[int], coeff: float, dtype: torch.dtype = torch.float64, scale: float = 5.0,
                    activation: str = "lipswish", bias: float = 1.0, aligned: bool = True) -> LipschitzMLP:
    """A LipschitzMLP whose Jacobian is far from trivial: the normalised weights chain an
    orthonormal embedding U, identities and O U^T (O a random rotation), with biases that put the
    activations near their maximal slope, so J_g(x) ~ c^L O U^T D U has a spectral norm close to
    the certified bound. The raw weights are then scaled by ``scale`` so that every normalisation
    is active, and power iteration is converged on them. ``aligned=False`` keeps the random
    initial weights instead (only scaled), which gives a much smaller Jacobian."""
    net = LipschitzMLP(dims, coeff=coeff, activation=activation).to(dtype)
    layers = [m for m in net.modules() if isinstance(m, SpectralNormLinear)]
    d_in, d_out = dims[0], dims[-1]
    embed = _orthonormal_columns(dims[1], d_in, dtype) if len(layers) > 1 else None
    rotation = _orthonormal_columns(d_out, d_out, dtype)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if not aligned:
                layer.weight.mul_(scale)
                layer._converge_power_iteration(rtol=1e-6)
                continue
            if len(layers) == 1:
                weight = _orthonormal_columns(d_out, d_in, dtype)
            elif i == 0:
                weight = embed
            elif i == len(layers) - 1:
                back = embed if dims[-2] == dims[1] else _orthonormal_columns(dims[-2], d_in, dtype)
                weight = rotation @ back.T[:d_out] if d_out <= d_in else rotation @ back.T
            else:
                weight = torch.eye(layer.out_features, layer.in_features, dtype=dtype)
            layer.weight.copy_(scale * weight)
            if i < len(layers) - 1:
                layer.bias.fill_(bias)
            layer._converge_power_iteration(rtol=1e-6)
    return net


def small_normflows_model(net: str = "ours", **options) -> nn.Module:
    """2 x [our normflows ``Residual`` (2-16-16-2, coeff 0.9), ActNorm] on a standard normal base,
    built from seed 0, over our ``LipschitzMLP`` or (``net="normflows"``) normflows' own;
    ``options`` go to ``Residual``."""
    import normflows as nf

    from pyro_iresnet.normflows import Residual

    torch.manual_seed(0)
    flows = []
    for _ in range(2):
        if net == "normflows":
            mlp = nf.nets.LipschitzMLP([2, 16, 16, 2], lipschitz_const=0.9, init_zeros=False)
        else:
            mlp = LipschitzMLP([2, 16, 16, 2], coeff=0.9)
        flows += [Residual(mlp, **options), nf.flows.ActNorm(2)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)
