"""Pyro adapter: a registry of helper-built transforms (and their ``.inv``) checked against
autograd Jacobians, plus caching, stacking with Pyro's transforms, SVI and error messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import transforms as T
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform

from pyro_iresnet import (
    ConditionalInvertibleResidual,
    InvertibleResidual,
    LipschitzMLP,
    SpectralNormLinear,
    conditional_iresnet,
    iresnet,
    lipschitz_bound,
    logdet_error_bound,
)
from pyro_iresnet.context import ConcatContextNet
from tests.conftest import activate

DTYPE = torch.float64
CONTEXT_DIM = 3


@dataclass
class Case:
    """A transform under test, the module owning its parameters and its event size."""

    transform: Transform
    module: nn.Module
    dim: int
    exact: bool = True  # False: the training estimator is stochastic; log-det checks use eval()
    inverted: bool = False  # the transform is the .inv of an InvertibleResidual

    def explicit(self, v: Tensor) -> Tensor:
        """The explicit map v + g(v) of the underlying block, straight from its net (an
        independent reference: no transform, estimator or solver code involved)."""
        t = self.transform.inv if self.inverted else self.transform
        context = t._context
        if context is not None:
            context = context.expand(*v.shape[:-1], context.shape[-1])
        return v + t.block.g(v, context)

    def reference_logdet(self, x: Tensor) -> Tensor:
        """log|det| of the transform at x (N, d), from the autograd Jacobian of the explicit map."""
        if not self.inverted:
            return per_sample_logdet(self.explicit, x)
        return -per_sample_logdet(self.explicit, self.transform(x.clone()).detach())


def _plain(dim: int, **options: object) -> Callable[[], Case]:
    def make() -> Case:
        exact = options.get("logdet", "unbiased") == "exact"
        t = activate(iresnet(dim, **options).to(DTYPE))
        return Case(t, t, dim, exact)

    return make


def _conditional(dim: int, **options: object) -> Callable[[], Case]:
    def make() -> Case:
        c = activate(conditional_iresnet(dim, CONTEXT_DIM, **options).to(DTYPE))
        context = torch.randn(CONTEXT_DIM, dtype=DTYPE)
        return Case(c.condition(context), c, dim, options.get("logdet") == "exact")

    return make


def _inverse(factory: Callable[[], Case]) -> Callable[[], Case]:
    def make() -> Case:
        case = factory()
        return Case(case.transform.inv, case.module, case.dim, case.exact, inverted=True)

    return make


BASE_CASES: dict[str, Callable[[], Case]] = {
    "iresnet-2": _plain(2, logdet="exact"),
    "iresnet-3-coeff0.9": _plain(3, coeff=0.9, logdet="exact"),
    "poisson-roulette": _plain(2, roulette="poisson", lam=2.0),
    "anderson-inverse": _plain(2, logdet="exact", inverse_method="anderson"),
    "conditional": _conditional(2, logdet="exact"),
}
CASES = {**BASE_CASES, **{f"{name}.inv": _inverse(f) for name, f in BASE_CASES.items()}}


def per_sample_logdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Reference ``log|det J_fn|`` per row of ``x`` (N, d): autograd Jacobian + ``slogdet``."""
    jac = torch.autograd.functional.jacobian(fn, x)  # (N, d, N, d)
    idx = torch.arange(x.shape[0])
    return torch.linalg.slogdet(jac[idx, :, idx, :])[1]


def _base(dim: int, batch_shape: tuple[int, ...] = ()) -> dist.Distribution:
    loc = torch.zeros(*batch_shape, dim, dtype=DTYPE)
    return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


# -- registry properties ---------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    case = CASES[name]()
    if not case.exact:
        case.module.eval()  # eval_logdet="auto": exact for small d
    t = case.transform
    x = 1.5 * torch.randn(5, case.dim, dtype=DTYPE)
    y = t(x)
    ref = case.reference_logdet(x)
    assert (y - x).abs().max() > 0.02 and ref.abs().min() > 1e-3  # the warm-up made g non-trivial
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), ref, rtol=1e-8, atol=1e-8)
    # a pair not produced by the last call is recomputed
    torch.testing.assert_close(t.log_abs_det_jacobian(x.clone(), y.clone()), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", CASES)
def test_round_trip(name: str) -> None:
    case = CASES[name]()
    t = case.transform
    x = 2.0 * torch.randn(16, case.dim, dtype=DTYPE)
    y = t(x)
    assert (y - x).abs().max() > 1e-2
    x_back = t.inv(y.clone())  # clone: bypass torch's transform cache
    assert (x_back - x).abs().max() < 1e-6


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("batch_shape", [(), (3,), (3, 4), (3, 4, 5)], ids=str)
def test_shapes(name: str, batch_shape: tuple[int, ...]) -> None:
    case = CASES[name]()
    t, d = case.transform, case.dim
    shape = torch.Size((*batch_shape, d))
    assert t.forward_shape(shape) == shape and t.inverse_shape(shape) == shape
    x = torch.randn(shape, dtype=DTYPE)
    y = t(x)
    assert y.shape == shape and t.log_abs_det_jacobian(x, y).shape == batch_shape
    flow = dist.TransformedDistribution(_base(d, batch_shape), [t])
    assert flow.batch_shape == batch_shape and flow.event_shape == (d,)
    sample = flow.sample((2,))
    assert sample.shape == (2, *shape)
    log_prob = flow.log_prob(sample)
    assert log_prob.shape == (2, *batch_shape) and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("name", CASES)
def test_adam_steps_on_negative_log_prob(name: str) -> None:
    case = CASES[name]()
    flow = dist.TransformedDistribution(_base(case.dim), [case.transform])
    data = torch.randn(32, case.dim, dtype=DTYPE) * 0.5 + 1.0
    params = [p for p in case.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optim = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        optim.zero_grad()
        loss = -flow.log_prob(data).mean()
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optim.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, params)]
    assert all(changed)


