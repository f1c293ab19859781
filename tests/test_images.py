"""Image flows: conv spectral norm, squeeze, actnorm, logit, conv i-ResNet blocks, multi-scale model."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

import pyro_iresnet.conv as conv_module
from pyro_iresnet import (
    ActNorm,
    ConvergenceWarning,
    FactorOut,
    LipschitzCNN,
    LogitTransform,
    ResidualBlock,
    SpectralNormConv2d,
    Squeeze,
    Unsqueeze,
    bits_per_dim,
    conv_iresnet,
    dequantize,
    lipschitz_bound,
    multiscale_iresnet,
)
from pyro_iresnet.conv import conv_operator_norm

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convolutions: one thread is faster, and far faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of a map on one event, flattened to (out, in)."""
    jac = torch.autograd.functional.jacobian(f, x)
    return jac.reshape(jac.shape[: jac.dim() - x.dim()].numel(), x.numel())


def per_sample_slogdet(transform, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of ``transform`` at each sample of ``x`` (N, C, H, W) from autograd."""
    return torch.stack([
        torch.linalg.slogdet(jacobian(lambda z: transform(z.unsqueeze(0)).squeeze(0), xi)).logabsdet
        for xi in x
    ])


def active_cnn_scale(module: torch.nn.Module, scale: float) -> None:
    """Scale every conv kernel up and converge power iteration, so each normalisation is active."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, SpectralNormConv2d):
                layer.weight.mul_(scale)
                layer._converge_power_iteration(rtol=1e-3)


# -- SpectralNormConv2d ------------------------------------------------------------------------
def test_conv_spectral_norm_bounds_the_operator_after_training_forwards() -> None:
    coeff = 0.9
    layer = SpectralNormConv2d(2, 3, 3, input_shape=(2, 4, 4), coeff=coeff).to(DTYPE)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # the normalisation becomes active
    x = torch.randn(8, 2, 4, 4, dtype=DTYPE)
    for _ in range(3):  # training forwards, each after a weight change (SGD): one power step each
        layer.zero_grad()
        layer(x).square().mean().backward()
        with torch.no_grad():
            for p in layer.parameters():
                p.sub_(1e-3 * p.grad)
    layer(x)
    weight = layer.normalized_weight().detach()
    op = jacobian(lambda z: F.conv2d(z.unsqueeze(0), weight, padding=1).squeeze(0), x[0])
    exact = float(torch.linalg.matrix_norm(op, ord=2))
    assert 0.9 * coeff <= exact <= coeff * 1.01
    assert layer.lipschitz_constant() == pytest.approx(exact, rel=1e-10)  # the certificate is exact
    kernel_norm = float(torch.linalg.matrix_norm(layer.normalized_weight().detach().reshape(3, -1), ord=2))
    assert abs(kernel_norm - exact) > 1e-3  # the operator norm is not the reshaped kernel's


def test_conv_power_iteration_restarts_from_buffers_zeroed_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """u = v = 0 (edited by hand) is a fixed point of the power step; eval()'s settle restarts from a
    nonzero vector and reaches the exact operator norm (it used to run 10,000 steps and leave the
    estimate at 0, i.e. the convolution unnormalised). A settle that runs out of steps warns."""
    import pyro_iresnet.lipschitz as lipschitz_module
    from pyro_iresnet import LipschitzWarning

    block = conv_iresnet((2, 4, 4), hidden_channels=4, coeff=0.9).to(DTYPE)
    layer = next(m for m in block.modules() if isinstance(m, SpectralNormConv2d))
    with torch.no_grad():
        layer.weight.mul_(3.0)  # a weight change: the next eval() call settles the layer
        layer.u.zero_(), layer.v.zero_()
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    block.eval()(x)  # warnings are errors
    assert float(layer.sigma_estimate().detach()) >= (1 - 1e-6) * layer.exact_operator_norm()
    assert layer.lipschitz_constant() <= 0.9 * (1 + 1e-5)
    monkeypatch.setattr(lipschitz_module, "_MAX_INIT_ITERATIONS", 1)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.u.zero_(), layer.v.zero_()
    short = r"power iteration of SpectralNormConv2d\(.*\) stopped at .* after 1 steps"
    with pytest.warns(LipschitzWarning, match=short):
        block(x)


def test_conv_restart_reaches_a_top_singular_vector_off_the_symmetric_subspace() -> None:
    """A 1x1 kernel [[1, -1], [-1, 1]] + I/2 is symmetric under swapping the channels, and its top
    singular vector is antisymmetric: a restart of zeroed buffers from a constant vector stayed in the
    symmetric subspace for all 10,000 steps (sigma~ 0.5 of 2.5). The restart vector is generic."""
    layer = SpectralNormConv2d(2, 2, 1, (2, 3, 3), coeff=0.9).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.5, -1.0], [-1.0, 1.5]], dtype=DTYPE).view(2, 2, 1, 1))
        layer.u.zero_(), layer.v.zero_()
    layer.eval().refresh()  # warnings are errors
    assert layer.exact_operator_norm() == pytest.approx(2.5)
    assert float(layer.sigma_estimate().detach()) >= (1 - 1e-6) * 2.5
    assert layer.lipschitz_constant() <= 0.9 * (1 + 1e-5)


def test_conv_settle_whose_last_step_converges_does_not_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate is checked once more after the last allowed step: a rank-1 kernel converges in
    one step, which used to warn "stopped at 5 ... short of the exact norm 5" with one step allowed."""
    import pyro_iresnet.lipschitz as lipschitz_module

    layer = SpectralNormConv2d(2, 2, 1, (2, 3, 3), coeff=0.9).to(DTYPE)
    monkeypatch.setattr(lipschitz_module, "_MAX_INIT_ITERATIONS", 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=DTYPE).view(2, 2, 1, 1))
    layer.eval().refresh()  # warnings are errors
    assert float(layer.sigma_estimate().detach()) == pytest.approx(5.0)


def test_settle_warning_points_into_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LipschitzWarning of a settle that runs out names a frame of pyro_iresnet (it named torch's
    no_grad wrapper), so filters on the module see it."""
    import pyro_iresnet.lipschitz as lipschitz_module
    from pyro_iresnet import LipschitzWarning

    layer = SpectralNormConv2d(2, 2, 3, (2, 4, 4), coeff=0.9).to(DTYPE)
    monkeypatch.setattr(lipschitz_module, "_MAX_INIT_ITERATIONS", 0)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with pytest.warns(LipschitzWarning) as record:
        layer.eval().refresh()
    assert record[0].filename == lipschitz_module.__file__


