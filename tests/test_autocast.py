"""Blocks inside an autocast region run in their parameters' precision.

Autocast is switched off within each block call and floating inputs of another dtype are cast to
the parameters' dtype, so values and gradients equal those outside autocast. Before, the fused path
raised a dtype mismatch, and the generic path ran its matmuls in bfloat16, where the float32
inverse tolerance is out of reach (the solve ran to ``max_iter`` and warned).
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_iresnet import LipschitzMLP, ResidualBlock, conditional_iresnet, iresnet
from tests.conftest import small_normflows_model

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}
DATA = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))


def _both(run) -> None:
    """``run(autocast)`` from the same seed outside and inside autocast; its tensors agree exactly
    in value and dtype."""
    torch.manual_seed(5)
    plain = run(False)
    torch.manual_seed(5)
    cast = run(True)
    assert len(plain) == len(cast) > 1
    for a, b in zip(plain, cast):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, atol=0, rtol=0)


@pytest.mark.parametrize("options", [{}, {"fused": False}, {"logdet": "exact"}, {"net": "normflows"}],
                         ids=["fused", "generic", "exact", "fused-normflows-net"])
def test_normflows_training_and_sampling(options):
    def run(autocast):
        model = small_normflows_model(**options).train()
        with torch.autocast(**AUTOCAST, enabled=autocast):
            loss = model.forward_kld(DATA)
        loss.backward()
        model.eval()
        with torch.no_grad(), torch.autocast(**AUTOCAST, enabled=autocast):
            z, log_q = model.sample(16)
        return [loss.detach(), *(p.grad for p in model.parameters() if p.grad is not None), z, log_q]

    _both(run)


def test_pyro_log_prob_and_rsample():
    def run(autocast):
        torch.manual_seed(0)
        blocks = [iresnet(2, hidden_dims=[16]) for _ in range(2)]
        base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        density = dist.TransformedDistribution(base, [dist.transforms.ComposeTransform(blocks).inv])
        sampler = dist.TransformedDistribution(base, blocks)
        with torch.autocast(**AUTOCAST, enabled=autocast):
            loss = -density.log_prob(DATA).mean() + sampler.log_prob(sampler.rsample((8,))).mean()
        loss.backward()
        return [loss.detach(), *(p.grad for b in blocks for p in b.parameters())]

    _both(run)


def test_lower_precision_inputs_and_context_are_cast():
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2]), logdet="exact")
    x = DATA[:4].bfloat16()
    with torch.autocast(**AUTOCAST):
        y, logdet = block.forward_and_logdet(x)
        x_back = block.inverse(y=y.bfloat16())  # keyword arguments are cast too
    y_ref, logdet_ref = block.forward_and_logdet(x.float())
    assert y.dtype == logdet.dtype == x_back.dtype == torch.float32
    torch.testing.assert_close((y, logdet), (y_ref, logdet_ref), atol=0, rtol=0)
    torch.testing.assert_close(x_back, block.inverse(y.bfloat16().float()), atol=0, rtol=0)

    transform = conditional_iresnet(2, 3, logdet="exact")
    context = torch.randn(4, 3).bfloat16()
    with torch.autocast(**AUTOCAST):
        y = transform.condition(context)(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, transform.condition(context.float())(x.float()), atol=0, rtol=0)


def test_outside_autocast_a_dtype_mismatch_still_raises():
    block = ResidualBlock(LipschitzMLP([2, 8, 2]))
    with pytest.raises(TypeError, match="dtype torch.bfloat16 but the block's parameters are torch.float32"):
        block(DATA.bfloat16())


def test_normflows_own_nets_refresh_their_power_iteration_outside_autocast(monkeypatch):
    """With normflows' ``LipschitzMLP`` the layer refreshes normflows' power iteration before the
    block runs (``compute_weight(update=True)``); that refresh runs with autocast off too (CPU
    autocast leaves its matrix-vector products in float32 anyway, CUDA's would not), and the
    results equal those outside autocast."""
    import normflows as nf

    from pyro_iresnet.normflows import Residual

    autocast_during_refresh = []
    compute_weight = nf.nets.lipschitz.InducedNormLinear.compute_weight

    def recording(layer, *args, **kwargs):
        autocast_during_refresh.append(torch.is_autocast_enabled("cpu"))
        return compute_weight(layer, *args, **kwargs)

    monkeypatch.setattr(nf.nets.lipschitz.InducedNormLinear, "compute_weight", recording)

    def run(autocast):
        torch.manual_seed(0)
        layer = Residual(nf.nets.LipschitzMLP([2, 16, 16, 2], init_zeros=False), logdet="exact")
        with torch.autocast(**AUTOCAST, enabled=autocast):
            z, log_det = layer.inverse(DATA)
        log_det.sum().backward()
        return [z.detach(), log_det.detach(), *(b.clone() for b in layer.buffers()),
                *(p.grad for p in layer.parameters() if p.grad is not None)]

    _both(run)
    assert autocast_during_refresh and not any(autocast_during_refresh)


def test_only_lower_precision_inputs_are_cast():
    """Autocast leaves float64 alone, and so does the block: a float64 input to a float32 block
    still raises inside autocast."""
    block = ResidualBlock(LipschitzMLP([2, 8, 2]))
    with torch.autocast(**AUTOCAST), pytest.raises(TypeError, match="dtype torch.float64"):
        block(DATA.double())


def test_autocast_query_on_a_device_type_without_autocast() -> None:
    """torch's ``is_autocast_enabled`` raises for device types without autocast (``meta``, ``lazy``);
    the blocks' query treats them as not autocast, so calls on such tensors do not fail there."""
    from pyro_iresnet.block import _autocast_enabled

    with pytest.raises(RuntimeError):
        torch.is_autocast_enabled("meta")
    assert _autocast_enabled("meta") is False and _autocast_enabled("cpu") is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_enabled("cpu") is True