@pytest.mark.parametrize("name", CASES)
def test_log_prob_is_change_of_variables(name: str) -> None:
    """log p_Y(y) = log p_Z(z) - log|det J_t(z)| with z = t^{-1}(y), reference from autograd."""
    case = CASES[name]()
    if not case.exact:
        case.module.eval()
    t, base = case.transform, _base(case.dim)
    z = torch.randn(6, case.dim, dtype=DTYPE)
    y = t(z).detach().clone()  # a fresh tensor: log_prob must run t's inverse
    expected = base.log_prob(z) - case.reference_logdet(z)
    actual = dist.TransformedDistribution(base, [t]).log_prob(y)
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7)


def test_log_prob_both_orientations_of_a_composition() -> None:
    blocks = [activate(iresnet(2, logdet="exact").to(DTYPE)) for _ in range(2)]
    base = _base(2)
    data = torch.randn(7, 2, dtype=DTYPE)

    def explicit(v: Tensor) -> Tensor:  # data -> latent through the explicit maps only
        return blocks[1].block(blocks[0].block(v))

    z = explicit(data)
    expected = base.log_prob(z) + per_sample_logdet(explicit, data)
    density = dist.TransformedDistribution(base, [ComposeTransform(blocks).inv])
    torch.testing.assert_close(density.log_prob(data), expected, rtol=1e-8, atol=1e-8)
    # the forward orientation: y = blocks[1](blocks[0](z)), log_prob needs both inverses
    sampler = dist.TransformedDistribution(base, [ComposeTransform(blocks)])
    z_sampled = torch.randn(7, 2, dtype=DTYPE)
    y = explicit(z_sampled).detach().clone()
    ref = base.log_prob(z_sampled) - per_sample_logdet(explicit, z_sampled)
    torch.testing.assert_close(sampler.log_prob(y), ref, rtol=1e-7, atol=1e-7)


def test_conditional_lipschitz_and_inverse_module() -> None:
    c = activate(conditional_iresnet(2, CONTEXT_DIM, coeff=0.9, logdet="exact").to(DTYPE))
    assert isinstance(c, ConditionalInvertibleResidual)
    bound = lipschitz_bound(c)
    assert 0.5 < bound < 1.0
    context = torch.randn(4, CONTEXT_DIM, dtype=DTYPE)
    x = torch.randn(4, 2, dtype=DTYPE)
    y = c.condition(context)(x)
    x_back = c.inv.condition(context)(y.clone())
    assert (x_back - x).abs().max() < 1e-6
    # the context changes the map
    other = c.condition(torch.randn(4, CONTEXT_DIM, dtype=DTYPE))(x)
    assert (other - y).abs().max() > 1e-3
    flow = dist.ConditionalTransformedDistribution(_base(2), [c])
    assert flow.condition(context).log_prob(y).shape == (4,)


# -- caching ---------------------------------------------------------------------------------
def test_cached_logdet_is_the_draw_made_in_call() -> None:
    t = activate(iresnet(2, logdet="unbiased").to(DTYPE))
    x = torch.randn(8, 2, dtype=DTYPE)
    torch.manual_seed(1)
    _, logdet_in_call = t.block.forward_and_logdet(x)
    torch.manual_seed(1)
    y = t(x)
    state = torch.get_rng_state()
    cached = t.log_abs_det_jacobian(x, y)
    assert torch.equal(torch.get_rng_state(), state)  # no second estimator draw
    assert torch.equal(cached, logdet_in_call)
    recomputed = t.log_abs_det_jacobian(x.clone(), y.clone())
    assert not torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(recomputed, cached)


def test_poisson_roulette_logdet_is_unbiased_in_training() -> None:
    t = activate(iresnet(2, roulette="poisson", lam=2.0).to(DTYPE))
    x0 = torch.randn(2, dtype=DTYPE)
    exact = per_sample_logdet(lambda v: v + t.block.g(v), x0[None])[0]
    x = x0.expand(64, 2)
    with torch.no_grad():
        means = torch.stack([t.log_abs_det_jacobian(x, x).mean() for _ in range(200)])
    standard_error = means.std() / 200**0.5
    assert (means.mean() - exact).abs() < 4 * standard_error + 1e-6, (means.mean(), exact, standard_error)
    assert means.std() > 0  # the estimator is random: the check above is not vacuous