@pytest.mark.parametrize("dense", [True, False])
def test_conv_operator_norm_matches_dense_jacobian(dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not dense:
        monkeypatch.setattr(conv_module, "_DENSE_MAX_SIDE", 0)  # force the Lanczos path
    weight = torch.randn(4, 3, 3, 3, dtype=DTYPE)
    x = torch.randn(3, 5, 6, dtype=DTYPE)
    op = jacobian(lambda z: F.conv2d(z.unsqueeze(0), weight, padding=1).squeeze(0), x)
    expected = float(torch.linalg.matrix_norm(op, ord=2))
    assert conv_operator_norm(weight, (3, 5, 6), padding=1) == pytest.approx(expected, rel=1e-10)


def test_conv_spectral_norm_checkpoint_needs_no_forward() -> None:
    layer = SpectralNormConv2d(2, 5, 3, input_shape=(2, 4, 4))
    fresh = SpectralNormConv2d(2, 5, 3, input_shape=(2, 4, 4))
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 2}, "kernel_size must be odd"),
        ({"input_shape": (3, 4, 4)}, r"input_shape\[0\] must equal in_channels=2"),
        ({"input_shape": (2, 4)}, "input_shape must be three positive ints"),
        ({"coeff": 1.5}, r"coeff must be in \(0, 1\), got 1.5"),
    ],
)
def test_conv_spectral_norm_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "input_shape": (2, 4, 4), **kwargs}
    with pytest.raises(ValueError, match=match):
        SpectralNormConv2d(**args)


def test_lipschitz_cnn_certificate_and_shape_errors() -> None:
    net = LipschitzCNN([2, 6, 6, 2], [3, 1, 3], input_shape=(2, 4, 4), coeff=0.8).to(DTYPE)
    active_cnn_scale(net, 5.0)
    assert lipschitz_bound(net) <= (0.8 / 0.999) ** 3  # power iteration converged to 1e-3
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, 4, 4\)"):
        net(torch.randn(1, 2, 5, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="channels must have one more entry"):
        LipschitzCNN([2, 6, 2], [3, 1, 3], input_shape=(2, 4, 4))


# -- Squeeze, ActNorm, LogitTransform --------------------------------------------------------
def test_squeeze_round_trip_and_logdet() -> None:
    x = torch.randn(3, 2, 4, 6, dtype=DTYPE)
    for t in (Squeeze(), Unsqueeze().inv):
        y = t(x)
        assert y.shape == (3, 8, 2, 3)
        assert t.forward_shape(x.shape) == y.shape and t.inverse_shape(y.shape) == x.shape
        assert torch.equal(t.inv(y), x)
        expected = per_sample_slogdet(t, x)
        assert torch.allclose(t.log_abs_det_jacobian(x, y), expected, atol=1e-12)
    assert torch.equal(Squeeze()(x)[0, 5, 1, 2], x[0, 1, 2, 5])  # channel 4c + 2i + j
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.randn(2, 1, 3, 4))


def test_actnorm_data_dependent_init_round_trip_and_logdet() -> None:
    t = ActNorm(3).to(DTYPE)
    x = 2.0 + 3.0 * torch.randn(64, 3, 4, 4, dtype=DTYPE)
    y = t(x)
    per_channel = y.movedim(1, 0).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=DTYPE), atol=1e-10)
    assert torch.allclose(per_channel.std(1), torch.ones(3, dtype=DTYPE), atol=1e-5)
    with torch.no_grad():  # move away from the init so that the log-det is not ~ -log std
        t.log_scale.add_(torch.randn(3, dtype=DTYPE))
        t.bias.add_(torch.randn(3, dtype=DTYPE))
    x = torch.randn(4, 3, 2, 3, dtype=DTYPE)
    y = t(x)
    assert torch.allclose(t.inv(y), x, atol=1e-13)
    assert torch.allclose(t.log_abs_det_jacobian(x, y), per_sample_slogdet(t, x), atol=1e-10)
    fresh = ActNorm(3).to(DTYPE)
    fresh.load_state_dict(t.state_dict())
    assert torch.equal(fresh(x), y)  # loaded: no second data-dependent init
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3, H, W\)"):
        t(torch.randn(2, 2, 4, 4, dtype=DTYPE))


def test_logit_transform_round_trip_logdet_and_bits_per_dim() -> None:
    t = LogitTransform(levels=17, alpha=0.05)
    v = dequantize(torch.randint(0, 17, (3, 1, 4, 4)).to(DTYPE))
    y = t(v)
    assert torch.allclose(t.inv(y), v, atol=1e-12)
    assert torch.allclose(t.log_abs_det_jacobian(v, y), per_sample_slogdet(t, v), atol=1e-10)
    # a uniform density on [0, 17)^D has log2(17) bits/dim
    assert float(bits_per_dim(torch.tensor(-16 * math.log(17.0)), 16)) == pytest.approx(math.log2(17.0))
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\)"):
        LogitTransform(17, alpha=0.5)


# -- conv_iresnet ------------------------------------------------------------------------------
def make_block(**options) -> torch.nn.Module:
    t = conv_iresnet((2, 4, 4), hidden_channels=8, coeff=0.9, **options).to(DTYPE)
    active_cnn_scale(t, 5.0)
    return t


def test_conv_iresnet_round_trip_exact_logdet_and_certificate() -> None:
    t = make_block(logdet="exact")
    x = torch.randn(5, 2, 4, 4, dtype=DTYPE)
    y = t(x)
    assert y.shape == x.shape and t.event_dim == 3
    assert (t.inv(y) - x).abs().max() <= 1e-6
    expected = per_sample_slogdet(t.block.forward, x)
    assert torch.allclose(t.log_abs_det_jacobian(x, y), expected, atol=1e-10)
    bound = lipschitz_bound(t)
    assert 0.5 < bound < 1.0


