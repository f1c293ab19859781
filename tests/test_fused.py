"""The fused fast path (``pyro_iresnet.fused``) against the generic autograd path and exact references.

Same seed, same draws: values and gradients (input, every parameter, weighted per-sample losses)
must agree to 1e-12 in float64 for every estimator and gradient mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_iresnet.block as block_module
import pyro_iresnet.fused_inverse as fused_inverse_module
from pyro_iresnet import LipschitzMLP, ResidualBlock, SpectralNormLinear
from pyro_iresnet.context import ConcatContextNet
from pyro_iresnet.fused import fused_logdet, fused_mlp
from pyro_iresnet.fused_inverse import SolverNet, newton_inverse, newton_inverse_and_logdet, solver_net
from pyro_iresnet.logdet import exact_logdet
from tests.conftest import make_active_mlp

TOL = 1e-12


def _run(net: nn.Module, fused: bool, x: torch.Tensor, weights: torch.Tensor, seed: int, **options):
    block = ResidualBlock(net, fused=fused, **options)
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    y, logdet = block.forward_and_logdet(x)
    loss = (weights * logdet).sum() + (torch.linspace(-1, 2, x.shape[-1], dtype=x.dtype) * y).sum()
    grads = torch.autograd.grad(loss, [x, *net.parameters()])
    return y.detach(), logdet.detach(), grads


def _assert_same(net: nn.Module, x: torch.Tensor, seed: int = 3, **options) -> torch.Tensor:
    weights = torch.rand(x.shape[0], dtype=x.dtype) * 3 - 1  # unequal, some negative
    fast = _run(net, True, x, weights, seed, **options)
    slow = _run(net, False, x, weights, seed, **options)
    torch.testing.assert_close(fast[0], slow[0], rtol=TOL, atol=TOL)
    torch.testing.assert_close(fast[1], slow[1], rtol=TOL, atol=TOL)
    for g_fast, g_slow in zip(fast[2], slow[2]):
        torch.testing.assert_close(g_fast, g_slow, rtol=TOL, atol=TOL)
    assert all(float(g.abs().max()) > 0 for g in fast[2][:1])  # not vacuous
    return fast[1]


@pytest.mark.parametrize("logdet", ["exact", "series", "unbiased"])
@pytest.mark.parametrize("neumann_grad", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_matches_generic_path(logdet: str, neumann_grad: bool, memory_efficient: bool) -> None:
    net = make_active_mlp([3, 16, 16, 3], coeff=0.9)
    x = torch.randn(6, 3, dtype=torch.float64)
    _assert_same(net, x, logdet=logdet, n_terms=5, neumann_grad=neumann_grad,
                 memory_efficient=memory_efficient)


@pytest.mark.parametrize(
    ("dims", "activation", "options"),
    [
        ([2, 16, 16, 2], "lipswish", {"logdet": "exact"}),  # closed-form 2 x 2 determinant
        ([1, 8, 1], "elu", {"logdet": "exact"}),
        ([5, 12, 12, 12, 5], "elu", {"logdet": "unbiased", "neumann_grad": False, "n_probes": 3}),
        ([4, 10, 4], "lipswish", {"logdet": "unbiased", "roulette": "poisson", "lam": 3.0,
                                  "n_roulette_draws": 4, "probe": "rademacher"}),
        ([3, 3], "lipswish", {"logdet": "series", "n_terms": 4}),  # no hidden layer
        # d >= terms x probes: the series runs on VJPs instead of the per-sample Jacobian
        ([6, 16, 16, 6], "lipswish", {"logdet": "series", "n_terms": 3}),
        ([6, 16, 16, 6], "elu", {"logdet": "series", "n_terms": 2, "neumann_grad": False}),
        # three hidden layers: the backward takes the second- and third-layer products from the
        # Jacobian (the exact log-det only the second-layer ones)
        ([3, 12, 12, 12, 3], "lipswish", {"logdet": "unbiased", "n_exact_terms": 3}),
        ([2, 8, 8, 8, 2], "elu", {"logdet": "exact"}),
    ],
)
def test_matches_generic_path_other_nets(dims: list[int], activation: str, options: dict) -> None:
    net = make_active_mlp(dims, coeff=0.95, activation=activation)
    x = torch.randn(5, dims[0], dtype=torch.float64) * 2
    _assert_same(net, x, **options)


@pytest.mark.parametrize("logdet", ["exact", "unbiased"])
def test_matches_generic_path_with_an_inactive_normalisation(logdet: str) -> None:
    """A layer whose estimate is below c is applied unscaled, and no gradient flows through its
    sigma (the closed-form normalisation gradient must switch off exactly like torch.clamp's)."""
    net = make_active_mlp([3, 16, 16, 3], coeff=0.9)
    last = net.layers[-1]
    with torch.no_grad():
        last.weight.mul_(1e-3)
        assert float(last.sigma_estimate()) < last.coeff < float(net.layers[0].sigma_estimate())
    x = torch.randn(6, 3, dtype=torch.float64)
    _assert_same(net, x, logdet=logdet, n_terms=5)


def test_exact_logdet_equals_slogdet_of_autograd_jacobian() -> None:
    net = make_active_mlp([2, 32, 32, 2], coeff=0.97)
    block = ResidualBlock(net, fused=True, logdet="exact")
    x = torch.randn(8, 2, dtype=torch.float64)
    _, logdet = block.forward_and_logdet(x)
    with torch.no_grad():
        jac = torch.stack([torch.autograd.functional.jacobian(net, xi) for xi in x])
    expected = torch.linalg.slogdet(torch.eye(2, dtype=torch.float64) + jac).logabsdet
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("dims", "options"),
    [
        ([2, 16, 16, 2], {"logdet": "exact"}),  # closed-form 2 x 2 determinant
        ([3, 16, 3], {"logdet": "exact"}),  # slogdet
        ([3, 16, 16, 3], {"logdet": "unbiased", "n_probes": 2}),
    ],
)
def test_value_only_path_under_no_grad(dims: list[int], options: dict) -> None:
    """Under no_grad the fused path skips its autograd Function: same values, nothing recorded."""
    net = make_active_mlp(dims, coeff=0.9)
    x = torch.randn(6, dims[0], dtype=torch.float64)
    block = ResidualBlock(net, fused=True, **options)
    torch.manual_seed(1)
    y_graph, logdet_graph = block.forward_and_logdet(x)
    torch.manual_seed(1)
    with torch.no_grad():
        y_value, logdet_value = block.forward_and_logdet(x)
    assert logdet_graph.requires_grad and not logdet_value.requires_grad
    torch.testing.assert_close(y_value, y_graph.detach(), rtol=TOL, atol=TOL)
    torch.testing.assert_close(logdet_value, logdet_graph.detach(), rtol=TOL, atol=TOL)