def test_other_pair_recomputes() -> None:
    """Pyro's Planar bug: the log-det of (x1, y1) after another call must be that of x1."""
    t = activate(iresnet(2, logdet="exact").to(DTYPE))
    x1, x2 = torch.randn(2, 5, 2, dtype=DTYPE)
    y1 = t(x1)
    t(x2)
    ref = per_sample_logdet(lambda v: v + t.block.g(v), x1)
    torch.testing.assert_close(t.log_abs_det_jacobian(x1, y1), ref)


def test_clear_cache() -> None:
    t = activate(iresnet(2, logdet="unbiased").to(DTYPE))
    x = torch.randn(4, 2, dtype=DTYPE)
    y = t(x)
    t.clear_cache()
    assert t(x) is not y  # torch's (x, y) cache is gone
    y = t(x)
    t.clear_cache()
    state = torch.get_rng_state()
    t.log_abs_det_jacobian(x, y)
    assert not torch.equal(torch.get_rng_state(), state)  # the cached log-det was dropped


def test_cache_is_dropped_after_an_optimiser_step() -> None:
    t = activate(iresnet(2, logdet="exact").to(DTYPE))
    data = torch.randn(8, 2, dtype=DTYPE)
    x_old = t.inv(data)
    assert t.inv(data) is x_old  # torch's cache serves the pair while nothing changed
    optim = torch.optim.SGD(t.parameters(), lr=0.5)
    (-dist.TransformedDistribution(_base(2), [t]).log_prob(data).sum()).backward()
    optim.step()
    x_new = t.inv(data)
    assert x_new is not x_old
    torch.testing.assert_close(t.block(x_new), data)
    torch.testing.assert_close(
        t.log_abs_det_jacobian(x_new, data), per_sample_logdet(lambda v: v + t.block.g(v), x_new.detach())
    )


def test_cache_is_dropped_when_the_cached_input_or_output_is_modified_in_place() -> None:
    """torch's cache matches tensors by identity: after ``x.add_(1)`` (or ``y.add_(1)``) the pair
    it holds no longer belongs to that tensor."""
    t = activate(iresnet(2, logdet="exact").to(DTYPE))
    x = torch.randn(4, 2, dtype=DTYPE)
    y = t(x)
    with torch.no_grad():
        x.add_(1.0)
    y_new = t(x)
    assert y_new is not y
    torch.testing.assert_close(y_new, t.block(x))
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y_new), t.block.logdet(x))
    with torch.no_grad():
        y_new.add_(1.0)
    torch.testing.assert_close(t.block(t.inv(y_new)), y_new)


@pytest.mark.parametrize("cache_size", [0, 1])
def test_cached_logdet_is_not_served_after_its_pair_was_modified_in_place(cache_size: int) -> None:
    """The log-det kept from ``_call`` belongs to the (x, y) tensors as they were: modified in place
    since (also after an inverse call replaced torch's pair cache, and with ``cache_size=0``, which
    keeps no pair) it is estimated afresh at the new x."""
    t = activate(iresnet(2, logdet="exact", cache_size=cache_size).to(DTYPE))
    x = torch.randn(3, 2, dtype=DTYPE)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    t.inv(torch.randn(3, 2, dtype=DTYPE))
    with torch.no_grad():
        x.mul_(5.0)
    exact = per_sample_logdet(lambda v: v + t.block.g(v), x)
    assert (exact - per_sample_logdet(lambda v: v + t.block.g(v), x / 5)).abs().max() > 1e-3
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), exact)


def test_cached_logdet_is_not_served_after_an_option_changed() -> None:
    """A log-det drawn with the unbiased estimator is not served for the same pair once the block's
    estimator is exact; the pair cache goes with it (the tolerances of an inverse may have changed)."""
    t = activate(iresnet(2).to(DTYPE))
    x = torch.randn(4, 2, dtype=DTYPE)
    y = t(x)
    draw = t.log_abs_det_jacobian(x, y)
    t.block.logdet_method = "exact"
    exact = per_sample_logdet(lambda v: v + t.block.g(v), x)
    assert (draw - exact).abs().max() > 1e-6
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), exact)
    data = torch.randn(4, 2, dtype=DTYPE)
    x_loose = t.inv(data)
    t.block.atol = 1e-14
    assert t.inv(data) is not x_loose


def test_cached_pair_is_not_served_after_a_layer_coeff_changed() -> None:
    """A layer's ``coeff`` changes what g computes: the pair and its log-det are computed afresh."""
    t = activate(iresnet(2, hidden_dims=[16], coeff=0.97, logdet="exact").to(DTYPE))
    x = torch.randn(4, 2, dtype=DTYPE)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    for layer in t.modules():
        if isinstance(layer, SpectralNormLinear):
            layer.coeff = 0.1
    y_new = t(x)
    assert y_new is not y
    torch.testing.assert_close(y_new, x + t.block.g(x))
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y_new), per_sample_logdet(lambda v: v + t.block.g(v), x))