def test_conv_iresnet_series_and_implicit_inverse_gradient() -> None:
    x = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    t_exact = make_block(logdet="exact")
    t_series = make_block(logdet="series", n_terms=80, exact_trace=True)
    t_series.load_state_dict(t_exact.state_dict())
    assert torch.allclose(t_series.block.logdet(x), t_exact.block.logdet(x), atol=1e-8)
    t = make_block(logdet="unbiased", inverse_method="anderson")
    y = t(x).detach().requires_grad_()
    x_rec = t.inv(y)
    (grad,) = torch.autograd.grad(x_rec.square().sum(), y)
    # d x/d y = (I + J_g(x))^{-1}: the implicit gradient is (I + J)^{-T} (2 x)
    for i in range(3):
        jac = jacobian(lambda z: t.block(z.unsqueeze(0)).squeeze(0), x_rec[i].detach())
        expected = torch.linalg.solve(jac.T, 2 * x_rec[i].detach().flatten())
        assert torch.allclose(grad[i].flatten(), expected, atol=1e-8)
    loss = t.log_abs_det_jacobian(x, t(x)).sum()
    loss.backward()
    weights = [p for name, p in t.named_parameters() if name.endswith("weight")]  # the log-det does
    assert len(weights) == 3  # not depend on the last bias
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in weights)


@pytest.mark.parametrize("neumann_grad", [True, False])
def test_conv_iresnet_memory_efficient_gradients_agree(neumann_grad: bool) -> None:
    x = torch.randn(3, 2, 4, 4, dtype=DTYPE, requires_grad=True)
    weights = torch.rand(3, dtype=DTYPE)  # per-sample weights: not only a batch mean

    def grads(**options) -> list[torch.Tensor]:
        t = make_block(logdet="unbiased", n_probes=2, **options)
        t.load_state_dict(reference.state_dict())
        torch.manual_seed(7)
        y, logdet = t.block.forward_and_logdet(x)
        loss = (weights * logdet).sum() + y.square().sum()
        return torch.autograd.grad(loss, [x, *t.parameters()])

    reference = make_block(logdet="unbiased", n_probes=2)
    expected = grads(neumann_grad=neumann_grad, memory_efficient=False)
    for got, want in zip(grads(neumann_grad=neumann_grad, memory_efficient=True), expected):
        assert torch.allclose(got, want, atol=1e-10)


def test_conv_iresnet_rejects_bad_hidden_channels() -> None:
    with pytest.raises(ValueError, match=r"hidden_channels must have len\(kernel_sizes\) - 1 = 2"):
        conv_iresnet((2, 4, 4), hidden_channels=[8, 8, 8])
    with pytest.raises(ValueError, match="conv_iresnet sets event_dim=3 itself: do not pass event_dim"):
        conv_iresnet((2, 4, 4), event_dim=3)


def test_conv_iresnet_with_one_width_per_hidden_layer() -> None:
    torch.manual_seed(0)
    t = conv_iresnet((2, 4, 4), hidden_channels=[6, 5], logdet="exact", coeff=0.9).to(DTYPE)
    shapes = [tuple(m.weight.shape) for m in t.modules() if isinstance(m, SpectralNormConv2d)]
    assert shapes == [(6, 2, 3, 3), (5, 6, 1, 1), (2, 5, 3, 3)]
    x = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    y = t(x)
    assert torch.allclose(t.log_abs_det_jacobian(x, y), per_sample_slogdet(t.block.forward, x), atol=1e-10)
    assert (t.inv(y) - x).abs().max() <= 1e-10


def test_factor_out_needs_a_transform_module_inside() -> None:
    """An ``nn.Module`` that is no transform would fail later, without a log-det."""
    for inner in (torch.nn.Linear(4, 4), lambda x: x):
        with pytest.raises(TypeError, match="inner must be a TransformModule"):
            FactorOut(inner, 2)


# -- multi-scale model -------------------------------------------------------------------------
def make_flow(**options) -> tuple[torch.nn.Module, dist.TransformedDistribution]:
    t = multiscale_iresnet((1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, levels=17, **options)
    base = dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3)
    return t, dist.TransformedDistribution(base, [t])


def digits_like(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize(torch.randint(0, 17, (n, 1, 8, 8)).to(dtype))


def test_multiscale_log_prob_equals_autograd_jacobian() -> None:
    t, flow = make_flow(coeff=0.9)
    t.to(DTYPE)
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 8, 8, dtype=DTYPE), 1.0).to_event(3), [t])
    v = digits_like(16, DTYPE)
    t.encoder(v)  # data-dependent actnorm init
    t.eval()  # exact log-dets (64 and 32 dims <= exact_max_dim)
    v = v[:3]
    encoder = t.encoder
    z = encoder(v)
    expected = flow.base_dist.log_prob(z) + per_sample_slogdet(encoder, v)
    assert torch.allclose(flow.log_prob(v), expected, atol=1e-8)
    assert torch.allclose(t(z), v, atol=1e-6)  # sampling direction inverts the encoder
    assert lipschitz_bound(t) < 1.0
    nested = [m for m in t.modules() if isinstance(m, FactorOut)]
    assert len(nested) == 1 and nested[0].keep_channels == 2


def test_multiscale_trains_through_transformed_distribution() -> None:
    t, flow = make_flow()
    optimizer = torch.optim.Adam(t.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in t.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        loss = -flow.log_prob(digits_like(8)).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in t.parameters() if p.grad is not None)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in t.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, t.parameters())) > len(before) // 2
    assert torch.isfinite(flow.sample((2,))).all()


def test_multiscale_checkpoint_round_trip_without_dummy_forward() -> None:
    t, flow = make_flow()
    flow.log_prob(digits_like(8)).mean().backward()  # initialises actnorm
    torch.optim.SGD(t.parameters(), lr=1e-2).step()
    t.eval()
    torch.manual_seed(1)
    fresh, fresh_flow = make_flow()
    fresh.load_state_dict(t.state_dict())
    fresh.eval()
    v = digits_like(4)
    assert torch.equal(fresh_flow.log_prob(v), flow.log_prob(v))