def test_eval_mode_and_inverse_match_generic_path() -> None:
    net = make_active_mlp([2, 16, 16, 2], coeff=0.97)
    y = torch.randn(7, 2, dtype=torch.float64) * 2
    weights = torch.rand(7, dtype=torch.float64)
    results = []
    for fused in (True, False):
        block = ResidualBlock(net, fused=fused).eval()
        y_leaf = y.clone().requires_grad_()
        x, logdet = block.inverse_and_logdet(y_leaf)
        loss = (x.pow(3)).sum() + (weights * logdet).sum()
        results.append((x.detach(), logdet.detach(), torch.autograd.grad(loss, [y_leaf, *net.parameters()]),
                        block.last_diagnostics.inverse.iterations))
        with torch.no_grad():
            assert float((block(x) - y).abs().max()) <= 1e-11
    (x1, l1, g1, it1), (x2, l2, g2, it2) = results
    assert it1 == it2
    torch.testing.assert_close(x1, x2, rtol=TOL, atol=TOL)
    torch.testing.assert_close(l1, l2, rtol=TOL, atol=TOL)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_stack_of_blocks_trains_identically() -> None:
    """Three optimiser steps on a stack: same parameters either way (spectral norms refresh)."""
    torch.manual_seed(0)
    nets = [make_active_mlp([2, 8, 8, 2], coeff=0.9) for _ in range(3)]
    copies = [make_active_mlp([2, 8, 8, 2], coeff=0.9) for _ in range(3)]
    for a, b in zip(nets, copies):
        b.load_state_dict(a.state_dict())
    finals = []
    for fused, group in ((True, nets), (False, copies)):
        blocks = nn.ModuleList(ResidualBlock(n, fused=fused) for n in group)
        opt = torch.optim.SGD(blocks.parameters(), lr=0.05)
        torch.manual_seed(5)
        for _ in range(3):
            x, total = torch.randn(16, 2, dtype=torch.float64), 0.0
            for blk in blocks:
                x, logdet = blk.forward_and_logdet(x)
                total = total + logdet
            opt.zero_grad()
            (0.5 * x.pow(2).sum() - total.sum()).backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in blocks.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-11, atol=1e-11)


def test_auto_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = block_module.fused_logdet
    monkeypatch.setattr(block_module, "fused_logdet", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(4, 2)
    ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9)).forward_and_logdet(x)  # auto: fast
    assert len(calls) == 1
    ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9), fused=False).forward_and_logdet(x)
    ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9), exact_trace=True).forward_and_logdet(x)
    generic = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        generic[0].weight.mul_(0.1)
    ResidualBlock(generic, logdet="exact").forward_and_logdet(x)  # auto: generic for other nets
    assert len(calls) == 1


def test_fused_argument_checks() -> None:
    with pytest.raises(ValueError, match="fused must be True, False or 'auto', got 'yes'"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), fused="yes")
    with pytest.raises(ValueError, match="fused=True needs a LipschitzMLP"):
        ResidualBlock(nn.Sequential(nn.Linear(2, 2)), fused=True)


