"""Models that contain our blocks under ``torch.compile``: the same values and gradients as eager.

The blocks run eagerly inside a compiled function (each public method of ``ResidualBlock`` is a
graph break), so compiling a whole Pyro or normflows model works; without that, tracing them failed
(the fused path's scratch store, autograd's double backward of the series estimators) or, for the
conditional transform, silently gave different gradients. ``aot_eager`` traces and runs the graphs
as inductor would see them without needing a C++ compiler; one inductor test runs where one is
installed.
"""

from __future__ import annotations

import shutil

import pyro.distributions as dist
import pytest
import torch

from pyro_iresnet import conditional_iresnet, iresnet, multiscale_iresnet
from tests.conftest import small_normflows_model

# raised inside dynamo while it inspects the traced tensors, not by our code
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def _same(run, backend: str = "aot_eager") -> None:
    """``run(compile)`` twice from the same seed, eager and compiled; the tensors it returns agree."""
    torch.manual_seed(5)
    eager = run(lambda f: f)
    torch.manual_seed(5)
    compiled = run(lambda f: torch.compile(f, backend=backend))
    assert len(eager) == len(compiled) > 1
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


DATA = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("options", [{}, {"fused": False}, {"net": "normflows"}],
                         ids=["fused", "generic", "fused-normflows-net"])
def test_normflows_training_step_and_sampling(options):
    def run(compile):
        model = small_normflows_model(**options).train()
        loss = compile(model.forward_kld)(DATA)  # roulette series, memory-saving backward
        loss.backward()
        model.eval()
        with torch.no_grad():
            z, log_q = compile(model.sample)(16)
        return [loss.detach(), *_grads(model), z, log_q]

    _same(run)


@pytest.mark.parametrize("options", [{}, {"fused": False}], ids=["fused", "generic"])
def test_pyro_log_prob_and_rsample(options):
    def run(compile):
        torch.manual_seed(0)
        blocks = [iresnet(2, hidden_dims=[16], **options) for _ in range(2)]
        base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        density = dist.TransformedDistribution(base, [dist.transforms.ComposeTransform(blocks).inv])
        sampler = dist.TransformedDistribution(base, blocks)

        def loss(x):
            z = sampler.rsample((8,))  # fixed-point inverse, implicit gradient
            return -density.log_prob(x).mean() + sampler.log_prob(z).mean()

        value = compile(loss)(DATA)
        value.backward()
        return [value.detach(), *_grads(*blocks)]

    _same(run)


def test_pyro_conditional():
    def run(compile):
        torch.manual_seed(0)
        transform = conditional_iresnet(2, 3, logdet="exact")
        base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        context = torch.randn(3)

        def loss():
            flow = dist.ConditionalTransformedDistribution(base, [transform]).condition(context)
            return flow.log_prob(flow.rsample((8,))).mean()

        value = compile(loss)()
        value.backward()
        return [value.detach(), *_grads(transform)]

    _same(run)


def test_pyro_multiscale_log_prob():
    def run(compile):
        torch.manual_seed(0)
        transform = multiscale_iresnet((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4)
        base = dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3)
        flow = dist.TransformedDistribution(base, [transform])
        value = compile(flow.log_prob)(torch.rand(3, 1, 4, 4)).mean()
        value.backward()
        return [value.detach(), *_grads(transform)]

    _same(run)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_normflows_training_step_with_inductor():
    def run(compile):
        model = small_normflows_model().train()
        loss = compile(model.forward_kld)(DATA)
        loss.backward()
        return [loss.detach(), *_grads(model)]

    _same(run, backend="inductor")


def test_cache_bookkeeping_does_not_recompile_after_optimiser_steps():
    """The transforms' cache state holds parameter version counters: traced, every optimiser step
    changed a guarded value and recompiled until dynamo's limit. It now runs eagerly."""
    torch.manual_seed(0)
    flow_t = iresnet(2, hidden_dims=[8])
    density = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow_t.inv])
    opt = torch.optim.Adam(flow_t.parameters(), lr=1e-2)
    loss_fn = torch.compile(lambda x: -density.log_prob(x).mean(), backend="aot_eager")

    def step():
        opt.zero_grad()
        loss_fn(DATA).backward()
        opt.step()

    step()
    step()
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(4):
            step()