def test_multiscale_without_factor_out_and_argument_errors() -> None:
    t = multiscale_iresnet((1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, factor_out=False,
                           actnorm=False, logdet="exact")
    assert not any(isinstance(m, FactorOut) for m in t.modules())
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(t(t.inv(x)), x, atol=1e-4)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*n_scales = 16"):
        multiscale_iresnet((1, 8, 8), n_scales=4)


def test_multiscale_normalizing_flow_matches_pyro_and_trains() -> None:
    from pyro_iresnet.normflows import multiscale_normalizing_flow

    options = dict(n_scales=2, n_blocks=1, hidden_channels=4, levels=17)
    torch.manual_seed(3)
    t, flow = make_flow()
    torch.manual_seed(3)
    model = multiscale_normalizing_flow((1, 8, 8), **options)
    v = digits_like(8)
    t.eval()
    model.eval()  # exact log-dets: the two densities must agree
    assert torch.allclose(model.log_prob(v), flow.log_prob(v), atol=1e-4)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        loss = model.forward_kld(digits_like(8))
        loss.backward()
        assert torch.isfinite(loss)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    samples, log_q = model.sample(2)
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(log_q).all()
    assert lipschitz_bound(model) < 1.0


def test_multiscale_caches_follow_parameters_and_mode() -> None:
    """The same data tensor every step (full-batch training): each step's log-density and gradients
    are those of the current parameters, not of a cached pass."""
    torch.manual_seed(0)
    t, flow = make_flow(logdet="exact")
    optimizer = torch.optim.Adam(t.parameters(), lr=0.05)
    v = digits_like(8)
    with torch.no_grad():
        flow.log_prob(v)  # a no-grad pass on the same tensor first
    for _ in range(3):
        optimizer.zero_grad()
        loss = -flow.log_prob(v).mean()
        with torch.no_grad():
            torch.testing.assert_close(loss, -flow.log_prob(v.clone()).mean())
        loss.backward()
        assert all(p.grad is not None for p in t.parameters() if p.requires_grad)
        optimizer.step()


def test_multiscale_pair_cache_is_dropped_when_a_block_option_changes() -> None:
    """A pair solved with a loose iteration cap is not served once the cap is raised."""
    torch.manual_seed(0)
    t = multiscale_iresnet((1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, factor_out=False,
                           coeff=0.97).to(DTYPE).eval()
    z = torch.randn(2, 1, 8, 8, dtype=DTYPE) * 3
    blocks = [m for m in t.modules() if isinstance(m, ResidualBlock)]
    for block in blocks:
        block.max_iter = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        x_loose = t.inv(z)
    for block in blocks:
        block.max_iter = 1000
    x = t.inv(z)
    assert x is not x_loose
    torch.testing.assert_close(t(x), z, rtol=0, atol=1e-10)


def test_logit_model_scores_its_own_samples() -> None:
    """Samples can leave (0, K) (the logit's inverse maps R onto a slightly larger interval); the
    declared support contains them, so ``log_prob`` with argument validation accepts them."""
    torch.manual_seed(0)
    _, flow = make_flow()
    with torch.no_grad():
        samples = flow.sample((64,))
        assert bool(((samples < 0) | (samples > 17)).any())  # the case the support must cover
        assert torch.isfinite(flow.log_prob(samples)).all()


def test_actnorm_waits_for_two_values_per_channel_and_respects_a_set_buffer() -> None:
    t = ActNorm(2)
    single = torch.randn(1, 2, 1, 1)
    assert torch.equal(t(single), single) and not bool(t.initialized)  # no std from one value: identity
    batch = torch.randn(16, 2, 3, 3) * 3 + 1
    y = t(batch)
    assert bool(t.initialized) and torch.isfinite(y).all()
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    # parameters and the buffer written from elsewhere (a DDP broadcast): not re-initialised
    other = ActNorm(2)
    with torch.no_grad():
        for mine, theirs in zip([*other.parameters(), *other.buffers()], [*t.parameters(), *t.buffers()]):
            mine.copy_(theirs)
    x = torch.randn(4, 2, 3, 3)
    assert torch.equal(other(x), t(x))


@pytest.mark.parametrize(("out_channels", "padding"), [(4, 0), (4, 2), (1, 1)],
                         ids=["no-padding", "wide-padding", "wide-to-narrow"])
def test_conv_operator_norm_other_paddings_and_narrow_outputs(out_channels: int, padding: int) -> None:
    weight = torch.randn(out_channels, 3, 3, 3, dtype=DTYPE)
    x = torch.randn(3, 5, 6, dtype=DTYPE)
    op = jacobian(lambda z: F.conv2d(z.unsqueeze(0), weight, padding=padding).squeeze(0), x)
    expected = float(torch.linalg.matrix_norm(op, ord=2))
    assert conv_operator_norm(weight, (3, 5, 6), padding=padding) == pytest.approx(expected, rel=1e-10)


def test_multiscale_normflows_sample_log_q_matches_log_prob() -> None:
    """sample() returns log q(x) with the sign convention of log_prob (after ActNorm's
    data-dependent initialisation, which a log_prob on data performs)."""
    from pyro_iresnet.normflows import multiscale_normalizing_flow

    torch.manual_seed(0)
    model = multiscale_normalizing_flow((1, 4, 4), hidden_channels=4, levels=17).double().eval()
    with torch.no_grad():
        model.log_prob(17 * torch.rand(8, 1, 4, 4, dtype=torch.float64))
        x, log_q = model.sample(3)
        torch.testing.assert_close(log_q, model.log_prob(x), rtol=1e-6, atol=1e-6)


def test_lanczos_operator_norm_is_an_upper_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lanczos adds its residual to the Ritz value, so it never undershoots the exact norm (a
    certificate must not), and overshoots it by rounding only."""
    torch.manual_seed(0)
    for _ in range(5):
        w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        dense = conv_operator_norm(w, (3, 6, 6), 1)  # 108 inputs: the dense, exact path
        with monkeypatch.context() as m:
            m.setattr(conv_module, "_DENSE_MAX_SIDE", 0)  # force Lanczos
            lanczos = conv_operator_norm(w, (3, 6, 6), 1)
        assert dense * (1 - 1e-14) <= lanczos <= dense * (1 + 1e-11)


def test_factor_out_recomputes_the_inner_logdet_for_another_pair() -> None:
    """For a pair other than the cached one the log-det must be the inner map's at x1. Inner:
    LogitTransform, whose log-det has the closed form sum log(1-2a) - log K - log p - log(1-p)."""
    torch.manual_seed(0)
    levels, alpha = 17, 0.05
    t = FactorOut(LogitTransform(levels, alpha), keep_channels=1)
    x = levels * torch.rand(3, 2, 2, 2, dtype=DTYPE)
    y = t(x)
    cached = t.log_abs_det_jacobian(x, y)
    recomputed = t.log_abs_det_jacobian(x.clone(), y.clone())  # not the cached pair
    p = alpha + (1 - 2 * alpha) * x[:, :1] / levels
    expected = (math.log(1 - 2 * alpha) - math.log(levels) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    torch.testing.assert_close(cached, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(recomputed, expected, rtol=1e-12, atol=1e-12)


def test_factor_out_does_not_serve_a_logdet_whose_pair_or_estimator_changed() -> None:
    """The log-det kept from a call (or from an inverse's halves) is not served once ``x`` or ``y``
    was modified in place, nor once an inner block's estimator changed."""
    torch.manual_seed(0)
    levels, alpha = 17, 0.05
    t = FactorOut(LogitTransform(levels, alpha), keep_channels=1)

    def expected(x: torch.Tensor) -> torch.Tensor:
        p = alpha + (1 - 2 * alpha) * x[:, :1] / levels
        return (math.log(1 - 2 * alpha) - math.log(levels) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)

    # a call in the other direction in between replaces torch's pair cache, which then no longer
    # tells that x changed: the kept log-det (or the inverse's halves) must check it itself
    x = levels * torch.rand(3, 2, 2, 2, dtype=DTYPE)
    y = t(x)
    t.inv(torch.randn(3, 2, 2, 2, dtype=DTYPE))
    x.mul_(0.5)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), expected(x), rtol=1e-12, atol=1e-12)
    y = torch.randn(3, 2, 2, 2, dtype=DTYPE)
    x = t.inv(y)
    t(levels * torch.rand(3, 2, 2, 2, dtype=DTYPE))
    x.mul_(0.5)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), expected(x), rtol=1e-12, atol=1e-12)

    inner = conv_iresnet((1, 4, 4), hidden_channels=4, coeff=0.9).to(DTYPE)
    t = FactorOut(inner, keep_channels=1)
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    y = t(x)
    draw = t.log_abs_det_jacobian(x, y)
    inner.block.logdet_method = "exact"
    exact = inner.block.logdet(x[:, :1])
    assert (draw - exact).abs().max() > 1e-6
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), exact)


