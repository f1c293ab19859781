"""Log-det estimators against the exact reference (autograd Jacobian + slogdet)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_iresnet import ResidualBlock, lipschitz_bound, logdet_error_bound
from pyro_iresnet.logdet import roulette_weights
from tests.conftest import make_active_mlp

DTYPE = torch.float64


def reference_logdet(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """slogdet of the autograd Jacobian of x -> x + g(x), one sample at a time."""
    out = []
    for xi in x.reshape(-1, x.shape[-1]):
        jac = torch.autograd.functional.jacobian(lambda z: z + block.g(z.unsqueeze(0)).squeeze(0), xi)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out).reshape(x.shape[:-1])


@pytest.fixture(params=[False, "auto"], ids=["generic", "fused"])
def fused(request: pytest.FixtureRequest) -> bool | str:
    """Every estimator test runs on the generic autograd path and on the fused MLP path."""
    return request.param


def active_block(dim: int, coeff: float, **options) -> ResidualBlock:
    return ResidualBlock(make_active_mlp([dim, 32, 32, dim], coeff, DTYPE), **options)


@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("dim", [2, 7])
def test_exact_logdet_matches_slogdet(batch_shape: tuple[int, ...], dim: int, fused: bool | str) -> None:
    block = active_block(dim, 0.97, logdet="exact", fused=fused)
    x = 2 * torch.randn(*batch_shape, dim, dtype=DTYPE)
    y, logdet = block.forward_and_logdet(x)
    assert logdet.shape == batch_shape
    assert torch.allclose(y, x + block.g(x.reshape(-1, dim)).reshape(x.shape))
    assert (logdet - reference_logdet(block, x)).abs().max() <= 1e-8


def _mean_and_standard_error(block: ResidualBlock, x: torch.Tensor, n_calls: int, copies: int):
    """Estimates from n_calls independent calls (each with its own roulette draw) on `copies`
    copies of x; the per-call means are i.i.d., so their spread gives the standard error."""
    params = list(block.parameters())
    means = []
    for _ in range(n_calls):
        _, logdet = block.forward_and_logdet(x.expand(copies, -1))
        if params[0].requires_grad:  # exercise the gradient path of the mode under test
            torch.autograd.grad(logdet.sum(), params[0])
        means.append(logdet.detach().mean())
    means = torch.stack(means)
    return means.mean(), means.std() / math.sqrt(n_calls)


@pytest.mark.parametrize("neumann_grad, memory_efficient", [(False, False), (True, False), (True, True),
                                                            (False, True)])
@pytest.mark.parametrize("coeff", [0.9, 0.98])
@pytest.mark.parametrize("dim", [2, 5])
def test_unbiased_estimator_mean_matches_exact(dim: int, coeff: float, neumann_grad: bool,
                                               memory_efficient: bool, fused: bool | str) -> None:
    block = active_block(dim, coeff, logdet="unbiased", neumann_grad=neumann_grad,
                         memory_efficient=memory_efficient, probe="rademacher", n_exact_terms=1,
                         p=0.1 if coeff > 0.95 else 0.3,  # finite variance needs (1 - p) > Lip^2
                         fused=fused)
    x = torch.randn(1, dim, dtype=DTYPE)
    exact = reference_logdet(block, x)[0]
    mean, standard_error = _mean_and_standard_error(block, x, n_calls=250, copies=8)  # 2000 draws
    assert abs(mean - exact) <= 3 * standard_error
    assert standard_error < 0.1 * abs(exact) + 0.02  # the check is informative, not vacuous


@pytest.mark.parametrize("roulette, param", [("geometric", 0.3), ("poisson", 3.0)])
def test_roulette_weights_are_unbiased(roulette: str, param: float) -> None:
    draws = [roulette_weights(2, roulette, param) for _ in range(20000)]
    for k in range(1, 7):
        weights_k = torch.tensor([w[k - 1] if len(w) >= k else 0.0 for w in draws], dtype=DTYPE)
        assert abs(weights_k.mean() - 1) <= 4 * weights_k.std() / math.sqrt(len(draws)) + 1e-12


def test_roulette_uses_torch_rng_only(fused: bool | str) -> None:
    block = active_block(3, 0.9, logdet="unbiased", fused=fused)
    x = torch.randn(4, 3, dtype=DTYPE)
    results = []
    for numpy_seed in (1, 2):
        np.random.seed(numpy_seed)
        torch.manual_seed(123)
        results.append((block.forward_and_logdet(x)[1], block.last_diagnostics.n_terms))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    block.forward_and_logdet(x)
    assert np.array_equal(state, np.random.get_state()[1])


@pytest.mark.parametrize("n_terms", [2, 5, 10])
@pytest.mark.parametrize("coeff", [0.7, 0.97])
def test_series_error_within_iresnet_bound(n_terms: int, coeff: float) -> None:
    dim = 4
    block = active_block(dim, coeff, logdet="series", n_terms=n_terms, exact_trace=True)
    x = 3 * torch.randn(16, dim, dtype=DTYPE)
    _, logdet = block.forward_and_logdet(x)
    error = (logdet - reference_logdet(block, x)).abs().max()
    bound = logdet_error_bound(lipschitz_bound(block), n_terms, dim)
    assert error <= bound


@pytest.mark.parametrize("n_terms", [2, 5, 10])
def test_hutchinson_series_within_bound_plus_noise(n_terms: int, fused: bool | str) -> None:
    dim = 3
    block = active_block(dim, 0.97, logdet="series", n_terms=n_terms, n_probes=4, probe="rademacher",
                         fused=fused)
    x = torch.randn(1, dim, dtype=DTYPE)
    with torch.no_grad():
        _, estimates = block.forward_and_logdet(x.expand(4000, -1))
    error = (estimates.mean() - reference_logdet(block, x)[0]).abs()
    bound = logdet_error_bound(lipschitz_bound(block), n_terms, dim)
    assert error <= bound + 3 * estimates.std() / math.sqrt(len(estimates))


def test_logdet_error_bound_values() -> None:
    lip, dim = 0.6, 3
    closed_form = -dim * (math.log(1 - lip) + sum(lip**k / k for k in range(1, 6)))
    assert logdet_error_bound(lip, 5, dim) == pytest.approx(closed_form, rel=1e-9)
    assert logdet_error_bound(0.0, 1, dim) == 0.0
    assert logdet_error_bound(0.99, 2000, 10) < 1e-8
    bounds = [logdet_error_bound(0.9, n, 2) for n in (1, 2, 5, 10, 50)]
    assert bounds == sorted(bounds, reverse=True)
    with pytest.raises(ValueError, match=r"lip must be in \[0, 1\), got 1.0"):
        logdet_error_bound(1.0, 3, 2)


def _weighted_gradient(block: ResidualBlock, x: torch.Tensor, weights: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    inputs = [x.clone().requires_grad_(), *block.parameters()]
    _, logdet = block.forward_and_logdet(inputs[0])
    grads = torch.autograd.grad((weights * logdet).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("neumann_grad", [True, False])
def test_memory_efficient_gradient_equals_direct_gradient(uniform: bool, neumann_grad: bool, fused: bool | str) -> None:
    """Same draws, same gradient: backward-in-forward is exact for any upstream gradient."""
    net = make_active_mlp([3, 16, 16, 3], 0.95, DTYPE)
    x = torch.randn(6, 3, dtype=DTYPE)
    weights = torch.full((6,), 0.5, dtype=DTYPE) if uniform else torch.linspace(-1, 2, 6, dtype=DTYPE)
    grads = [
        _weighted_gradient(
            ResidualBlock(net, neumann_grad=neumann_grad, memory_efficient=m, fused=fused), x, weights, 7
        )
        for m in (False, True)
    ]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("neumann_grad", [True, False])
def test_expected_gradient_of_unbiased_estimator(neumann_grad: bool, fused: bool | str) -> None:
    """Average over draws of the memory-efficient gradient of sum_i w_i logdet_i with unequal
    weights is within 5% of the exact gradient."""
    dim = 2
    net = make_active_mlp([dim, 16, 16, dim], 0.9, DTYPE)
    exact_block = ResidualBlock(net, logdet="exact")
    block = ResidualBlock(net, logdet="unbiased", neumann_grad=neumann_grad, memory_efficient=True,
                          probe="rademacher", n_probes=4, p=0.3, fused=fused)
    x = torch.randn(4, dim, dtype=DTYPE)
    weights = torch.tensor([0.1, 1.0, -0.5, 2.0], dtype=DTYPE)
    exact = torch.cat([g.flatten() for g in _weighted_gradient(exact_block, x, weights, 0)])
    n_draws = 400
    total = torch.zeros_like(exact)
    for seed in range(n_draws):
        total += torch.cat([g.flatten() for g in _weighted_gradient(block, x, weights, seed)])
    error = (total / n_draws - exact).norm() / exact.norm()
    assert error <= 0.05, f"relative error {error:.3f}"


def test_eval_logdet_modes(fused: bool | str) -> None:
    block = active_block(3, 0.9, logdet="unbiased", fused=fused).eval()
    x = torch.randn(5, 3, dtype=DTYPE)
    _, logdet = block.forward_and_logdet(x)
    assert block.last_diagnostics.logdet_method == "exact"  # auto: exact for small events
    assert (logdet - reference_logdet(block, x)).abs().max() <= 1e-8
    block.exact_max_dim = 2
    block.forward_and_logdet(x)
    assert block.last_diagnostics.logdet_method == "unbiased"
    block.eval_logdet = "series"
    block.forward_and_logdet(x)
    assert block.last_diagnostics.logdet_method == "series" and block.last_diagnostics.n_terms == 10


def test_roulette_draws_stay_on_the_cpu_under_another_default_device() -> None:
    """The roulette length is drawn on the CPU (no device sync to read it back), also when another
    default device is set ('meta' stands in for an accelerator: reading it back would fail)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        assert len(roulette_weights(2, "geometric", 0.5)) >= 2
        assert len(roulette_weights(2, "poisson", 2.0)) >= 2