@pytest.mark.parametrize(("dims", "activation"), [([2, 16, 16, 2], "lipswish"), ([5, 12, 5], "elu"),
                                                  ([1, 8, 8, 1], "lipswish")])
def test_newton_inverse_matches_fixed_point(dims: list[int], activation: str) -> None:
    """Same solution and the same implicit gradient (exact adjoint solve vs adjoint iteration)."""
    net = make_active_mlp(dims, coeff=0.97, activation=activation)
    y = torch.randn(9, dims[0], dtype=torch.float64) * 2
    results = []
    for method in ("newton", "fixed_point"):
        block = ResidualBlock(net, inverse_method=method)
        y_leaf = y.clone().requires_grad_()
        x = block.inverse(y_leaf)
        grads = torch.autograd.grad((x.pow(3) * torch.linspace(-1, 1, 9, dtype=y.dtype)[:, None]).sum(),
                                    [y_leaf, *net.parameters()])
        with torch.no_grad():
            assert float((block(x) - y).abs().max()) <= 1e-11
        results.append((x.detach(), grads, block.last_diagnostics.inverse.iterations))
    (x_n, g_n, it_n), (x_f, g_f, it_f) = results
    assert it_n < it_f
    torch.testing.assert_close(x_n, x_f, rtol=0, atol=1e-10)
    for a, b in zip(g_n, g_f):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_newton_inverse_reports_nonconvergence() -> None:
    from pyro_iresnet import ConvergenceError, ConvergenceWarning

    net = make_active_mlp([2, 16, 16, 2], coeff=0.97)
    y = torch.randn(5, 2, dtype=torch.float64) * 3
    with pytest.warns(ConvergenceWarning, match="Newton inverse did not converge in 1 iterations"):
        ResidualBlock(net, inverse_method="newton", max_iter=1).inverse(y)
    with pytest.raises(ConvergenceError):
        ResidualBlock(net, inverse_method="newton", max_iter=1, strict=True).inverse(y)


def _count_jacobian_steps(monkeypatch: pytest.MonkeyPatch, corrupt: bool = False) -> list[int]:
    """Count the Jacobians ``_newton`` takes for Newton/chord steps (those of given rows; the
    log-det's is of the whole batch); with ``corrupt`` they are replaced by $-0.9 I$, which makes
    every Jacobian step overshoot."""
    steps = [0]
    original = fused_inverse_module.SolverNet._jacobian

    def counted(self, pre, n, rows=None):
        jac = original(self, pre, n, rows)
        if rows is not None:
            steps[0] += 1
            if corrupt:
                jac = -0.9 * torch.eye(jac.shape[-1], dtype=jac.dtype).expand_as(jac)
        return jac

    monkeypatch.setattr(fused_inverse_module.SolverNet, "_jacobian", counted)
    return steps


@pytest.mark.parametrize(("dims", "activation"), [([2, 16, 16, 2], "lipswish"), ([3, 12, 3], "elu"),
                                                  ([1, 8, 8, 1], "lipswish"), ([2, 2], "lipswish")])