def test_cache_is_dropped_when_the_mode_changes() -> None:
    """A pair cached in training mode (a random log-det draw) is not served in ``eval()``
    (exact log-det), and one computed under ``no_grad`` is not served when gradients are on."""
    t = activate(iresnet(2).to(DTYPE))
    x = torch.randn(5, 2, dtype=DTYPE)
    y_train = t(x)
    t.eval()
    y_eval = t(x)
    assert y_eval is not y_train
    exact = per_sample_logdet(lambda v: v + t.block.g(v), x)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y_eval), exact)
    t.train()
    with torch.no_grad():
        y_no_grad = t(x)
    y_grad = t(x)
    assert y_grad is not y_no_grad and y_grad.requires_grad


def test_empty_batch() -> None:
    t = activate(iresnet(2).to(DTYPE))
    x = torch.zeros(0, 2, dtype=DTYPE)
    for mode in (t.train, t.eval):
        mode()
        y = t(x)
        assert y.shape == (0, 2) and t.log_abs_det_jacobian(x, y).shape == (0,)
        assert t.inv(x.clone()).shape == (0, 2)
    assert dist.TransformedDistribution(_base(2), [t]).sample((0,)).shape == (0, 2)


def test_conditioned_shapes_broadcast_with_the_context() -> None:
    """``forward_shape``/``inverse_shape`` follow the context's batch shape, as ``t(x)`` does, so
    a conditioned distribution has the batch shape of its context."""
    c = conditional_iresnet(2, CONTEXT_DIM).to(DTYPE)
    t = c.condition(torch.randn(5, CONTEXT_DIM, dtype=DTYPE))
    x = torch.randn(2, dtype=DTYPE)
    assert t.forward_shape(x.shape) == t(x).shape == (5, 2)
    assert t.inverse_shape(x.shape) == t.inv(x).shape == (5, 2)
    assert t.forward_shape((7, 1, 2)) == (7, 5, 2)
    flow = dist.ConditionalTransformedDistribution(_base(2), [c]).condition(torch.randn(5, CONTEXT_DIM, dtype=DTYPE))
    assert flow.batch_shape == (5,)
    samples = flow.sample((7,))
    assert samples.shape == (7, 5, 2) and flow.log_prob(samples).shape == (7, 5)