def test_multiscale_scale_is_actnorm_then_block_pairs() -> None:
    """The documented structure of a scale is Squeeze, n_blocks x (ActNorm, conv_iresnet), [next
    scale], Unsqueeze."""
    from pyro_iresnet.images import Squeeze, Unsqueeze
    from pyro_iresnet.pyro import InvertibleResidual

    flow = multiscale_iresnet((1, 4, 4), n_scales=1, n_blocks=2, hidden_channels=4)
    scale = flow.encoder.parts[0]
    kinds = [type(p) for p in scale.parts]
    assert kinds == [Squeeze, ActNorm, InvertibleResidual, ActNorm, InvertibleResidual, Unsqueeze]


def test_conv_operator_norm_rejects_an_empty_output() -> None:
    """A kernel that leaves exactly 0 output rows (H + 2 p - k + 1 = 0) must raise the documented
    ValueError (not an IndexError from an empty eigvalsh)."""
    weight = torch.randn(1, 1, 5, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match="has no output"):
        conv_operator_norm(weight, (1, 4, 4), padding=0)


def test_lipschitz_cnn_has_an_activation_between_every_pair_of_convolutions() -> None:
    """g = A_L o phi o ... o phi o A_1, so the layers alternate Conv, phi, Conv, phi, Conv."""
    g = LipschitzCNN([2, 4, 4, 2], [3, 1, 3], input_shape=(2, 4, 4))
    from pyro_iresnet import LipSwish

    kinds = [type(m) for m in g.layers]
    assert kinds == [SpectralNormConv2d, LipSwish, SpectralNormConv2d, LipSwish, SpectralNormConv2d]
    g = LipschitzCNN([2, 4, 2], [3, 3], input_shape=(2, 4, 4), activation="elu")
    assert [type(m) for m in g.layers] == [SpectralNormConv2d, torch.nn.ELU, SpectralNormConv2d]


def test_lipschitz_cnn_checks_channels_against_input_shape() -> None:
    """The documented ValueError must be raised (else the net's event_shape would disagree
    with its first convolution)."""
    with pytest.raises(ValueError, match=r"channels\[0\] must equal input_shape\[0\]=2"):
        LipschitzCNN([3, 4, 2], [3, 3], input_shape=(2, 4, 4))


def test_multiscale_normalizing_flow_base_is_a_fixed_standard_normal() -> None:
    """The normflows model's base distribution is a fixed standard normal over input_shape: it
    holds no trainable parameters (an optimiser over model.parameters() cannot move it) and its
    log-density is the standard normal's, -0.5 (|z|^2 + D log 2 pi)."""
    from pyro_iresnet.normflows import multiscale_normalizing_flow

    torch.manual_seed(0)
    model = multiscale_normalizing_flow((1, 4, 4), hidden_channels=4, levels=17)
    assert [p for p in model.q0.parameters() if p.requires_grad] == []
    z = torch.randn(3, 1, 4, 4)
    expected = -0.5 * (z.flatten(1).pow(2).sum(1) + 16 * math.log(2 * math.pi))
    assert torch.allclose(model.q0.log_prob(z), expected, atol=1e-5)


