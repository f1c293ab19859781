"""Spectral normalisation, LipSwish and the Lipschitz certificate."""

from __future__ import annotations

import math

import pyro.distributions.transforms as T
import pytest
import torch
from pyro.optim.clipped_adam import ClippedAdam
from torch import nn

from pyro_iresnet import (
    LipschitzMLP,
    LipschitzWarning,
    LipSwish,
    NonFiniteError,
    ResidualBlock,
    SpectralNormLinear,
    iresnet,
    lipschitz_bound,
)


def _exact_sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(w.detach())[0])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(5, 3), (64, 64), (2, 128), (128, 128)])
def test_construction_converges_to_within_one_percent(shape: tuple[int, int], seed: int) -> None:
    torch.manual_seed(seed)
    layer = SpectralNormLinear(shape[1], shape[0], coeff=0.9)
    sigma = _exact_sigma(layer.weight)
    estimate = float(layer.sigma_estimate().detach())
    assert 0.99 * sigma <= estimate <= sigma * (1 + 1e-6)


def test_normalisation_formula() -> None:
    layer = SpectralNormLinear(4, 4, coeff=0.5).double()
    sigma = layer.sigma_estimate().detach()
    expected = layer.weight * 0.5 / sigma if sigma > 0.5 else layer.weight
    assert torch.allclose(layer.normalized_weight(), expected)
    with torch.no_grad():
        layer.weight.mul_(0.01)  # now sigma < c: weight used unchanged
    assert torch.equal(layer.normalized_weight(), layer.weight)


def test_gradient_flows_through_sigma() -> None:
    layer = SpectralNormLinear(3, 3, coeff=0.1).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    ours = layer.weight.grad.clone()
    w = layer.weight.detach().clone().requires_grad_()
    sigma = layer.u @ w @ layer.v
    torch.nn.functional.linear(x, w * 0.1 / sigma, layer.bias).pow(2).sum().backward()
    assert torch.allclose(ours, w.grad, atol=1e-12)


def test_power_iteration_runs_in_training_only_and_once_per_weight_change() -> None:
    layer = SpectralNormLinear(6, 6, coeff=0.9)
    x = torch.randn(2, 6)
    layer.eval()
    u = layer.u.clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer(x)
    assert torch.equal(layer.u, u)  # eval never changes the estimate
    layer.train()
    layer(x)
    u_after = layer.u.clone()
    assert not torch.equal(u_after, u)
    layer(x)
    assert torch.equal(layer.u, u_after)  # same weights: no further iteration