def test_gaussian_probes_have_unit_second_moment() -> None:
    """Hutchinson's estimator needs E[v v^T] = I: 10^6 Gaussian entries, mean of v^2 within 5
    standard errors (sqrt(2 / 10^6) = 1.4e-3) of 1."""
    from pyro_iresnet.logdet import draw_probes

    torch.manual_seed(0)
    v = torch.cat(draw_probes(torch.zeros(1000, 100, dtype=torch.float64), 10, "gaussian"))
    assert abs(float(v.pow(2).mean()) - 1.0) < 7e-3


def test_error_bound_near_lipschitz_one_uses_the_closed_form_tail() -> None:
    """For Lip so close to 1 that the tail sum is not summed term by term, the bound is
    -d (ln(1 - L) + sum_{k <= n} L^k / k) all the same (the partial sum includes k = n)."""
    lip, n = 0.9999, 10
    reference = -math.log1p(-lip) - math.fsum(lip**k / k for k in range(1, n + 1))
    assert math.isclose(logdet_error_bound(lip, n_terms=n, dim=3), 3 * reference, rel_tol=1e-9)


def test_exact_logdet_in_bfloat16_matches_the_float64_value() -> None:
    """exact_logdet accepts bfloat16 inputs (torch.linalg refuses low-precision dtypes, so the
    factorisation runs in float32) and returns bfloat16 log-dets equal to the float64 value of
    log det(I + A) up to bfloat16 rounding (relative 2^-8 of the output, plus the input rounding
    of A's entries; 0.05 absolute is ample for |logdet| < 1)."""
    from pyro_iresnet.logdet import exact_logdet

    a = torch.tensor([[0.25, 0.125], [-0.0625, 0.5]])
    x = torch.randn(3, 2).to(torch.bfloat16)
    gx, logdet = exact_logdet(lambda z: z @ a.to(z.dtype).T, x)
    assert logdet.dtype == torch.bfloat16 and logdet.shape == (3,)
    expected = torch.linalg.slogdet(torch.eye(2, dtype=torch.float64) + a.double()).logabsdet
    assert (logdet.double() - expected).abs().max() < 0.05


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((-1, "geometric", 0.5), ValueError, r"n_exact_terms must be >= 0, got -1"),
        ((2, "geometric", 1.5), ValueError, r"p must be in \(0, 1\)"),
        ((2, "geometric", 1.0), ValueError, r"p must be in \(0, 1\)"),
        ((2, "geometric", 0.0), ValueError, r"p must be in \(0, 1\)"),
        ((2, "geometric", float("nan")), ValueError, r"p must be in \(0, 1\)"),
        ((2, "poisson", -1.0), ValueError, r"lam must be a finite float > 0"),
        ((2, "poisson", 2.0, 0), ValueError, r"n_draws must be >= 1, got 0"),
        ((2, "uniform", 0.5), ValueError, r"roulette must be one of"),
    ],
)
def test_roulette_weights_validates_its_arguments(args: tuple, error: type, match: str) -> None:
    """A negative n_exact_terms silently gave the weights [0.0] (a zero log-det), p = 1.5 was taken
    as p = 1, n_draws = 0 failed in max()."""
    with pytest.raises(error, match=match):
        roulette_weights(*args)