def test_dequantize_adds_standard_uniform_noise() -> None:
    """dequantize(x) = x + u with u ~ U[0, 1) from torch's RNG: u lies in [0, 1), fills the whole
    unit interval (mean 1/2, variance 1/12, both halves equally often), and the draw is
    reproducible from torch's seed."""
    x = torch.arange(17, dtype=DTYPE).repeat(6000)  # 102000 entries
    torch.manual_seed(0)
    u = dequantize(x) - x
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    n = u.numel()
    # standard errors: mean 0.29/sqrt(n) ~ 9e-4, variance ~ 2.6e-4, half fraction 1.6e-3
    assert abs(float(u.mean()) - 0.5) < 6e-3
    assert abs(float(u.var()) - 1.0 / 12.0) < 2e-3
    assert abs(float((u >= 0.5).double().mean()) - 0.5) < 1e-2
    assert float(u.max()) > 0.999 and n == 102000
    torch.manual_seed(1)
    v = dequantize(x)
    torch.manual_seed(1)
    assert torch.equal(v, x + torch.rand_like(x))


def test_bits_per_dim_rejects_a_non_positive_num_dims() -> None:
    """num_dims is a positive count: 0 and -1 raise ValueError instead of giving inf or a
    negated value."""
    log_prob = torch.tensor([-10.0], dtype=DTYPE)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_dims"):
            bits_per_dim(log_prob, num_dims=bad)
    assert math.isclose(float(bits_per_dim(log_prob, num_dims=5)), 10.0 / (5 * math.log(2.0)), rel_tol=1e-15)


def test_unsqueeze_rejects_a_channel_count_not_divisible_by_four() -> None:
    """Unsqueeze (and Squeeze.inv) need C divisible by 4 and say so with a ValueError."""
    y = torch.randn(2, 6, 2, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="divisible by 4"):
        Unsqueeze()(y)
    with pytest.raises(ValueError, match="divisible by 4"):
        Squeeze().inv(y)


def test_squeeze_rejects_an_odd_width() -> None:
    """Squeeze needs an even height *and* an even width: an odd width alone raises ValueError."""
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.randn(2, 1, 4, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="even height and width"):
        Unsqueeze().inv(torch.randn(2, 1, 4, 3, dtype=DTYPE))