def test_newton_inverse_and_logdet_matches_exact_reference(
    dims: list[int], activation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Solution within tolerance, and the log-det at it equal to autograd's Jacobian + slogdet,
    while Jacobian (Newton/chord) steps are taken (contraction factors near 0.97 make the plain
    fixed point slow)."""
    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import newton_inverse_and_logdet, solver_net
    from pyro_iresnet.logdet import exact_logdet

    net = make_active_mlp(dims, coeff=0.97, activation=activation)
    y = torch.randn(64, dims[0], dtype=torch.float64) * 3
    steps = _count_jacobian_steps(monkeypatch)
    x, logdet, info = newton_inverse_and_logdet(solver_net(fused_mlp(net)), y)
    with torch.no_grad():
        residual = (x + net(x) - y).abs().amax(1)
    # the residual of the returned point, up to rounding: the solver evaluates g with its constants
    # folded into the weights and other summation orders, which moves a residual by tens of ulps of
    # the values (|y| < 8 here: ulp 8.9e-16)
    torch.testing.assert_close(info.residual, residual, rtol=0, atol=1e-13)
    assert info.converged and bool((residual <= 1e-12 + 1e-13 * y.abs().amax(1) + 1e-13).all())
    torch.testing.assert_close(logdet, exact_logdet(net, x)[1], rtol=0, atol=1e-12)
    assert steps[0] > 0


def test_newton_inverse_and_logdet_survives_failing_jacobian_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Jacobian step that does not reduce the residual ends that sample's Jacobian steps; the
    fixed-point steps that follow still converge, and the log-det is still exact."""
    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import newton_inverse_and_logdet, solver_net
    from pyro_iresnet.logdet import exact_logdet

    net = make_active_mlp([2, 16, 16, 2], coeff=0.97)
    y = torch.randn(32, 2, dtype=torch.float64) * 3
    steps = _count_jacobian_steps(monkeypatch, corrupt=True)
    x, logdet, info = newton_inverse_and_logdet(solver_net(fused_mlp(net)), y)
    assert steps[0] > 0 and info.converged
    with torch.no_grad():
        assert float((x + net(x) - y).abs().max()) <= 1e-11
    torch.testing.assert_close(logdet, exact_logdet(net, x)[1], rtol=0, atol=1e-12)


def test_newton_sampling_path_of_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """``inverse_and_logdet`` in eval mode without gradients (sampling) with ``inverse_method="newton"``
    solves and takes the log-det in one pass: same values as the fixed point, diagnostics filled,
    non-convergence reported, empty batches."""
    from pyro_iresnet import ConvergenceError, ConvergenceWarning

    net = make_active_mlp([2, 16, 16, 2], coeff=0.97)
    y = torch.randn(4, 8, 2, dtype=torch.float64) * 3
    newton = ResidualBlock(net, inverse_method="newton").eval()
    steps = _count_jacobian_steps(monkeypatch)
    with torch.no_grad():
        x_n, logdet_n = newton.inverse_and_logdet(y)
        x_f, logdet_f = ResidualBlock(net).eval().inverse_and_logdet(y)
    assert steps[0] > 0 and x_n.shape == y.shape and logdet_n.shape == (4, 8)
    torch.testing.assert_close(x_n, x_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_n, logdet_f, rtol=0, atol=1e-10)
    diagnostics = newton.last_diagnostics
    assert diagnostics.logdet_method == "exact" and diagnostics.inverse.converged
    assert diagnostics.inverse.residual.shape == (32,)
    with torch.no_grad():
        x_empty, logdet_empty = newton.inverse_and_logdet(y[:0])
        assert x_empty.shape == (0, 8, 2) and logdet_empty.shape == (0, 8)
        with pytest.warns(ConvergenceWarning, match="Newton inverse did not converge in 1 iterations"):
            ResidualBlock(net, inverse_method="newton", max_iter=1).eval().inverse_and_logdet(y)
        with pytest.raises(ConvergenceError):
            ResidualBlock(net, inverse_method="newton", max_iter=1, strict=True).eval().inverse_and_logdet(y)


def test_newton_sample_unaffected_by_a_diverging_neighbour() -> None:
    """A NaN target (accepted with check_finite=False) stays in the batch while few samples have
    finished; the Jacobian steps of the other samples must use their own points (regression: the
    pre-activations were not compacted with the batch, so a sample got a neighbour's Jacobian)."""
    from pyro_iresnet import ConvergenceWarning

    net = LipschitzMLP([1, 2, 1], coeff=0.97, activation="elu").double()
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net.layers[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net.layers[0].bias.zero_(), net.layers[2].bias.zero_()
    block = ResidualBlock(net, logdet="exact", inverse_method="newton", check_finite=False).eval()
    y = torch.cat([torch.full((1, 1), float("nan")), torch.full((3, 1), 1e-4),
                   torch.linspace(2, 6, 12, dtype=torch.float64)[:, None]])
    with torch.no_grad():
        x_ref, logdet_ref = block.inverse_and_logdet(y[1:])
        with pytest.warns(ConvergenceWarning, match="1 of 16 samples"):
            x, logdet = block.inverse_and_logdet(y)
        with pytest.warns(ConvergenceWarning, match="1 of 16 samples"):
            x_inv = block.inverse(y)
    assert torch.isnan(x[0]).all() and torch.isnan(x_inv[0]).all()
    torch.testing.assert_close(x[1:], x_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_inv[1:], x_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet[1:], logdet_ref, rtol=0, atol=1e-12)


def test_newton_entry_points_check_max_iter() -> None:
    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import newton_inverse, newton_inverse_and_logdet, solver_net

    mlp = fused_mlp(LipschitzMLP([2, 8, 2]))
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        newton_inverse(mlp, torch.randn(3, 2), max_iter=0)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        newton_inverse_and_logdet(solver_net(mlp), torch.randn(3, 2), max_iter=0)


@pytest.mark.parametrize("raw_beta", [-20.0, -110.0])  # beta = 2e-9, and 0 in float32
def test_solver_net_with_a_vanishing_lipswish_beta(raw_beta: float) -> None:
    """Folding 1 / (1.1 beta) into the next layer must not overflow when beta underflows."""
    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import solver_net
    from pyro_iresnet.logdet import exact_logdet

    net = LipschitzMLP([2, 16, 16, 2], coeff=0.9).eval()
    with torch.no_grad():
        for act in net.layers[1::2]:
            act.raw_beta.fill_(raw_beta)
    y = torch.randn(8, 2)
    with torch.no_grad():
        torch.testing.assert_close(solver_net(fused_mlp(net))(y), net(y), rtol=0, atol=1e-6)
        x, logdet = ResidualBlock(net, inverse_method="newton").eval().inverse_and_logdet(y)
        assert float((x + net(x) - y).abs().max()) <= 1e-5
    torch.testing.assert_close(logdet, exact_logdet(net, x)[1], rtol=0, atol=1e-6)


def test_newton_argument_checks() -> None:
    with pytest.raises(ValueError, match="inverse_method='newton' needs the fused path"):
        ResidualBlock(nn.Sequential(nn.Linear(2, 2)), inverse_method="newton")
    with pytest.raises(ValueError, match="inverse_method='newton' needs the fused path"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), inverse_method="newton", fused=False)


@pytest.mark.parametrize("options", [{"logdet": "unbiased", "n_exact_terms": 4}, {"logdet": "exact"}])
def test_backward_twice_with_retained_graph_gives_the_same_gradients(options: dict) -> None:
    """The backward reads but never overwrites what the forward saved (pre-activations, Neumann
    vectors, second-layer products)."""
    net = make_active_mlp([2, 16, 16, 2], coeff=0.9)
    block = ResidualBlock(net, fused=True, **options)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y, logdet = block.forward_and_logdet(x)
    loss = logdet.sum() + y.pow(2).sum()
    first = torch.autograd.grad(loss, [x, *net.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *net.parameters()])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fused_gradient_where_the_estimate_equals_coeff_exactly() -> None:
    """At sigma~ = c exactly, torch.clamp (the generic path) passes the gradient through the
    normalisation; the fused path's closed form must do the same (ratio >= 1, not > 1)."""
    import copy

    torch.manual_seed(0)
    c = 0.5
    net = LipschitzMLP([2, 2, 2], coeff=c).double()
    with torch.no_grad():
        for layer in (net.layers[0], net.layers[2]):
            layer.weight.copy_(torch.tensor([[c, 0.0], [0.0, c / 2]], dtype=torch.float64))
            layer.u.copy_(torch.tensor([1.0, 0.0]))
            layer.v.copy_(torch.tensor([1.0, 0.0]))
    grads = []
    x = torch.randn(5, 2, dtype=torch.float64)
    for fused in (True, False):
        block = ResidualBlock(copy.deepcopy(net), logdet="exact", fused=fused).train()
        y, logdet = block.forward_and_logdet(x)
        assert float(block.net.layers[0].sigma_estimate().detach()) == c  # the power step keeps e_1
        (y.pow(2).sum() + logdet.sum()).backward()
        grads.append([p.grad.clone() for p in block.net.parameters()])
    for fused_grad, generic_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, generic_grad, rtol=1e-10, atol=1e-12)