def test_eval_settles_linear_layers_to_the_exact_norm_in_one_svd() -> None:
    """After a weight change, a block in eval() sets u, v of its linear layers to the exact top singular
    vectors: sigma~ equals the exact norm to float64 rounding, where iterating would stop at the
    settle tolerance (1e-6 relative) and need many steps for close top singular values (here
    sigma_2 / sigma_1 = 0.999, so a power step shrinks the error of u by only 0.1%)."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([6, 32, 6], coeff=0.9).double())
    layer = block.net.layers[0]
    q1, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    spectrum = torch.tensor([2.0, 1.998, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(q1[:, :6] @ torch.diag(spectrum) @ q2.T)  # a weight change (version bump)
    block.eval().inverse(torch.randn(4, 6, dtype=torch.float64))
    estimate = float(layer.sigma_estimate().detach())
    assert abs(estimate - 2.0) <= 1e-13
    assert abs(float(layer.u @ q1[:, 0])) == pytest.approx(1.0, abs=1e-12)
    # already within the tolerance: the next weight change leaves a good estimate as it is
    u = layer.u.clone()
    with torch.no_grad():
        layer.weight.mul_(1.0 + 1e-9)
    block(torch.randn(4, 6, dtype=torch.float64))
    assert torch.equal(layer.u, u)


def test_buffers_in_state_dict_and_follow_to() -> None:
    layer = SpectralNormLinear(3, 2)
    assert {"u", "v"} <= set(layer.state_dict())
    layer = layer.to(torch.float64)
    assert layer.u.dtype == layer.v.dtype == torch.float64


@pytest.mark.parametrize("raw_beta", [-3.0, 0.5, 4.0])
def test_lipswish_is_1_lipschitz(raw_beta: float) -> None:
    act = LipSwish().double()
    with torch.no_grad():
        act.raw_beta.fill_(raw_beta)
    width = 10 / float(act.beta.detach())  # the slope peaks at |beta x| ~ 2.4
    x = torch.linspace(-width, width, 20001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(act(x).sum(), x)
    assert slope.abs().max() <= 1.0
    assert slope.abs().max() >= 0.99  # and the bound is nearly tight


def test_lipschitz_bound_is_product_of_exact_norms() -> None:
    net = LipschitzMLP([3, 20, 20, 3], coeff=0.8)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, SpectralNormLinear):
                layer.weight.mul_(4)
    net.train()(torch.randn(1, 3))
    expected = math.prod(
        _exact_sigma(m.normalized_weight()) for m in net.modules() if isinstance(m, SpectralNormLinear)
    )
    assert lipschitz_bound(net) == pytest.approx(expected, rel=1e-6)
    block = ResidualBlock(net)
    assert lipschitz_bound(block) == lipschitz_bound(net)


def test_lipschitz_bound_of_transforms_and_compositions() -> None:
    a, b = iresnet(2, coeff=0.5), iresnet(2, coeff=0.9)
    compose = T.ComposeTransform([a, T.permute(2), b])
    assert lipschitz_bound(compose) == max(lipschitz_bound(a), lipschitz_bound(b))
    assert lipschitz_bound(compose.inv) == lipschitz_bound(compose)
    assert lipschitz_bound(nn.ModuleList([a, b])) == lipschitz_bound(compose)
    with pytest.raises(ValueError, match="no residual block"):
        lipschitz_bound(T.ComposeTransform([T.permute(2)]))
    with pytest.raises(TypeError, match="cannot certify a Linear"):
        lipschitz_bound(nn.Sequential(nn.Linear(2, 2)))


def test_bound_stays_below_one_after_adversarial_training() -> None:
    """300 Adam steps at a high learning rate on a loss that rewards a large g."""
    coeff = 0.97
    net = LipschitzMLP([2, 32, 32, 2], coeff=coeff)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    x = torch.randn(128, 2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = -(net(x) - net(x.flip(0))).pow(2).sum(1).mean() - net(x).pow(2).mean()
        loss.backward()
        optimizer.step()
    net(x)  # the forward after the last step refreshes once, as any training forward would
    assert lipschitz_bound(net) < 1
    for layer in net.modules():
        if isinstance(layer, SpectralNormLinear):
            assert _exact_sigma(layer.normalized_weight()) <= coeff * 1.01


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(coeff=1.2), ValueError, r"coeff must be in \(0, 1\), got 1.2"),
        (dict(coeff=0.0), ValueError, r"coeff must be in \(0, 1\), got 0.0"),
        (dict(n_power_iterations=0), ValueError, "n_power_iterations must be >= 1, got 0"),
        (dict(activation="relu6"), ValueError, "activation must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LipschitzMLP([2, 4, 2], **kwargs)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("coeff", 1.5, r"coeff must be in \(0, 1\), got 1.5"),
        ("coeff", "0.5", r"coeff must be a float in \(0, 1\), got str"),
        ("n_power_iterations", 0, "n_power_iterations must be >= 1, got 0"),
    ],
)
def test_a_layer_option_reassigned_is_checked_and_a_refused_one_changes_nothing(name: str, value, match: str) -> None:
    from pyro_iresnet import SpectralNormConv2d

    for layer in (SpectralNormLinear(2, 4, coeff=0.9), SpectralNormConv2d(2, 2, 3, (2, 4, 4), coeff=0.9)):
        before = getattr(layer, name)
        with pytest.raises((ValueError, TypeError), match=match):
            setattr(layer, name, value)
        assert getattr(layer, name) == before
    layer.coeff = 0.5
    assert layer.coeff == 0.5


def test_bound_at_or_above_one_is_reported() -> None:
    transform = iresnet(2, hidden_dims=[8], coeff=0.99)
    layers = [m for m in transform.modules() if isinstance(m, SpectralNormLinear)]
    with torch.no_grad():
        for layer in layers:  # a stale power-iteration estimate that underestimates the norm
            layer.weight.mul_(10)
            u, v = torch.linalg.svd(layer.weight)[0][:, -1], torch.linalg.svd(layer.weight)[2][-1]
            layer.u.copy_(u)
            layer.v.copy_(v)
    with pytest.warns(LipschitzWarning, match=r"certified Lip\(g\) = .* >= 1"):
        assert lipschitz_bound(transform) >= 1


def test_power_iteration_follows_an_optimizer_that_writes_through_data() -> None:
    """Pyro's ClippedAdam updates ``p.data`` in place, which leaves the version counter as it was;
    the layer must still notice the new weight (without that: stale u, v and a bound near 30)."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(8, 8, coeff=0.9)
    optimizer = ClippedAdam(layer.parameters(), lr=0.2)
    x = torch.randn(32, 8)
    for _ in range(30):
        optimizer.zero_grad()
        (-layer(x).pow(2).sum()).backward()  # pushes the weight's norm up
        optimizer.step()
    with torch.no_grad():
        layer(x)  # the training-mode forward after the last step refreshes the power iteration
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2)) > 3  # the weight moved a lot
    assert layer.lipschitz_constant() < 1.0