def test_multiscale_iresnet_passes_alpha_to_its_logit_transform() -> None:
    """multiscale_iresnet(levels=K, alpha=a) starts with the logit map y = logit(a + (1 - 2a) v / K)
    with that margin a, not the default."""
    from pyro_iresnet import LogitTransform, multiscale_iresnet

    t = multiscale_iresnet((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4, levels=17, alpha=0.2,
                           logdet="exact").double()
    logit = t.encoder.parts[0]
    assert isinstance(logit, LogitTransform) and logit.alpha == 0.2
    v = torch.rand(3, 1, 4, 4, dtype=DTYPE) * 17
    assert torch.allclose(logit(v), torch.logit(0.2 + 0.6 * v / 17), atol=1e-12, rtol=0)


def test_multiscale_iresnet_passes_kernel_sizes_to_every_block() -> None:
    """Every block of multiscale_iresnet(kernel_sizes=ks) is a LipschitzCNN with len(ks)
    convolutions of exactly those kernel sizes, in order."""
    from pyro_iresnet import LipschitzCNN, SpectralNormConv2d, multiscale_iresnet

    t = multiscale_iresnet((1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, kernel_sizes=(1, 3))
    nets = [m for m in t.modules() if isinstance(m, LipschitzCNN)]
    assert len(nets) == 2
    for net in nets:
        convs = [m for m in net.modules() if isinstance(m, SpectralNormConv2d)]
        assert [c.kernel_size for c in convs] == [1, 3]


def test_lanczos_operator_norm_leaves_the_global_rng_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """conv_operator_norm on the Lanczos path (dense path disabled) starts from its own seeded
    generator: torch's global RNG state is unchanged, and the value matches the dense one."""
    import pyro_iresnet.conv as conv_module
    from pyro_iresnet.conv import conv_operator_norm

    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, dtype=DTYPE)
    dense = conv_operator_norm(w, (2, 5, 5), padding=1)
    monkeypatch.setattr(conv_module, "_DENSE_MAX_SIDE", 0)
    state = torch.get_rng_state()
    lanczos = conv_operator_norm(w, (2, 5, 5), padding=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert math.isclose(lanczos, dense, rel_tol=1e-9)


@pytest.mark.parametrize("training", [True, False])
def test_exact_logdet_of_a_convolutional_block_on_an_empty_batch(training: bool) -> None:
    """vmap cannot batch a convolution over N = 0: the exact log-det (the eval default for small
    images) raised an IndexError for an empty batch."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzCNN([2, 4, 2], [3, 3], (2, 3, 3), coeff=0.9), event_dim=3, logdet="exact")
    block.train(training)
    y, logdet = block.forward_and_logdet(torch.randn(0, 2, 3, 3))
    assert y.shape == (0, 2, 3, 3) and logdet.shape == (0,)


def test_actnorm_refuses_a_non_finite_initialisation_batch_and_stays_uninitialised() -> None:
    """A NaN in the first batch set log_scale = NaN for good: every later call, also with clean data,
    then failed. Now the first call raises and the next clean batch initialises."""
    torch.manual_seed(0)
    actnorm = ActNorm(2)
    bad = torch.randn(8, 2, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the batch that initialises ActNorm.*must be finite, got 1 NaN"):
        actnorm(bad)
    assert not bool(actnorm.initialized) and bool(torch.isfinite(actnorm.log_scale).all())
    y = actnorm(torch.randn(8, 2, 3, 3) * 3 + 1)
    assert bool(actnorm.initialized) and bool(torch.isfinite(y).all())


def test_dequantized_values_stay_below_the_next_integer() -> None:
    """In float32, x + u rounded up to x + 1 for u within half an ulp of 1 (68 of 1e7 pixels at
    x = 255), outside [0, K) and with floor(v) != x."""
    torch.manual_seed(0)
    x = torch.full((2_000_000,), 255.0)
    v = dequantize(x)
    assert bool((v < 256).all()) and bool((v.floor() == x).all())


def test_sampling_before_any_density_call_gives_the_log_density_of_the_map_it_applied() -> None:
    """Sampling a fresh multiscale flow runs the inverse, where an ActNorm is still the identity. The
    log-det of that pair re-ran the nested scale's explicit maps on fresh slices (missing their
    caches): a nested ActNorm initialised itself from the samples and its scale entered the
    log-density (off by 1.23 nats here). Reference: the same flow with the ActNorms fixed at the
    identity, i.e. the map the sampler applied."""
    import copy

    torch.manual_seed(0)
    shape = (1, 4, 4)
    flow_t = multiscale_iresnet(shape, n_scales=2, n_blocks=1, hidden_channels=4, logdet="exact").double().eval()
    reference = copy.deepcopy(flow_t)
    for module in reference.modules():
        if isinstance(module, ActNorm):
            module.initialized.fill_(True)
            module._initialized = True
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(3)
    density = dist.TransformedDistribution(base, [flow_t])
    with torch.no_grad():
        x = density.sample((4,))
        log_prob = density.log_prob(x)
        expected = dist.TransformedDistribution(base, [reference]).log_prob(x.clone())
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-10)
    assert not any(bool(m.initialized) for m in flow_t.modules() if isinstance(m, ActNorm))


def test_a_copy_of_a_block_in_training_mode_applies_the_same_map() -> None:
    """The power iteration's refresh markers hold storage addresses and version counters: a
    deepcopy (or torch.save/load) in training mode did not recognise its weight and ran power steps
    its original did not (outputs differed by 1e-4)."""
    import copy
    import io

    torch.manual_seed(0)
    block = conv_iresnet((2, 6, 6), hidden_channels=16).train()
    x = torch.randn(3, 2, 6, 6)
    block(x)
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (copy.deepcopy(block), loaded):
        assert torch.equal(clone(x.clone()), block(x.clone()))


@pytest.mark.parametrize(
    "batch, error, match",
    [
        (torch.randn(8, 1, 4, 4, dtype=torch.float64), TypeError, "x has dtype torch.float64 but the model's"),
        (torch.randn(8, 1, 4, 6), ValueError, r"x must have shape \(..., 1, 4, 4\)"),
        (torch.randn(8, 1, 8, 8), ValueError, r"x must have shape \(..., 1, 4, 4\)"),
    ],
    ids=["dtype", "width", "size"],
)
@pytest.mark.parametrize("frontend", ["pyro", "normflows"])
def test_a_batch_a_block_would_refuse_does_not_initialise_actnorm_first(
    batch: torch.Tensor, error: type, match: str, frontend: str
) -> None:
    """The scale checks the batch before its first ActNorm takes its statistics from it."""
    from pyro_iresnet.normflows import multiscale_normalizing_flow

    torch.manual_seed(0)
    options = dict(n_scales=1, n_blocks=1, hidden_channels=4, logdet="exact")
    if frontend == "pyro":
        model = multiscale_iresnet((1, 4, 4), **options)
        call = model.encoder
    else:
        model = multiscale_normalizing_flow((1, 4, 4), **options)
        call = model.log_prob
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("eps", [float("nan"), -10.0, float("inf"), 0.0])
def test_actnorm_refuses_an_eps_that_is_not_finite_and_positive(eps: float) -> None:
    with pytest.raises(ValueError, match=f"eps must be a finite float > 0, got {eps}"):
        ActNorm(2, eps=eps)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_image_maps_refuse_non_floating_input(dtype: torch.dtype) -> None:
    """An integer or complex batch would initialise ActNorm from a cast or from its real part."""
    t = ActNorm(2)
    x = torch.ones(4, 2, 2, 2, dtype=dtype)
    for call in (t, t.inv, Squeeze(), LogitTransform(17)):
        with pytest.raises(TypeError, match=f"must have a floating dtype, got {dtype}"):
            call(x)
    assert not bool(t.initialized)


def test_logit_transform_refuses_data_outside_its_domain() -> None:
    """0..255 pixels given to a 17-level model: named where they enter, not as NaN further on."""
    t = LogitTransform(17)
    with pytest.raises(ValueError, match=r"x must lie in \[-0.9444, 17.94\].*got values from 0 to 255"):
        t(torch.linspace(0, 255, 16).reshape(1, 1, 4, 4))
    with pytest.raises(ValueError, match="x must lie in"):
        t(torch.full((1, 1, 2, 2), float("nan")))
    inside = torch.full((1, 1, 2, 2), 17.9)  # beyond the data range, inside the domain: a model sample
    assert bool(torch.isfinite(t(inside)).all())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: LogitTransform(17, alpha="0.1"), "alpha must be a float in \\(0, 0.5\\), got str"),
        (lambda: conv_iresnet((1, 4, 4), kernel_sizes=3), "kernel_sizes must be a sequence of ints, got int"),
        (lambda: dequantize([1.0]), "x must be a torch.Tensor, got list"),
    ],
    ids=["alpha", "kernel_sizes", "dequantize"],
)
def test_image_helpers_name_a_wrongly_typed_argument(call, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        call()


def test_logit_transform_takes_back_its_own_saturated_samples() -> None:
    """Far out in the latent space the inverse's sigmoid rounds to 1 (or 0) in float32: the sample
    lies on the domain's edge, and the forward map still gives finite values and log-dets."""
    t = LogitTransform(17)
    y = torch.tensor([-30.0, -20.0, 17.0, 20.0, 30.0]).reshape(1, 1, 1, 5)
    v = t.inv(y.clone())
    v = v.clone()  # a new tensor: no cache hit
    y_again = t(v)
    assert bool(torch.isfinite(y_again).all()) and bool(torch.isfinite(t.log_abs_det_jacobian(v, y_again)).all())


def test_conv_iresnet_takes_kernel_sizes_from_a_numpy_array() -> None:
    import numpy as np

    t = conv_iresnet((1, 4, 4), hidden_channels=4, kernel_sizes=np.array([3, 1, 3]))
    assert t(torch.randn(2, 1, 4, 4)).shape == (2, 1, 4, 4)


@pytest.mark.parametrize(
    "dtype, levels, alpha, values",
    [(torch.bfloat16, 256, 1e-3, [0.0, 0.5, 255.5]), (torch.float16, 256, 1e-5, [0.005, 0.5, 255.5])],
)
def test_logit_transform_keeps_ordinary_data_exact_in_low_precision(dtype, levels, alpha, values) -> None:
    """Only p = 0 or 1 moves (to the nearest number inside): data near either end are not clamped
    when alpha is small against the dtype's resolution (Residual Flows use alpha = 1e-5 on MNIST)."""
    t = LogitTransform(levels, alpha=alpha)
    v = torch.tensor(values, dtype=dtype).reshape(1, 1, 1, -1)
    p = t.alpha + (1.0 - 2.0 * t.alpha) * v / t.levels
    assert torch.equal(t(v), torch.logit(p))


def test_shape_functions_refuse_shapes_the_maps_cannot_take() -> None:
    """``Squeeze`` on odd sizes (it floored them) and a multi-scale model on a base of another event
    shape (accepted, failing only when sampling): refused where the distribution is built."""
    with pytest.raises(ValueError, match=r"even H and W, got \(2, 1, 7, 8\)"):
        Squeeze().forward_shape(torch.Size((2, 1, 7, 8)))
    with pytest.raises(ValueError, match=r"C a multiple of 4, got \(3, 2, 2\)"):
        Squeeze().inverse_shape(torch.Size((3, 2, 2)))
    assert Unsqueeze().forward_shape(torch.Size((5, 8, 2, 3))) == (5, 2, 4, 6)
    t = multiscale_iresnet((1, 8, 8), n_scales=1, n_blocks=1, hidden_channels=4)
    for shape in [(1, 7, 8), (1, 4, 4), (4, 4, 4), (1, 6, 6)]:
        with pytest.raises(ValueError, match="even H and W|inputs of residual block"):
            dist.TransformedDistribution(dist.Normal(torch.zeros(shape), 1.0).to_event(3), [t])
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3), [t])
    assert flow.event_shape == (1, 8, 8)