@pytest.mark.parametrize("logdet", ["exact", "series", "unbiased"])
def test_gradient_through_the_output_only(logdet: str) -> None:
    t = activate(iresnet(2, logdet=logdet).to(DTYPE))
    x = torch.randn(6, 2, dtype=DTYPE, requires_grad=True)
    t(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (x_ref + t.block.g(x_ref)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_no_grad() -> None:
    t = activate(iresnet(2, logdet="exact").to(DTYPE))
    x = torch.randn(5, 2, dtype=DTYPE)
    ref = per_sample_logdet(lambda v: v + t.block.g(v), x)
    with torch.no_grad():
        y = t(x)
        cached = t.log_abs_det_jacobian(x, y)
        fresh = t.log_abs_det_jacobian(x.clone(), y)
        sample = dist.TransformedDistribution(_base(2), [t]).sample((3,))
    assert not cached.requires_grad and not fresh.requires_grad
    torch.testing.assert_close(cached, ref)
    torch.testing.assert_close(fresh, ref)
    assert sample.shape == (3, 2)
    u = iresnet(2)  # default: unbiased estimator, float32
    with torch.no_grad():
        z = torch.randn(3, 2)
        assert torch.isfinite(u.log_abs_det_jacobian(z, u(z))).all()


def test_transform_contract() -> None:
    t = iresnet(2)
    assert isinstance(t, InvertibleResidual) and t.bijective and t.sign == 1
    assert t.inv.inv is t
    assert t.with_cache(1) is t
    assert t.domain.event_dim == 1 and t.codomain.event_dim == 1
    c = conditional_iresnet(2, CONTEXT_DIM).condition(torch.randn(CONTEXT_DIM))
    assert c.inv.inv is c and c.with_cache(1) is c
    blocks = [iresnet(2), iresnet(2)]
    composed = ComposeTransform(blocks, cache_size=1)
    assert all(a is b for a, b in zip(composed.parts, blocks))
    x = torch.randn(3, 2)
    y = composed(x)
    assert composed.log_abs_det_jacobian(x, y).shape == (3,)
    assert lipschitz_bound(composed) < 1.0
    assert lipschitz_bound(composed.inv) < 1.0


# -- stacking with Pyro's own transforms -----------------------------------------------------
def test_stacks_with_pyro_transforms() -> None:
    parts = [
        T.affine_autoregressive(2, hidden_dims=[8]),
        activate(iresnet(2, logdet="exact")),
        T.permute(2),
        T.spline_coupling(2, hidden_dims=[8]),
        T.planar(2),
        activate(iresnet(2, logdet="exact")),
    ]
    stack = T.ComposeTransformModule(parts).to(DTYPE)
    base = _base(2)
    z = torch.randn(6, 2, dtype=DTYPE)

    expected = base.log_prob(z) - per_sample_logdet(lambda v: stack(v), z)
    flow = dist.TransformedDistribution(base, [stack])
    y = stack(z)
    torch.testing.assert_close(flow.log_prob(y), expected, rtol=1e-6, atol=1e-6)
    # density estimation through the inverse of the stack
    density = dist.TransformedDistribution(base, [stack.inv])
    optim = torch.optim.Adam(stack.parameters(), lr=1e-2)
    data = torch.randn(16, 2, dtype=DTYPE)
    for _ in range(3):
        optim.zero_grad()
        # a fresh tensor: Pyro's own transforms would serve their stale (x, y) cache otherwise
        loss = -density.log_prob(data.clone()).mean()
        loss.backward()
        optim.step()
        assert torch.isfinite(loss)


def test_iterated_registers_every_block() -> None:
    flow = T.iterated(3, iresnet, 2, hidden_dims=[8])
    assert isinstance(flow, T.ComposeTransformModule)
    n_single = len(list(iresnet(2, hidden_dims=[8]).parameters()))
    assert len(list(flow.parameters())) == 3 * n_single
    sample = dist.TransformedDistribution(_base(2), [flow.to(DTYPE)]).rsample((4,))
    assert sample.shape == (4, 2) and sample.requires_grad


# -- SVI -------------------------------------------------------------------------------------
def _elbo(model: Callable, guide: Callable, obs: Tensor, particles: int = 2000) -> float:
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return -loss.loss(model, guide, obs)


def test_svi_raises_elbo_and_predictive() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    obs = torch.tensor([1.5, 2.0, 1.8])

    def model(obs: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
        with pyro.plate("data", obs.shape[0]):
            pyro.sample("obs", dist.Normal(z.sum(-1), 0.3), obs=obs)

    guide = AutoNormalizingFlow(model, partial(T.iterated, 2, iresnet, hidden_dims=[16]))
    guide(obs)  # create the parameters
    before = _elbo(model, guide, obs)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO(num_particles=4))
    for _ in range(60):
        assert torch.isfinite(torch.tensor(svi.step(obs)))
    after = _elbo(model, guide, obs)
    # linear-Gaussian model: the evidence is exact, and the ELBO is a lower bound of it
    cov = 2.0 * torch.ones(3, 3) + 0.09 * torch.eye(3)
    log_evidence = float(torch.distributions.MultivariateNormal(torch.zeros(3), cov).log_prob(obs))
    assert before < log_evidence - 20.0, (before, log_evidence)
    assert log_evidence - 1.5 < after < log_evidence + 0.1, (after, log_evidence)
    samples = Predictive(model, guide=guide, num_samples=20, return_sites=["z"])(obs)
    assert samples["z"].shape == (20, 1, 2)
    # the posterior concentrates near z0 + z1 = mean(obs)
    assert (samples["z"].sum(-1).mean() - obs.mean()).abs() < 0.5


def test_neutra_potential_in_eval_mode_is_deterministic_with_the_right_gradient() -> None:
    """NeuTra HMC through an ``AutoNormalizingFlow`` of blocks: in ``eval()`` the potential (model
    log-density at the flow's output plus the exact log-det) is deterministic and its gradient is
    the central difference of its values; in training mode the roulette log-det makes it random."""
    from pyro import poutine
    from pyro.infer import MCMC, NUTS
    from pyro.infer.mcmc.util import initialize_model
    from pyro.infer.reparam import NeuTraReparam

    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def funnel() -> None:
        y = pyro.sample("y", dist.Normal(torch.tensor(0.0, dtype=DTYPE), 3.0))
        pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=DTYPE), torch.exp(y / 2)))

    guide = AutoNormalizingFlow(funnel, partial(T.iterated, 2, iresnet, hidden_dims=[16], coeff=0.9))
    guide()  # create the parameters
    activate(guide.double())
    neutra = NeuTraReparam(guide.requires_grad_(False))
    neutra_model = poutine.reparam(funnel, config=lambda _: neutra)
    init, potential_fn, _, _ = initialize_model(neutra_model)
    (site,) = init
    z = torch.tensor([0.7, -1.3], dtype=DTYPE)

    guide.train()  # (new tensors: a repeated input would be served from the transforms' cache)
    assert potential_fn({site: z.clone()}) != potential_fn({site: z.clone()})
    guide.eval()
    z_leaf = z.clone().requires_grad_(True)
    value = potential_fn({site: z_leaf})
    assert value == potential_fn({site: z.clone()})
    (grad,) = torch.autograd.grad(value, z_leaf)
    eye = torch.eye(2, dtype=DTYPE)
    central = torch.stack([(potential_fn({site: z + 1e-5 * e}) - potential_fn({site: z - 1e-5 * e})) / 2e-5
                           for e in eye])
    torch.testing.assert_close(grad, central, rtol=1e-6, atol=1e-8)
    mcmc = MCMC(NUTS(neutra_model), num_samples=10, warmup_steps=10, disable_progbar=True)
    mcmc.run()
    assert torch.isfinite(neutra.transform_sample(mcmc.get_samples()[site])["y"]).all()