def test_zero_weight_keeps_the_power_iteration_vectors() -> None:
    """A power step on a zero weight (an identity-initialised last layer) leaves u, v as they were:
    normalising the zero vector used to set them to 0 for good, so sigma~ stayed 0 and the weight
    went unnormalised once training made it nonzero (Lipschitz constant 3 for coeff 0.5 here)."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(4, 4, coeff=0.5)
    x = torch.randn(8, 4)
    with torch.no_grad():
        layer.weight.zero_()
    layer(x)  # training mode: a power step on the zero weight
    assert float(torch.linalg.vector_norm(layer.u)) == pytest.approx(1.0)
    with torch.no_grad():
        layer.weight.copy_(3 * torch.eye(4))
    for _ in range(3):
        layer(x)
    assert layer.lipschitz_constant() <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("damage", ["zero", "nan"])
@pytest.mark.parametrize("how", ["by_hand", "load_state_dict"])
def test_degenerate_buffers_restart_in_training_mode(damage: str, how: str) -> None:
    """u = v = 0 is a fixed point of the power step, and a step keeps a NaN buffer: buffers written
    that way from outside used to leave sigma~ at 0 (or NaN) in training mode for good, so the weight
    went unnormalised (Lipschitz 3 for coeff 0.5 here). The next refresh restarts and converges them."""
    from pyro_iresnet import SpectralNormConv2d

    torch.manual_seed(0)
    fill = 0.0 if damage == "zero" else math.nan
    for layer, x in ((SpectralNormLinear(4, 4, coeff=0.5).double(), torch.randn(8, 4, dtype=torch.float64)),
                     (SpectralNormConv2d(2, 2, 3, (2, 4, 4), coeff=0.5).double(),
                      torch.randn(3, 2, 4, 4, dtype=torch.float64))):
        with torch.no_grad():
            layer.weight.mul_(3 / layer.exact_operator_norm())  # |W| = 3
        if how == "by_hand":
            with torch.no_grad():
                layer.u.fill_(fill), layer.v.fill_(fill)
        else:
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            state["u"].fill_(fill), state["v"].fill_(fill)
            layer.load_state_dict(state)
        layer(x)  # training mode
        assert torch.isfinite(layer.u).all() and torch.isfinite(layer.v).all()
        assert layer.lipschitz_constant() <= 0.5 * (1 + 1e-5)
        with torch.no_grad():
            layer.weight.mul_(1.5)  # later weight changes keep being followed
        layer(x)
        assert layer.lipschitz_constant() <= 0.5 * 1.01


def test_buffer_check_runs_only_after_outside_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The degenerate-buffer check (a host sync) runs after the buffers were written from outside,
    not on the layer's own power steps."""
    layer = SpectralNormLinear(4, 4)
    x = torch.randn(8, 4)
    layer(x)
    calls = []
    original = SpectralNormLinear._restart_degenerate_buffers
    monkeypatch.setattr(SpectralNormLinear, "_restart_degenerate_buffers",
                        lambda self: calls.append(1) or original(self))
    for _ in range(3):
        with torch.no_grad():
            layer.weight.add_(0.01)
        layer(x)
    assert calls == []
    layer.load_state_dict(layer.state_dict())
    layer(x)
    layer(x)
    assert calls == [1]


def test_flow_moved_under_inference_mode_keeps_working() -> None:
    """``.double()`` under ``torch.inference_mode()`` makes u, v inference tensors, which have no
    version counter: reading it for the buffer check raised a RuntimeError at the next call."""
    torch.manual_seed(0)
    t = iresnet(2, hidden_dims=[8])
    with torch.inference_mode():
        t.double()
        y = t(torch.randn(3, 2, dtype=torch.float64))
        x = t.eval().inv(y)
        assert torch.allclose(t(x), y, atol=1e-9)