def test_newton_takes_no_jacobian_while_fixed_point_steps_contract_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The docstring: a sample switches to Newton only when the observed contraction predicts more
    than d + 2 further fixed-point steps. Here Lip(g) <= 0.2^2 = 0.04 and d = 8: from a residual ~1,
    tol 1e-12 needs log(1e-12)/log(0.04) < 9 < d + 2 steps, so no Jacobian may be computed and the
    iteration count equals the plain fixed point's."""
    torch.manual_seed(0)
    net = LipschitzMLP([8, 16, 8], coeff=0.2).double().eval()
    calls = []
    original = SolverNet._jacobian
    monkeypatch.setattr(SolverNet, "_jacobian", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    y = torch.randn(16, 8, dtype=torch.float64)
    x, info = newton_inverse(fused_mlp(net), y)
    assert info.converged
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(x + net(x), y, rtol=0, atol=1e-11)


def test_newton_logdet_honours_a_non_default_elu_alpha() -> None:
    """The fused path reads each ELU's alpha (fused_mlp stores float(act.alpha)), so a LipschitzMLP
    whose ELU alpha was changed is supported; the sampling log-det must then still equal the exact
    one. Reference: slogdet of the autograd Jacobian (exact_logdet) at the returned points."""
    torch.manual_seed(0)
    net = make_active_mlp([2, 8, 2], 0.9, torch.float64, activation="elu").eval()
    for m in net.modules():
        if isinstance(m, nn.ELU):
            m.alpha = 0.5  # 1-Lipschitz for alpha <= 1
    y = 2 * torch.randn(32, 2, dtype=torch.float64)
    with torch.no_grad():
        x, logdet, info = newton_inverse_and_logdet(solver_net(fused_mlp(net)), y)
        _, reference = exact_logdet(net, x)
    assert info.converged
    torch.testing.assert_close(logdet, reference, rtol=1e-10, atol=1e-10)


def test_fused_logdet_and_gradients_honour_a_non_default_elu_alpha() -> None:
    """fused_logdet("exact") of an MLP whose ELUs have alpha != 1 equals the log|det(I + J)| that
    slogdet gives for the autograd Jacobian (exact_logdet), in value and in its gradients w.r.t. the
    input and every parameter (float64, fixed seed, inputs with many negative pre-activations)."""
    torch.manual_seed(0)
    net = make_active_mlp([3, 16, 16, 3], 0.9, torch.float64, activation="elu").eval()
    for m in net.modules():
        if isinstance(m, nn.ELU):
            m.alpha = 0.4  # 1-Lipschitz for alpha <= 1
    x = (2 * torch.randn(16, 3, dtype=torch.float64)).requires_grad_()
    weights = torch.linspace(-1.0, 2.0, 16, dtype=torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]

    gx, logdet = fused_logdet(fused_mlp(net), x, "exact")
    grads = torch.autograd.grad((weights * logdet).sum() + gx.sum(), [x, *params])
    gx_ref, logdet_ref = exact_logdet(net, x)
    grads_ref = torch.autograd.grad((weights * logdet_ref).sum() + gx_ref.sum(), [x, *params])

    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


# -- conditional nets: ConcatContextNet over a LipschitzMLP ------------------------------------------
def _conditional_net(dims: list[int], context_dim: int, activation: str = "lipswish") -> ConcatContextNet:
    """A ConcatContextNet whose every normalisation is active and whose context moves the slopes."""
    return ConcatContextNet(make_active_mlp(dims, coeff=0.95, activation=activation), context_dim)


def _run_conditional(net: nn.Module, fused: bool, x: torch.Tensor, context: torch.Tensor, weights: torch.Tensor,
                     seed: int, **options):
    block = ResidualBlock(net, fused=fused, **options)
    torch.manual_seed(seed)
    x, context = x.clone().requires_grad_(), context.clone().requires_grad_()
    y, logdet = block.forward_and_logdet(x, context)
    loss = (weights * logdet).sum() + (torch.linspace(-1, 2, x.shape[-1], dtype=x.dtype) * y.sin()).sum()
    return y.detach(), logdet.detach(), torch.autograd.grad(loss, [x, context, *net.parameters()])


@pytest.mark.parametrize(
    ("dims", "context_dim", "activation", "options"),
    [
        ([2 + 3, 16, 16, 2], 3, "lipswish", {"logdet": "exact"}),
        ([1 + 2, 8, 1], 2, "elu", {"logdet": "exact"}),
        ([3 + 1, 12, 12, 3], 1, "lipswish", {"logdet": "unbiased", "n_exact_terms": 3}),
        ([3 + 1, 12, 12, 3], 1, "lipswish", {"logdet": "unbiased", "neumann_grad": False}),
        ([4 + 2, 10, 4], 2, "elu", {"logdet": "series", "n_terms": 3, "memory_efficient": True}),
        ([2 + 2, 8, 8, 8, 2], 2, "lipswish", {"logdet": "unbiased", "roulette": "poisson", "n_probes": 2}),
        ([3 + 2, 3], 2, "lipswish", {"logdet": "series", "n_terms": 4}),  # no hidden layer
    ],
)
def test_conditional_matches_generic_path(dims: list[int], context_dim: int, activation: str, options: dict) -> None:
    """The context enters the fused path through the first layer: same values and gradients (input,
    context, every parameter; weighted per-sample losses) as autograd through ``net([x, c])``."""
    net = _conditional_net(dims, context_dim, activation)
    d = dims[-1]
    x = torch.randn(6, d, dtype=torch.float64) * 2
    context = torch.randn(6, context_dim, dtype=torch.float64) * 2
    weights = torch.rand(6, dtype=torch.float64) * 3 - 1
    fast = _run_conditional(net, True, x, context, weights, seed=3, **options)
    # the generic memory-efficient estimator refuses a context gradient: the reference runs without it
    generic = {key: value for key, value in options.items() if key != "memory_efficient"}
    slow = _run_conditional(net, False, x, context, weights, seed=3, **generic)
    torch.testing.assert_close(fast[0], slow[0], rtol=TOL, atol=TOL)
    torch.testing.assert_close(fast[1], slow[1], rtol=TOL, atol=TOL)
    for g_fast, g_slow in zip(fast[2], slow[2]):
        torch.testing.assert_close(g_fast, g_slow, rtol=TOL, atol=TOL)
    assert float(fast[2][1].abs().max()) > 1e-3  # the context gradient is not vacuous


def test_conditional_exact_logdet_equals_slogdet_of_the_jacobian_in_x() -> None:
    net = _conditional_net([2 + 3, 16, 16, 2], 3)
    x, context = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    _, logdet = fused_logdet(fused_mlp(net), x, "exact", context=context)
    for x_i, c_i, logdet_i in zip(x, context, logdet):
        jac = torch.autograd.functional.jacobian(lambda z, c=c_i: z + net(z[None], c[None])[0], x_i)
        torch.testing.assert_close(logdet_i, torch.linalg.slogdet(jac).logabsdet, rtol=0, atol=1e-12)


def test_conditional_inverse_and_gradients_match_generic_path() -> None:
    """Sampling direction: the solver iterations run the fused net with the context; the solution,
    the log-det and the implicit gradients (target, context, parameters) are the generic path's."""
    net = _conditional_net([2 + 3, 16, 16, 2], 3)
    y = torch.randn(7, 2, dtype=torch.float64) * 2
    context = torch.randn(7, 3, dtype=torch.float64)
    results = []
    for fused in (True, False):
        block = ResidualBlock(net, fused=fused).eval()
        y_leaf, c_leaf = y.clone().requires_grad_(), context.clone().requires_grad_()
        x, logdet = block.inverse_and_logdet(y_leaf, c_leaf)
        with torch.no_grad():
            assert float((block(x, context) - y).abs().max()) <= 1e-11
        loss = x.pow(3).sum() + logdet.sum()
        results.append((x.detach(), logdet.detach(), torch.autograd.grad(loss, [y_leaf, c_leaf, *net.parameters()])))
    (x1, l1, g1), (x2, l2, g2) = results
    torch.testing.assert_close(x1, x2, rtol=TOL, atol=TOL)
    torch.testing.assert_close(l1, l2, rtol=TOL, atol=TOL)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_conditional_solver_net_and_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _conditional_net([2 + 3, 8, 8, 2], 3)
    x, context = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    solver = solver_net(fused_mlp(net))
    with torch.no_grad():
        torch.testing.assert_close(solver(x, context), net(x, context), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pass a context exactly when the net is conditional"):
        solver(x)
    with pytest.raises(ValueError, match="pass a context exactly when the net is conditional"):
        fused_logdet(fused_mlp(net), x, "exact")
    calls = []
    original = block_module.fused_logdet
    monkeypatch.setattr(block_module, "fused_logdet", lambda *a, **k: calls.append(1) or original(*a, **k))
    ResidualBlock(net).forward_and_logdet(x, context)  # auto: fast
    assert len(calls) == 1
    ResidualBlock(net, fused=False).forward_and_logdet(x, context)
    over_generic = ConcatContextNet(nn.Sequential(SpectralNormLinear(5, 2, coeff=0.9)), context_dim=3).double()
    ResidualBlock(over_generic).forward_and_logdet(x, context)  # auto: generic for other inner nets
    assert len(calls) == 1
    with pytest.raises(ValueError, match="fused=True needs a LipschitzMLP"):
        ResidualBlock(over_generic, fused=True)


@pytest.mark.parametrize("used", ["y", "logdet"])
@pytest.mark.parametrize(
    ("activation", "context_dim", "options"),
    [("lipswish", 0, {"logdet": "exact"}), ("elu", 0, {"logdet": "unbiased"}),
     ("lipswish", 2, {"logdet": "series", "n_terms": 3}), ("elu", 2, {"logdet": "exact"})],
)
def test_a_loss_on_one_output_only(used: str, activation: str, context_dim: int, options: dict) -> None:
    """The fused backward skips the part of an output the loss does not use (autograd passes no
    gradient for it): same gradients as the generic path, with y alone or the log-det alone."""
    d = 3
    net = make_active_mlp([d + context_dim, 12, 12, d], coeff=0.95, activation=activation)
    if context_dim:
        net = ConcatContextNet(net, context_dim)
    x = torch.randn(5, d, dtype=torch.float64) * 2
    context = torch.randn(5, context_dim, dtype=torch.float64) if context_dim else None
    grads = []
    for fused in (True, False):
        block = ResidualBlock(net, fused=fused, **options)
        torch.manual_seed(3)
        inputs = [x.clone().requires_grad_()] + ([context.clone().requires_grad_()] if context_dim else [])
        y, logdet = block.forward_and_logdet(*inputs)
        loss = (y.sin() * torch.linspace(-1, 2, d, dtype=x.dtype)).sum() if used == "y" else (logdet * x[:, 0]).sum()
        grads.append(torch.autograd.grad(loss, [*inputs, *net.parameters()], allow_unused=True))
    for g_fast, g_slow in zip(*grads):
        if g_slow is None:  # a parameter the generic graph does not reach (e.g. the last bias for the log-det)
            assert g_fast is None or float(g_fast.abs().max()) == 0
        else:
            torch.testing.assert_close(g_fast, g_slow, rtol=TOL, atol=TOL)
    assert float(grads[0][0].abs().max()) > 0  # not vacuous


def test_a_call_under_inference_mode_leaves_later_calls_working() -> None:
    """Scratch buffers made under ``inference_mode`` are inference tensors, which cannot be written
    outside it: they are not kept for later calls."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2]))
    x = torch.randn(16, 2)
    with torch.inference_mode():
        block.forward_and_logdet(x)
    other = ResidualBlock(LipschitzMLP([2, 8, 2]))
    y, logdet = other.forward_and_logdet(x.clone().requires_grad_())
    (y.sum() + logdet.sum()).backward()


@pytest.mark.parametrize(("dims", "context_dim", "activation"), [([2 + 3, 16, 16, 2], 3, "lipswish"),
                                                                 ([3 + 1, 12, 3], 1, "elu")])
def test_conditional_newton_inverse_matches_the_generic_fixed_point(
    dims: list[int], context_dim: int, activation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a context, Newton's solution is the generic fixed point's, and so are its implicit
    gradients for y, the context and every parameter (exact adjoint solve vs adjoint iteration
    through autograd); samples finish at different iterations, so rows leave the batch with their
    context."""
    net = _conditional_net(dims, context_dim, activation)
    d = dims[-1]
    y = torch.randn(24, d, dtype=torch.float64) * torch.linspace(0.1, 4, 24, dtype=torch.float64)[:, None]
    context = torch.randn(24, context_dim, dtype=torch.float64) * 2
    weights = torch.linspace(-1, 1, 24, dtype=torch.float64)[:, None]
    steps = _count_jacobian_steps(monkeypatch)
    results = []
    for method, fused in (("newton", "auto"), ("fixed_point", False)):
        block = ResidualBlock(net, inverse_method=method, fused=fused)
        y_leaf, c_leaf = y.clone().requires_grad_(), context.clone().requires_grad_()
        x = block.inverse(y_leaf, c_leaf)
        with torch.no_grad():
            assert float((x + net(x, context) - y).abs().max()) <= 1e-11
        grads = torch.autograd.grad((x.pow(3) * weights).sum(), [y_leaf, c_leaf, *net.parameters()])
        results.append((x.detach(), grads))
    assert steps[0] > 0
    (x_n, g_n), (x_f, g_f) = results
    torch.testing.assert_close(x_n, x_f, rtol=0, atol=1e-10)
    for a, b in zip(g_n, g_f):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_conditional_newton_sampling_matches_the_exact_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling (``inverse_and_logdet`` in eval mode, no gradient) with a context takes the value-only
    Newton path: the solution within tolerance and the log-det equal to slogdet of autograd's
    Jacobian in x at it, per sample's own context."""
    net = _conditional_net([2 + 3, 16, 16, 2], 3)
    y = torch.randn(32, 2, dtype=torch.float64) * torch.linspace(0.1, 4, 32, dtype=torch.float64)[:, None]
    context = torch.randn(32, 3, dtype=torch.float64) * 2
    calls = []
    original = newton_inverse_and_logdet
    monkeypatch.setattr(block_module, "newton_inverse_and_logdet",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    steps = _count_jacobian_steps(monkeypatch)
    with torch.no_grad():
        x, logdet = ResidualBlock(net, inverse_method="newton").eval().inverse_and_logdet(y, context)
        assert float((x + net(x, context) - y).abs().max()) <= 1e-11
    assert calls and steps[0] > 0
    jac = torch.func.vmap(torch.func.jacrev(lambda v, c: v + net(v[None], c[None])[0]))(x, context)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("conditional", "context", "error", "match"),
    [
        (True, None, ValueError, "the net is conditional: pass a context"),
        (False, torch.randn(4, 3), ValueError, "the net takes no context, got one"),
        (True, torch.randn(5, 3), ValueError, r"context must have one row per sample of y \(4\), got shape \(5, 3\)"),
        (True, torch.randn(4, 2), ValueError, r"context must have shape \(N, 3\), got \(4, 2\)"),
        (True, torch.randn(4, 3, dtype=torch.float64), TypeError, "context has dtype torch.float64 but the net's"),
        (True, torch.ones(4, 3, dtype=torch.int64), TypeError, "context must have a floating dtype"),
        (True, [[0.0] * 3] * 4, TypeError, "context must be a torch.Tensor, got list"),
    ],
    ids=["missing", "unexpected", "rows", "columns", "dtype", "integer", "list"],
)
def test_newton_solvers_check_the_context(conditional: bool, context, error: type, match: str) -> None:
    net = ConcatContextNet(LipschitzMLP([2 + 3, 8, 2]), context_dim=3) if conditional else LipschitzMLP([2, 8, 2])
    mlp = fused_mlp(net.eval())
    y = torch.randn(4, 2)
    with pytest.raises(error, match=match):
        newton_inverse(mlp, y, context)
    with pytest.raises(error, match=match), torch.no_grad():
        newton_inverse_and_logdet(solver_net(mlp), y, context)


def test_the_inverse_of_a_singular_i_plus_j_is_not_finite_instead_of_an_exception() -> None:
    """For d > 2 the fused path inverts I + J with ``inv_ex`` (no host sync for an error check): a
    singular I + J, possible only with Lip(g) >= 1, gives non-finite entries rather than raising;
    a regular one its inverse."""
    from pyro_iresnet.fused import _inverse

    jac = torch.randn(4, 3, 3, dtype=torch.float64) * 0.2
    torch.testing.assert_close(_inverse(jac), torch.linalg.inv(torch.eye(3, dtype=torch.float64) + jac))
    singular = -torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone()
    assert not bool(torch.isfinite(_inverse(singular)).all())