# -- bad input -------------------------------------------------------------------------------
def test_bad_input_errors() -> None:
    t = iresnet(2)
    with pytest.raises(ValueError, match=r"x \(input .*\) must have shape \(\.\.\., 2\), got \(4, 3\)"):
        t(torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        t.inv(torch.randn(4, 3))
    with pytest.raises(TypeError, match="floating dtype"):
        t(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="float64"):
        t(torch.randn(4, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="finite.*1 NaN"):
        t(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="finite"):
        t.log_abs_det_jacobian(torch.tensor([[float("inf"), 0.0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"coeff must be in \(0, 1\), got 1.2"):
        iresnet(2, coeff=1.2)
    with pytest.raises(ValueError, match="input_dim must be >= 1, got 0"):
        iresnet(0)
    with pytest.raises(ValueError, match="logdet must be one of"):
        iresnet(2, logdet="approx")
    c = conditional_iresnet(2, CONTEXT_DIM)
    with pytest.raises(ValueError, match="does not broadcast with context"):
        c.condition(torch.randn(5, CONTEXT_DIM))(torch.randn(4, 2))
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        c.condition([0.0, 1.0, 2.0])(torch.randn(4, 2))


# -- CUDA ------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", CASES)
def test_cuda_core_checks(name: str) -> None:
    cuda = torch.device("cuda")
    case = CASES[name]()
    case.module.to(cuda)
    if not case.exact:
        case.module.eval()
    t = case.transform
    if isinstance(case.module, ConditionalInvertibleResidual):
        t = case.module.condition(torch.randn(CONTEXT_DIM, dtype=DTYPE, device=cuda))
        case = replace(case, transform=t.inv if case.inverted else t)
        t = case.transform
    x = torch.randn(5, case.dim, dtype=DTYPE, device=cuda)
    y = t(x)
    assert y.device.type == "cuda"
    torch.cuda.set_sync_debug_mode("error")
    try:
        cached = t.log_abs_det_jacobian(x, y)
        fresh = t.log_abs_det_jacobian(x.clone(), y.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = case.reference_logdet(x)
    torch.testing.assert_close(cached, ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(fresh, ref, rtol=1e-8, atol=1e-8)
    assert (t.inv(y.clone()) - x).abs().max() < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("roulette", ["geometric", "poisson"])
def test_cuda_unbiased_logdet_has_no_sync(roulette: str) -> None:
    cuda = torch.device("cuda")
    t = iresnet(4, roulette=roulette).to(cuda)
    x = torch.randn(64, 4, device=cuda)
    y = t(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fresh = t.log_abs_det_jacobian(x.clone(), y.clone())
        fresh.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fresh.shape == (64,) and fresh.device.type == "cuda"


@pytest.mark.cuda
def test_cuda_svi_step() -> None:
    cuda = torch.device("cuda")
    pyro.clear_param_store()
    obs = torch.tensor([1.5, 2.0], device=cuda)

    def model(obs: Tensor) -> None:
        zeros = torch.zeros(2, device=cuda)
        z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
        with pyro.plate("data", obs.shape[0]):
            pyro.sample("obs", dist.Normal(z.sum(-1), 0.3), obs=obs)

    guide = AutoNormalizingFlow(model, partial(T.iterated, 2, iresnet, hidden_dims=[16]))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = torch.tensor([svi.step(obs) for _ in range(3)])
    assert torch.isfinite(losses).all()
    samples = Predictive(model, guide=guide, num_samples=5, return_sites=["z"])(obs)
    assert samples["z"].device.type == "cuda"


def test_conditioned_cache_is_dropped_when_the_context_changes_in_place() -> None:
    """Without the context in its cache key, a conditioned transform would serve the pair cached for
    the old context. _FreshCache's docstring and InvertibleResidual's say the cache is dropped when
    a tensor it depends on (the context) changes in place."""
    torch.manual_seed(0)
    c = activate(conditional_iresnet(2, 3, logdet="exact").to(DTYPE))
    context = torch.randn(3, dtype=DTYPE)
    t = c.condition(context)
    x = torch.randn(4, 2, dtype=DTYPE)
    y_old = t(x)
    with torch.no_grad():
        context.add_(1.0)  # e.g. an encoder's output buffer updated in place
    y_new = t(x)
    assert y_new is not y_old
    expected = x + t.block.g(x, context.expand(4, 3))
    torch.testing.assert_close(y_new, expected, rtol=1e-12, atol=1e-12)
    assert (y_new - y_old).abs().max() > 1e-3  # the context really changes g


def test_log_abs_det_jacobian_after_an_optimiser_step_is_not_served_stale() -> None:
    """After y = t(x) and an in-place parameter update, t.log_abs_det_jacobian(x, y) must not return
    the log-det cached for the old parameters. The class docstring says the log-det is dropped once
    a parameter changes."""
    torch.manual_seed(0)
    t = activate(iresnet(2, logdet="exact").to(DTYPE))
    x = torch.randn(6, 2, dtype=DTYPE)
    y = t(x)
    stale = t.log_abs_det_jacobian(x, y).detach().clone()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))  # what optimiser.step() does
    fresh = t.log_abs_det_jacobian(x, y)
    t.block.eval()  # reference at the current (refreshed) weights, exact either way
    reference = per_sample_logdet(lambda v: v + t.block.g(v), x)
    torch.testing.assert_close(fresh, reference, rtol=1e-10, atol=1e-10)
    assert (reference - stale).abs().max() > 1e-3


def test_iresnet_default_hidden_dims_are_two_layers() -> None:
    """The documented default is two hidden layers of max(64, 4 d)."""
    for d, width in ((3, 64), (20, 80)):
        net = iresnet(d).block.net
        sizes = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, SpectralNormLinear)]
        assert sizes == [(d, width), (width, width), (width, d)]
    net = conditional_iresnet(3, 2).block.net.net
    sizes = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, SpectralNormLinear)]
    assert sizes == [(5, 64), (64, 64), (64, 3)]


def test_conditional_transform_names_a_wrong_event_size() -> None:
    """The context-concatenating net knows its event shape (the MLP's input size less the context
    size), so an input of the wrong size gets an error naming the expected shape."""
    t = conditional_iresnet(2, CONTEXT_DIM).condition(torch.randn(CONTEXT_DIM))
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., 2\), got \(4, 5\)"):
        t(torch.randn(4, 5))


def test_conditional_iresnet_passes_the_net_options_to_its_mlp() -> None:
    """conditional_iresnet(coeff=, activation=, n_power_iterations=) builds its LipschitzMLP with
    them: every linear layer has that coeff and step count, the activation is the one named, and
    the certified Lipschitz constant is at most coeff**L (here 0.5**2, up to the 1% power-iteration
    slack)."""
    from torch import nn

    from pyro_iresnet import conditional_iresnet, lipschitz_bound
    from pyro_iresnet.lipschitz import SpectralNormLinear

    torch.manual_seed(0)
    t = conditional_iresnet(2, 3, hidden_dims=[8], coeff=0.5, n_power_iterations=3, activation="elu")
    linear = [m for m in t.residual_net.modules() if isinstance(m, SpectralNormLinear)]
    assert len(linear) == 2
    assert all(m.coeff == 0.5 and m.n_power_iterations == 3 for m in linear)
    assert any(isinstance(m, nn.ELU) for m in t.residual_net.modules())
    assert lipschitz_bound(t.residual_net) <= 0.25 * 1.01**2


def test_n_power_iterations_reaches_the_layers_of_every_builder() -> None:
    """n_power_iterations is a net option of iresnet, conditional_iresnet and conv_iresnet: every
    spectrally normalised layer of the built net runs that many steps per weight change."""
    from pyro_iresnet import SpectralNormConv2d, conditional_iresnet, conv_iresnet, iresnet
    from pyro_iresnet.lipschitz import SpectralNormLinear

    torch.manual_seed(0)
    for t, kind in (
        (iresnet(2, hidden_dims=[8], n_power_iterations=3), SpectralNormLinear),
        (conditional_iresnet(2, 3, hidden_dims=[8], n_power_iterations=3), SpectralNormLinear),
        (conv_iresnet((2, 4, 4), hidden_channels=4, n_power_iterations=3), SpectralNormConv2d),
    ):
        layers = [m for m in t.modules() if isinstance(m, kind)]
        assert layers and all(m.n_power_iterations == 3 for m in layers)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_tracing_raises_a_clear_error() -> None:
    """torch.jit.trace (Pyro's JitTrace_ELBO) failed with internal errors (unordered_map::at); a trace
    would freeze the roulette length and the solver's iteration counts, so it is refused by name."""
    t = iresnet(2, hidden_dims=[8])
    with pytest.raises(NotImplementedError, match="cannot be traced by torch.jit.trace"):
        torch.jit.trace(lambda x: t(x), torch.randn(4, 2), check_trace=False)


def test_residual_nets_of_the_wrong_output_size_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="needs g\\(x\\) shaped like x, but the LipschitzMLP maps input size 3 to 4"):
        InvertibleResidual(LipschitzMLP([3, 8, 4]))
    with pytest.raises(ValueError, match=r"maps input size 2 \(5 less context_dim 3\) to 3"):
        ConditionalInvertibleResidual(ConcatContextNet(LipschitzMLP([5, 8, 3]), context_dim=3))
    with pytest.raises(ValueError, match=r"context_dim \(3\) must be smaller than the net's input size \(3\)"):
        ConcatContextNet(LipschitzMLP([3, 8, 3]), context_dim=3)
    other = InvertibleResidual(nn.Sequential(SpectralNormLinear(3, 4, coeff=0.5)))  # sizes read at call time
    with pytest.raises(ValueError, match=r"maps inputs of shape \(2, 3\) to \(2, 4\): a residual block"):
        other(torch.randn(2, 3))