@pytest.mark.parametrize(("levels", "alpha", "dtype"), [(5, 0.05, torch.float32), (17, 0.05, torch.float32),
                                                        (256, 0.05, torch.float32), (17, 1e-6, torch.float64)])
def test_logit_inverse_of_saturated_logits_lies_in_the_declared_domain(levels: int, alpha: float, dtype) -> None:
    """Where the sigmoid saturates, the inverse returns the domain's edge, which rounding put an ulp
    outside the declared interval: Pyro's support check then refused the model's own samples."""
    t = LogitTransform(levels, alpha)
    y = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=dtype).reshape(1, 1, 1, 5)
    x = t.inv(y)
    assert bool(t.domain.check(x).all()), x
    torch.testing.assert_close(x[..., 2], torch.full_like(x[..., 2], levels / 2))  # inside: unchanged


def test_actnorm_restored_without_its_buffer_is_not_initialised_again() -> None:
    """Pyro's param store holds parameters, not the ``initialized`` buffer: parameters put back with
    ``pyro.module(..., update_module_params=True)`` (or a state dict without the buffer, loaded with
    ``strict=False``) are a trained model's and are kept at the next call."""
    import pyro

    torch.manual_seed(0)
    trained = ActNorm(2)
    trained(torch.randn(16, 2, 3, 3) * 4 + 1)
    pyro.clear_param_store()
    pyro.module("norm", trained)
    state = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    pyro.clear_param_store()
    for name, value in state.items():
        pyro.param(name, value)
    restored = ActNorm(2)
    pyro.module("norm", restored, update_module_params=True)
    x = torch.randn(8, 2, 3, 3)
    torch.testing.assert_close(restored(x), trained(x))
    loaded = ActNorm(2)
    without_buffer = {k: v for k, v in trained.state_dict().items() if k != "initialized"}
    loaded.load_state_dict(without_buffer, strict=False)
    torch.testing.assert_close(loaded(x), trained(x))
    fresh = ActNorm(2)
    fresh(x)
    assert bool(fresh.initialized) and not torch.allclose(fresh.log_scale, torch.zeros(2))
    pyro.clear_param_store()
    # zeros put in place on purpose (new Parameters, or a conversion that replaces them) still
    # initialise from the next batch
    reset = ActNorm(2)
    reset.log_scale, reset.bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    data = torch.randn(16, 2, 3, 3) * 4 + 1
    y = reset(data)
    assert bool(reset.initialized)
    torch.testing.assert_close(y.movedim(-3, 0).reshape(2, -1).std(1), torch.ones(2), rtol=1e-4, atol=0)


def test_lanczos_warns_when_its_iteration_cap_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped by the cap short of its tolerance, Lanczos's value is not known to bound the norm:
    it warns instead of returning it silently (a certificate could rest on it)."""
    from pyro_iresnet import LipschitzWarning

    torch.manual_seed(0)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    monkeypatch.setattr(conv_module, "_DENSE_MAX_SIDE", 0)  # force Lanczos
    monkeypatch.setattr(conv_module, "_LANCZOS_MAX_ITER", 3)
    with pytest.warns(LipschitzWarning, match="stopped after 3 iterations"):
        conv_operator_norm(w, (3, 6, 6), 1)
    monkeypatch.setattr(conv_module, "_LANCZOS_MAX_ITER", 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv_operator_norm(w, (3, 6, 6), 1)


def test_multiscale_refuses_alpha_without_levels_and_takes_numpy_shapes() -> None:
    """``alpha`` without ``levels`` was silently ignored; a shape read from a numpy array was refused
    though numpy integers are accepted everywhere else."""
    with pytest.raises(ValueError, match="alpha=0.6 is the logit preprocessing's margin, which needs levels"):
        multiscale_iresnet((1, 8, 8), alpha=0.6)
    t = multiscale_iresnet(tuple(np.array([1, 8, 8])), n_scales=1, n_blocks=1, hidden_channels=4, levels=17, alpha=0.1)
    logit = next(m for m in t.modules() if isinstance(m, LogitTransform))
    assert logit.alpha == 0.1
    with pytest.raises(ValueError, match=r"three positive ints \(C, H, W\)"):
        multiscale_iresnet((1, 8, True))


def test_factor_out_names_an_inner_transform_that_changes_the_shape() -> None:
    """A shape-changing inner transform (a Squeeze) failed inside ``torch.cat`` with its size error."""
    t = FactorOut(Squeeze(), keep_channels=1)
    with pytest.raises(ValueError, match=r"inner transform must keep the shape .* inner\(x\) has shape \(2, 4, 2, 2\)"):
        t(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"inner.inv\(y\) has shape \(2, 16, 1, 1\)"):
        FactorOut(Unsqueeze(), keep_channels=4).inv(torch.randn(2, 5, 2, 2))
