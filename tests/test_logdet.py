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


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_probes_have_zero_mean_and_identity_second_moment(probe: str) -> None:
    """Hutchinson's estimator needs E[v v^T] = I (and the probes are symmetric, E[v] = 0): over 10^6
    vectors in 4 dimensions each entry of the sample mean and of the sample second-moment matrix is
    within 5 standard errors (1e-3 for the mean and the cross terms, sqrt(2) 1e-3 for a Gaussian's
    squares; a Rademacher square is exactly 1). A biased coin (P(+1) = 0.55) moves the mean by 0.1
    and the cross terms by 0.01."""
    from pyro_iresnet.logdet import draw_probes

    torch.manual_seed(0)
    v = torch.cat(draw_probes(torch.zeros(250_000, 4, dtype=torch.float64), 4, probe))
    n = v.shape[0]
    assert n == 10**6
    assert float(v.mean(0).abs().max()) < 5e-3
    second = v.T @ v / n
    off_diagonal = second - torch.diag(second.diagonal())
    assert float(off_diagonal.abs().max()) < 5e-3
    assert float((second.diagonal() - 1).abs().max()) < (7.1e-3 if probe == "gaussian" else 1e-12)
    if probe == "rademacher":
        assert bool((v.abs() == 1).all())


def _basis_probes(n: int, d: int) -> list[torch.Tensor]:
    r"""$\sqrt{d}\, e_j$, $j = 1..d$: averaged over these probes $v^\top A v$ is exactly $\operatorname{tr} A$."""
    eye = torch.eye(d, dtype=DTYPE)
    return [math.sqrt(d) * eye[j].expand(n, d).clone() for j in range(d)]


@pytest.mark.parametrize("neumann_grad", [True, False])
@pytest.mark.parametrize("path", ["generic", "fused"])
def test_series_gradients_with_basis_probes_equal_autograd_through_the_exact_trace_series(
    neumann_grad: bool, path: str
) -> None:
    r"""With the probes $\sqrt{d} e_j$ the Hutchinson estimate is the truncated series itself, so its
    value and its gradient (Neumann series, or differentiated through the products) for x and every
    parameter equal autograd through the exact-trace series, to rounding. 12 terms at coeff 0.97,
    weights that are not all 1 (as a roulette draw gives): a wrong Neumann coefficient k c_k in any
    term, or a term dropped, moves them by far more than the tolerance."""
    from pyro_iresnet.fused import fused_logdet, fused_mlp
    from pyro_iresnet.logdet import hutchinson_logdet, jacobian_series_logdet

    torch.manual_seed(0)
    d = 2
    net = make_active_mlp([d, 16, 16, d], 0.97, DTYPE)
    block = ResidualBlock(net)
    params = list(net.parameters())
    x = torch.randn(5, d, dtype=DTYPE)
    weights = [1.0] * 2 + [2.0**m for m in range(1, 11)]  # a geometric roulette (p = 0.5) draw, 2 exact terms
    x_ref = x.clone().requires_grad_()
    _, reference = jacobian_series_logdet(block.g, x_ref, weights)
    loss_weights = torch.linspace(-1.0, 2.0, 5, dtype=DTYPE)
    grads_ref = torch.autograd.grad((loss_weights * reference).sum(), [x_ref, *params], allow_unused=True)
    x_est = x.clone().requires_grad_()
    probes = _basis_probes(5, d)
    if path == "generic":
        _, estimate = hutchinson_logdet(block.g, x_est, weights, probes, neumann_grad, create_graph=True,
                                        params=params)
    else:
        _, estimate = fused_logdet(fused_mlp(net), x_est, "series", weights, probes, neumann_grad)
    grads = torch.autograd.grad((loss_weights * estimate).sum(), [x_est, *params], allow_unused=True)
    torch.testing.assert_close(estimate, reference, rtol=1e-12, atol=1e-13)
    for grad, grad_ref, tensor in zip(grads, grads_ref, [x, *params]):  # None: unused (a last bias's trace)
        grad, grad_ref = (torch.zeros_like(tensor) if g is None else g for g in (grad, grad_ref))
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_exact_trace_series_is_the_weighted_sum_of_traces_of_jacobian_powers() -> None:
    r"""``jacobian_series_logdet`` is $\sum_k w_k (-1)^{k+1} \operatorname{tr}(J^k) / k$ term by term,
    against powers of autograd's Jacobian (a dropped or repeated term, or a weight applied to the
    wrong term, shows at 1e-3 or more here)."""
    from pyro_iresnet.logdet import jacobian_series_logdet

    torch.manual_seed(0)
    d = 3
    net = make_active_mlp([d, 12, 12, d], 0.97, DTYPE)
    block = ResidualBlock(net)
    x = 2 * torch.randn(6, d, dtype=DTYPE)
    weights = [1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 0.5]
    _, series = jacobian_series_logdet(block.g, x, weights)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: block.g(v[None])[0]))(x)
    expected = sum(w * (-1) ** (k + 1) * torch.linalg.matrix_power(jac, k).diagonal(dim1=1, dim2=2).sum(1) / k
                   for k, w in enumerate(weights, start=1))
    torch.testing.assert_close(series, expected, rtol=0, atol=1e-12)
    last_term = weights[-1] * torch.linalg.matrix_power(jac.detach(), len(weights)).diagonal(dim1=1, dim2=2).sum(1)
    assert float(last_term.abs().max()) / len(weights) > 1e-4  # each term matters at this tolerance


@pytest.mark.parametrize(
    ("roulette", "param"), [("geometric", 0.5), ("geometric", 0.2), ("poisson", 2.0), ("poisson", 6.0)]
)
def test_roulette_survival_matches_closed_forms_far_into_the_tail(roulette: str, param: float) -> None:
    r"""$P(N \ge m)$ for m up to 60 against sums of the probability mass function (geometric on
    $N \ge 1$: $p (1 - p)^{n - 1}$; Poisson: $e^{-\lambda} \lambda^n / n!$), and, where the draws can
    show it (P >= 1e-3), against the frequency among 200,000 of torch's own draws."""
    from pyro_iresnet.logdet import _survival

    def pmf(n: int) -> float:
        if roulette == "geometric":
            return param * (1 - param) ** (n - 1) if n >= 1 else 0.0
        return math.exp(-param + n * math.log(param) - math.lgamma(n + 1))

    torch.manual_seed(0)
    if roulette == "geometric":
        draws = torch.empty(200_000, dtype=torch.float64).geometric_(param)
    else:
        draws = torch.poisson(torch.full((200_000,), param, dtype=torch.float64))
    for m in range(0, 61):
        expected = math.fsum(pmf(n) for n in range(m, m + 400))  # the tail beyond is below 1e-38
        assert _survival(roulette, param, m) == pytest.approx(expected, rel=1e-9, abs=1e-300), m
        if expected >= 1e-3:
            frequency = float((draws >= m).double().mean())
            assert abs(frequency - expected) <= 5 * math.sqrt(max(expected * (1 - expected), 0) / 200_000) + 1e-12, m


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