def test_condition_with_a_context_that_does_not_broadcast_names_both_shapes() -> None:
    t = conditional_iresnet(2, 2, hidden_dims=[8])
    base = dist.Normal(torch.zeros(4, 2), 1.0).to_event(1)
    flow = dist.ConditionalTransformedDistribution(base, [t])
    with pytest.raises(ValueError, match=r"batch shape \(4,\) does not broadcast with context shape \(5, 2\)"):
        flow.condition(torch.randn(5, 2))


def test_a_base_of_another_event_shape_is_refused_where_the_distribution_is_built() -> None:
    """Plain and conditioned transforms check the event shape in their shape functions, so a base of
    another event size fails when the distribution is built, naming the block, instead of at the
    first sample or log_prob (or silently with an event shape the transform cannot take)."""
    t = iresnet(2, hidden_dims=[8])
    with pytest.raises(ValueError, match=r"inputs of residual block .* must have shape \(\.\.\., 2\), got \(3,\)"):
        dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    c = conditional_iresnet(2, 2, hidden_dims=[8])
    flow = dist.ConditionalTransformedDistribution(dist.Normal(torch.zeros(4, 3), 1.0).to_event(1), [c])
    with pytest.raises(ValueError, match=r"inputs of residual block .* must have shape \(\.\.\., 2\), got \(4, 3\)"):
        flow.condition(torch.randn(4, 2))
    good = dist.ConditionalTransformedDistribution(dist.Normal(torch.zeros(4, 2), 1.0).to_event(1), [c])
    assert good.condition(torch.randn(4, 2)).event_shape == (2,)