def test_optimizer_steps_of_other_parameters_leave_a_frozen_flow_alone() -> None:
    """Only the tensors an optimiser steps count as changed: a frozen block next to a trained one
    runs no power step in its training-mode calls (it used to after every optimiser step anywhere in
    the process), while the trained one runs one per step."""
    torch.manual_seed(0)
    trained, frozen = ResidualBlock(LipschitzMLP([2, 8, 2])), ResidualBlock(LipschitzMLP([2, 8, 2]))
    frozen.requires_grad_(False)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    x = torch.randn(16, 2)
    frozen.logdet(x)  # its first training-mode call: the one power step for its current weights
    with torch.no_grad():
        for layer in frozen.net.layers[0::2]:  # unconverged vectors: a power step would move them
            layer.u.copy_(torch.nn.functional.normalize(torch.randn_like(layer.u), dim=0))
    buffers = [b.clone() for b in frozen.buffers()]
    for _ in range(3):
        u = trained.net.layers[0].u.clone()
        optimizer.zero_grad()
        (trained.logdet(x).sum() + frozen.logdet(x).sum()).backward()
        optimizer.step()
        trained.logdet(x)
        assert not torch.equal(trained.net.layers[0].u, u)
    assert all(torch.equal(b, c) for b, c in zip(frozen.buffers(), buffers))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_mode_and_certificate_in_half_precision(dtype: torch.dtype) -> None:
    """Half-precision weights and inputs: the exact norm (eval()'s settle, lipschitz_bound) and the
    exact log-det's factorisation are computed in float32 (torch's matrix_norm and slogdet take
    neither float16 nor bfloat16); results come back in the model's dtype."""
    torch.manual_seed(0)
    t = iresnet(3, hidden_dims=[8], logdet="exact").to(dtype)
    x = torch.randn(4, 3, dtype=dtype)
    _, logdet = t.block.forward_and_logdet(x)
    logdet.sum().backward()  # training: the exact log-det and its gradient
    assert logdet.dtype == dtype and all(torch.isfinite(p.grad).all() for p in t.parameters() if p.grad is not None)
    t.eval()  # eval(): the settle and the exact log-det (eval_logdet="auto")
    y = t(x)
    assert y.dtype == dtype and torch.isfinite(t.log_abs_det_jacobian(x, y)).all()
    assert lipschitz_bound(t) < 1


def test_power_step_updates_v_then_u() -> None:
    """One training-mode step is v <- W^T u / |W^T u|, then u <- W v / |W v| (the documented order)."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(3, 4, n_power_iterations=1).double()
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))  # a new weight: the next forward steps once
    u0, w = layer.u.clone(), layer.weight.detach().clone()
    layer(torch.randn(2, 3, dtype=torch.float64))
    v1 = w.T @ u0 / torch.linalg.vector_norm(w.T @ u0)
    u1 = w @ v1 / torch.linalg.vector_norm(w @ v1)
    torch.testing.assert_close(layer.v, v1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.u, u1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha, expected", [(2.0, 2.0), (0.5, 1.0), (-3.0, 3.0), (-0.5, 1.0)])
def test_elu_bound_is_max_of_one_and_abs_alpha(alpha: float, expected: float) -> None:
    """ELU's slope below 0 is alpha e^z: |alpha| bounds it for a negative alpha too (the rule
    certified 1.0 for alpha = -3, below the finite-difference ratio 2.98 of ELU itself)."""
    assert lipschitz_bound(nn.Sequential(nn.ELU(alpha=alpha))) == expected
    a, b = torch.full((1,), -1e-3, dtype=torch.float64), torch.full((1,), -2e-3, dtype=torch.float64)
    elu = nn.ELU(alpha=alpha)
    assert float((elu(a) - elu(b)).abs() / (a - b).abs()) <= expected


def test_dropout_bound_is_inverse_keep_probability_in_training_only() -> None:
    drop = nn.Dropout(0.5)
    assert lipschitz_bound(nn.Sequential(drop.train())) == 2.0
    assert lipschitz_bound(nn.Sequential(drop.eval())) == 1.0


def test_leaky_relu_rule_uses_its_slope() -> None:
    """lipschitz_bound of an nn.LeakyReLU is max(1, |negative_slope|): for slope -2 a chain
    Linear -> LeakyReLU has bound 2 * ||W~||_2 (a slope of magnitude 2 doubles the constant)."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(3, 3, coeff=0.4)
    bound_linear = lipschitz_bound(nn.Sequential(layer))
    assert lipschitz_bound(nn.Sequential(layer, nn.LeakyReLU(-2.0))) == pytest.approx(2 * bound_linear, rel=1e-12)
    assert lipschitz_bound(nn.Sequential(layer, nn.LeakyReLU(0.01))) == pytest.approx(bound_linear, rel=1e-12)


