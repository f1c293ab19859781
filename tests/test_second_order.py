"""Second derivatives (``create_graph=True``) through a block: exact where supported, a clear error
elsewhere, never silently incomplete.

Supported: the generic path's explicit direction with ``logdet="exact"`` or ``neumann_grad=False``
(plain autograd); checked against central differences of the first derivative in float64. The
other paths give exact first derivatives that are not differentiable again (implicit gradients of
the inverse, the Neumann-series gradient, the memory-saving backward, the fused closed forms);
a second derivative through them raises a ``RuntimeError`` naming the part. Before, the inverse,
the Neumann gradient and the memory-saving backward silently returned wrong Hessians.
"""

from __future__ import annotations

import pytest
import torch

from pyro_iresnet import LipschitzMLP, ResidualBlock
from tests.conftest import activate

DTYPE = torch.float64
X0 = torch.tensor([[0.3, -0.2], [-0.5, 0.8]], dtype=DTYPE)


def _block(**options) -> ResidualBlock:
    torch.manual_seed(0)
    return ResidualBlock(activate(LipschitzMLP([2, 8, 2], coeff=0.9).double()), **options).train()


def _log_density(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """Standard normal base after the explicit map, with the block's (seeded) log-det."""
    torch.manual_seed(1)  # the same probes and roulette draws at every point
    y, logdet = block.forward_and_logdet(x)
    return (-0.5 * y.pow(2).sum(-1) + logdet).sum()


def _score(block: ResidualBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(_log_density(block, x), x, create_graph=True)
    return score, x


@pytest.mark.parametrize("options", [
    {"logdet": "exact"},
    {"logdet": "series", "n_terms": 4, "neumann_grad": False},
    {"logdet": "unbiased", "neumann_grad": False},
], ids=["exact", "series", "unbiased"])
def test_generic_explicit_direction_gives_exact_second_derivatives(options):
    block = _block(fused=False, **options)
    score, x = _score(block, X0)
    # each sample's score depends on its own point only: d(sum_n score_n[i]) / dx = row i of each Hessian
    hessian = torch.stack([torch.autograd.grad(score[:, i].sum(), x, retain_graph=True)[0] for i in range(2)], 1)
    eps = 1e-6
    columns = [(_score(block, X0 + eps * e)[0] - _score(block, X0 - eps * e)[0]) / (2 * eps)
               for e in torch.eye(2, dtype=DTYPE)]
    central = torch.stack(columns, 2)  # [n, i, j] = d score_i / d x_j
    torch.testing.assert_close(hessian, central, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(hessian, hessian.mT, atol=1e-10, rtol=0)


def _explicit(**options):
    def second_derivative():
        score, x = _score(_block(**options), X0)
        torch.autograd.grad(score.sum(), x)

    return second_derivative


def _inverse(**options):
    def second_derivative():
        block = _block(**options)
        y = X0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(block.inverse(y).pow(3).sum(), y, create_graph=True)
        torch.autograd.grad(grad.sum(), y)

    return second_derivative


def _parameter_hessian_vector_product(**options):
    def second_derivative():
        block = _block(**options)
        params = list(block.parameters())
        grads = torch.autograd.grad(_log_density(block, X0), params, create_graph=True, allow_unused=True)
        torch.autograd.grad(sum(g.sum() for g in grads if g is not None), params, allow_unused=True)

    return second_derivative


@pytest.mark.parametrize(("run", "part"), [
    (_explicit(logdet="exact"), "The fused log-det"),
    (_explicit(logdet="unbiased"), "The fused log-det"),
    (_parameter_hessian_vector_product(logdet="exact"), "The fused log-det"),
    (_explicit(fused=False, logdet="unbiased", neumann_grad=True), "The Neumann-series gradient"),
    (_parameter_hessian_vector_product(fused=False, logdet="series", neumann_grad=True),
     "The Neumann-series gradient"),
    (_explicit(fused=False, logdet="unbiased", memory_efficient=True), "The memory-saving backward"),
    (_inverse(fused=False), "The fixed-point inverse's implicit gradient"),
    (_inverse(), "The fixed-point inverse's implicit gradient"),
    (_inverse(inverse_method="newton"), "The Newton inverse's implicit gradient"),
], ids=["fused-exact", "fused-unbiased", "fused-params", "neumann", "neumann-params", "memory-efficient",
        "inverse-generic", "inverse-fused", "inverse-newton"])
def test_unsupported_second_derivatives_raise_naming_the_part(run, part):
    with pytest.raises(RuntimeError, match=f"^{part}.*cannot be differentiated again"):
        run()


@pytest.mark.parametrize("options", [{"logdet": "unbiased"}, {"fused": False, "logdet": "unbiased"},
                                     {"fused": False, "memory_efficient": True}],
                         ids=["fused", "neumann", "memory-efficient"])
def test_first_derivatives_are_the_same_with_create_graph(options):
    block = _block(**options)
    x = X0.clone().requires_grad_(True)
    plain = torch.autograd.grad(_log_density(block, x), [x, *block.parameters()], allow_unused=True)
    graph = torch.autograd.grad(_log_density(block, x), [x, *block.parameters()], allow_unused=True,
                                create_graph=True)
    for a, b in zip(plain, graph):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b.detach(), a, atol=0, rtol=0)


def test_frozen_parameters_still_raise_through_the_neumann_gradient():
    block = _block(fused=False, logdet="unbiased", neumann_grad=True).requires_grad_(False)
    with pytest.raises(RuntimeError, match="^The Neumann-series gradient"):
        score, x = _score(block, X0)
        torch.autograd.grad(score.sum(), x)


def test_neumann_first_derivatives_when_the_input_depends_on_the_parameters():
    """With one series term the Neumann surrogate is the estimator itself, so its gradients equal
    plain autograd's, also when the log-det's input depends on the same parameters (the density
    through the inverse, a conditional transform)."""
    import pyro.distributions as dist

    from pyro_iresnet import conditional_iresnet

    def gradients(neumann_grad):
        torch.manual_seed(0)
        transform = conditional_iresnet(2, 3, hidden_dims=[8], logdet="series", n_terms=1,
                                        neumann_grad=neumann_grad).double()
        context = torch.randn(3, dtype=DTYPE, requires_grad=True)
        base = dist.Normal(torch.zeros(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)).to_event(1)
        flow = dist.ConditionalTransformedDistribution(base, [transform]).condition(context)
        torch.manual_seed(1)
        inputs = [context, *transform.parameters()]
        return torch.autograd.grad(flow.log_prob(X0).sum(), inputs, allow_unused=True)

    for a, b in zip(gradients(True), gradients(False)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