def test_cache_is_dropped_when_a_frozen_flow_is_unfrozen() -> None:
    """The same data tensor, first with the flow frozen (only the base trains), then unfrozen: the
    cached pair and log-det made without a graph were served again, so the first step after
    unfreezing gave the flow no gradient, silently."""
    torch.manual_seed(0)
    t = iresnet(2, hidden_dims=[8])
    loc = torch.zeros(2, requires_grad=True)
    data = torch.randn(16, 2)

    def log_prob() -> Tensor:
        return dist.TransformedDistribution(dist.Normal(loc, 1.0).to_event(1), [t.inv]).log_prob(data).mean()

    t.requires_grad_(False)
    log_prob().backward()
    t.requires_grad_(True)
    log_prob().backward()
    assert all(p.grad is not None and bool(p.grad.abs().max() > 0) for p in t.parameters())


def test_cached_tensors_are_neither_pickled_nor_deep_copied() -> None:
    """After a call with gradients the cache holds the batch and a log-det with its graph:
    torch.save embedded them and copy.deepcopy raised on the non-leaf tensors."""
    import copy
    import io

    torch.manual_seed(0)
    t = iresnet(2, hidden_dims=[8])
    buffer = io.BytesIO()
    torch.save(t, buffer)
    fresh_size = buffer.tell()
    x = torch.randn(20_000, 2)
    t.log_abs_det_jacobian(x, t(x)).sum().backward()
    buffer = io.BytesIO()
    torch.save(t, buffer)
    assert buffer.tell() < fresh_size + 1000  # not the 20,000 x 2 batch
    clone = copy.deepcopy(t)
    assert clone._cached_logdet is None and clone._cached_x_y == (None, None)
    torch.testing.assert_close(clone(x[:3]), t(x[:3]))


@pytest.mark.parametrize("part", ["whole", "first layer"])
@pytest.mark.parametrize("options", [{"logdet": "exact"}, {"logdet": "series", "exact_trace": True, "fused": False}])
def test_a_flow_converted_to_pyro_modules_computes_exact_jacobians_on_its_first_call(options: dict, part: str) -> None:
    """``to_pyro_module_`` makes the net put its parameters into Pyro's param store on their first
    use in a forward, which cannot happen inside the exact Jacobian's ``torch.func.vmap``: the
    first call (and the first after ``clear_param_store``) gave functorch's ``requires_grad_`` error."""
    from pyro.nn.module import to_pyro_module_

    pyro.clear_param_store()
    torch.manual_seed(0)
    t = iresnet(2, hidden_dims=[8], **options).to(DTYPE)
    to_pyro_module_(t if part == "whole" else t.block.net.layers[0])
    name = "block.net.layers.0.weight" if part == "whole" else "weight"
    x = torch.randn(3, 2, dtype=DTYPE)
    for _ in range(2):
        y = t(x)
        assert name in pyro.get_param_store()  # registered by this call
        reference = per_sample_logdet(lambda v: v + t.block.g(v), x)
        if options["logdet"] == "exact":
            torch.testing.assert_close(t.log_abs_det_jacobian(x, y), reference)
        else:  # the series with exact traces: within its truncation bound
            bound = float(logdet_error_bound(lipschitz_bound(t), t.block.n_terms, 2))
            assert float((t.log_abs_det_jacobian(x, y) - reference).detach().abs().max()) <= bound
        pyro.clear_param_store()  # the next call registers them again
        t.clear_cache()