@pytest.mark.parametrize(
    "options",
    [dict(fused=False), dict(fused=False, logdet="series", memory_efficient=True),
     dict(logdet="series", exact_trace=True)],
    ids=["generic-unbiased", "generic-memory-efficient", "exact-trace"],
)
@pytest.mark.parametrize("method", ["forward_and_logdet", "inverse_and_logdet"])
def test_generic_estimators_run_under_inference_mode(options: dict, method: str) -> None:
    """Their VJPs need autograd, which refuses inference tensors: the same draws give the same
    values under ``inference_mode`` as under ``no_grad``."""
    torch.manual_seed(0)
    block = ResidualBlock(make_active_mlp([3, 8, 3], 0.9), **options)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = getattr(block, method)(x)
    torch.manual_seed(1)
    with torch.inference_mode():
        got = getattr(block, method)(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_hutchinson_needs_at_least_one_probe() -> None:
    from pyro_iresnet.logdet import draw_probes, hutchinson_logdet

    with pytest.raises(ValueError, match="n_probes must be >= 1, got 0"):
        draw_probes(torch.zeros(2, 3), 0, "gaussian")
    with pytest.raises(ValueError, match="probes must hold at least one probe tensor"):
        hutchinson_logdet(torch.tanh, torch.zeros(2, 3), [1.0], [], neumann_grad=False, create_graph=False)


@pytest.mark.parametrize("options", [dict(fused=False), dict(fused=False, logdet="series", memory_efficient=True)])
def test_an_input_that_requires_grad_under_no_grad(options: dict) -> None:
    """Under ``no_grad`` the generic estimators differentiate a detached copy: the flattened view
    of an input that requires grad is not part of their graph (normflows' ``log_prob`` of a leaf
    with ``requires_grad=True`` inside ``torch.no_grad()``)."""
    torch.manual_seed(0)
    block = ResidualBlock(make_active_mlp([3, 8, 3], 0.9), **options)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = block.forward_and_logdet(x)
    torch.manual_seed(1)
    with torch.no_grad():
        got = block.forward_and_logdet(x.clone().requires_grad_())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