def test_degenerate_buffer_restart_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    """Restarting a zeroed power-iteration buffer draws from its own seeded generator: torch's
    global RNG state is unchanged by the refresh, and two layers with the same weight and the same
    zeroed buffer end with identical buffers whatever the global seed."""
    torch.manual_seed(0)
    a = SpectralNormLinear(5, 4, n_power_iterations=1)
    b = SpectralNormLinear(5, 4, n_power_iterations=1)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.v.copy_(a.v)
    results = []
    for layer, seed in ((a, 1), (b, 2)):
        with torch.no_grad():
            layer.u.zero_()
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        layer.refresh()
        assert torch.equal(torch.get_rng_state(), state)
        results.append(layer.u.clone())
    assert torch.equal(results[0], results[1])


def test_degenerate_buffer_restart_under_another_default_device() -> None:
    """The restart vector comes from a CPU generator, so it is drawn on the CPU whatever the default
    device (under ``torch.device("cuda")`` a draw on the default device raised: a CPU generator for a
    CUDA tensor); ``meta`` stands in for the other device here."""
    from pyro_iresnet.lipschitz import _restart_vector

    like = torch.zeros(4)
    expected = _restart_vector(like)
    with torch.device("meta"):
        restarted = _restart_vector(like)
    assert restarted.device == like.device and torch.equal(restarted, expected)


def test_swapped_weight_parameter_reconverges_the_power_iteration() -> None:
    """A weight Parameter replaced by one with other values (Pyro's param store after a load) brings
    sigma~ to the new weight's exact norm at the next use, within the settle tolerance."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(4, 5, coeff=0.9).double()
    new_weight = 3 * torch.randn_like(layer.weight)  # other singular vectors than the old weight's
    layer.weight = nn.Parameter(new_weight)
    exact = float(torch.linalg.matrix_norm(new_weight, ord=2))
    assert float(layer.sigma_estimate().detach()) == pytest.approx(exact, rel=1e-6)


def test_bound_of_a_transformed_distribution_covers_every_block() -> None:
    """lipschitz_bound of a flow is the largest bound over all its residual blocks, not the first's."""
    import pyro.distributions as dist

    torch.manual_seed(0)
    blocks = [iresnet(2, hidden_dims=[8], coeff=0.5), iresnet(2, hidden_dims=[8], coeff=0.97)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, blocks)
    bounds = [lipschitz_bound(b) for b in blocks]
    assert bounds[1] > bounds[0]
    assert lipschitz_bound(flow) == max(bounds)


def test_nested_frozen_contexts_restore_the_outer_state() -> None:
    """Leaving an inner frozen_spectral_norm restores each layer's previous state: inside the still
    open outer context a training-mode call runs no power step."""
    from pyro_iresnet.lipschitz import frozen_spectral_norm

    layer = SpectralNormLinear(3, 3)
    u = layer.u.clone()
    with frozen_spectral_norm(layer):
        with frozen_spectral_norm(layer):
            pass
        layer(torch.randn(4, 3))
    assert torch.equal(layer.u, u)
    layer(torch.randn(4, 3))  # unfrozen: the pending power step runs
    assert not torch.equal(layer.u, u)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_certificate_bounds_the_weight_as_applied(dtype: torch.dtype) -> None:
    """In float16/bfloat16 the applied W / max(1, sigma / c) is rounded: the certificate is the exact
    norm of that rounded weight, not ||W|| / max(1, sigma / c) (which fell short of it by up to
    4e-4 in float16 and 3e-3 in bfloat16). Reference: float64 norms of normalized_weight()."""
    from pyro_iresnet.conv import SpectralNormConv2d, conv_operator_norm

    for seed in range(12):
        torch.manual_seed(seed)
        linear = SpectralNormLinear(16, 16, coeff=0.97).to(dtype)
        conv = SpectralNormConv2d(2, 2, 3, (2, 4, 4), coeff=0.97).to(dtype)
        with torch.no_grad():
            applied_linear = float(torch.linalg.matrix_norm(linear.normalized_weight().double(), ord=2))
            applied_conv = conv_operator_norm(conv.normalized_weight().double(), (2, 4, 4), 1)
        assert linear.lipschitz_constant() >= applied_linear * (1 - 1e-9)
        assert conv.lipschitz_constant() >= applied_conv * (1 - 1e-9)


def test_bound_of_a_non_finite_weight_names_the_layer() -> None:
    net = LipschitzMLP([2, 8, 2])
    with torch.no_grad():
        net.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the weight of SpectralNormLinear\(in_features=2.*holds NaN/Inf"):
        lipschitz_bound(net)
