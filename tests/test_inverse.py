"""Fixed-point inverse: round trip, Banach bound, Anderson, implicit gradient, non-convergence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pyro_iresnet import ConvergenceError, ConvergenceWarning, LipschitzMLP, ResidualBlock, iresnet, lipschitz_bound
from pyro_iresnet.inverse import fixed_point_inverse
from tests.conftest import make_active_mlp


@pytest.mark.parametrize(
    "dtype, aligned, tol",
    [
        (torch.float64, True, 1e-10),
        (torch.float32, False, 1e-5),  # the construction: random weights scaled up
        (torch.float32, True, None),  # near-critical g: the a-priori bound sets the tolerance
    ],
    ids=["float64", "float32", "float32-aligned"],
)
@pytest.mark.parametrize("coeff", [0.9, 0.98])
@pytest.mark.parametrize("dim", [2, 16])
def test_round_trip_within_banach_bound(dtype: torch.dtype, aligned: bool, tol: float | None, coeff: float,
                                        dim: int) -> None:
    net = make_active_mlp([dim, 32, 32, dim], coeff, dtype, aligned=aligned)
    block = ResidualBlock(net).eval()
    x = torch.randn(64, dim, dtype=dtype)
    with torch.no_grad():
        y = block(x)
        x_rec = block.inverse(y)
    info = block.last_diagnostics.inverse
    assert info.converged
    lip = lipschitz_bound(net)
    atol, rtol = (1e-12, 1e-13) if dtype == torch.float64 else (1e-6, 1e-6)
    with torch.no_grad():
        target = atol + rtol * y.abs().amax(1)
        first_step = block.g(y).norm(dim=1)
    if tol is None:  # |x - x*| <= L/(1-L) |x_n - x_{n+1}|, plus the forward pass's rounding
        rounding = 1e-6 * y.abs().max() / (1 - lip)
        tol = float(target.max() * lip / (1 - lip) + rounding)
    assert (x_rec - x).abs().max() <= tol
    # Banach: the residual of x_n is |x_n - x_{n+1}| <= L^n |x_1 - x_0| with x_0 = y, x_1 = y - g(y)
    needed = torch.log(target / first_step) / math.log(lip)
    assert info.iterations <= math.ceil(float(needed.max())) + 1


def _iterations(net: torch.nn.Module, y: torch.Tensor, method: str) -> int:
    block = ResidualBlock(net, inverse_method=method, max_iter=5000).eval()
    with torch.no_grad():
        x = block.inverse(y)
        assert (x + block.g(x) - y).abs().max() <= 1e-11
    return block.last_diagnostics.inverse.iterations


@pytest.mark.parametrize("activation", ["lipswish", "elu"])
def test_anderson_needs_fewer_iterations_at_coeff_098(activation: str) -> None:
    net = make_active_mlp([8, 32, 32, 8], 0.98, torch.float64, activation=activation)
    y = 3 * torch.randn(64, 8, dtype=torch.float64)
    assert _iterations(net, y, "anderson") < _iterations(net, y, "fixed_point")


def test_anderson_on_slowly_contracting_map() -> None:
    # g(x) = W x with W symmetric, eigenvalues in [-0.98, -0.5]: plain iteration contracts by 0.98
    net = make_active_mlp([8, 8], 0.98, torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    with torch.no_grad():
        layer = net.layers[0]
        layer.weight.copy_(-q @ torch.diag(torch.linspace(0.5, 0.98, 8, dtype=torch.float64)) @ q.T)
        layer.bias.zero_()
        layer._converge_power_iteration(rtol=1e-9)
    y = torch.randn(16, 8, dtype=torch.float64)
    plain, anderson = _iterations(net, y, "fixed_point"), _iterations(net, y, "anderson")
    assert plain > 1000
    assert anderson < plain / 10


def test_stalled_forward_and_adjoint_solves_finish_with_anderson() -> None:
    # g(x) = W x, eigenvalues of W in [0.5, 0.995]: the plain iteration needs ~5,500 steps for 1e-12
    net = make_active_mlp([8, 8], 0.995, torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    with torch.no_grad():
        layer = net.layers[0]
        layer.weight.copy_(q @ torch.diag(torch.linspace(0.5, 0.995, 8, dtype=torch.float64)) @ q.T)
        layer.bias.zero_()
        layer._converge_power_iteration(rtol=1e-9)
    block = ResidualBlock(net, max_iter=400).eval()
    y = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    x = block.inverse(y)  # warnings are errors: neither solve may stop unconverged
    assert block.last_diagnostics.inverse.iterations < 400
    upstream = torch.randn_like(x)
    (x * upstream).sum().backward()
    eye_plus_w = torch.eye(8, dtype=torch.float64) + layer.normalized_weight().detach()
    assert torch.allclose(x.detach(), torch.linalg.solve(eye_plus_w, y.detach().T).T, atol=1e-10)
    assert torch.allclose(y.grad, torch.linalg.solve(eye_plus_w.T, upstream.T).T, atol=1e-10)


@pytest.mark.parametrize("dim", [8, 31])
@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_anderson_memory_grows_with_the_dimension(method: str, dim: int) -> None:
    """g(x) = 0.995 Q x with Q orthogonal in D dimensions: every eigenvalue has modulus 0.995, so the
    plain iteration needs about 5,500 steps for 1e-12 and Anderson with 5 iterates (its old fixed
    memory) stalls for over 2,000; with min(D + 2, 32) iterates it finishes in a few dozen, also as
    the fixed point's fallback (at D = 31 the memory used to drop back to 5)."""
    net = make_active_mlp([dim, dim], 0.995, torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    with torch.no_grad():
        layer = net.layers[0]
        layer.weight.copy_(0.995 * q)
        layer.bias.zero_()
        layer._converge_power_iteration(rtol=1e-9)
    block = ResidualBlock(net, max_iter=400, inverse_method=method).eval()
    y = torch.randn(16, dim, dtype=torch.float64)
    x = block.inverse(y)  # warnings are errors: the solve must converge
    assert block.last_diagnostics.inverse.iterations < 200
    eye_plus_w = torch.eye(dim, dtype=torch.float64) + layer.normalized_weight().detach()
    torch.testing.assert_close(x, torch.linalg.solve(eye_plus_w, y.T).T, rtol=0, atol=1e-10)


def test_diverged_sample_beside_stalled_ones_is_reported() -> None:
    """A NaN sample leaves the batch; the stalled ones finish with Anderson; the solve still
    reports non-convergence because of the NaN one (and not before the others finished)."""
    y = torch.randn(16, 2, dtype=torch.float64)
    y[3] = float("nan")
    with pytest.warns(ConvergenceWarning, match="diverged to NaN/Inf in 1 of 16"):
        x, info = fixed_point_inverse(lambda x: 0.999 * torch.tanh(x), y)  # plain: ~20,000 iterations
    assert not info.converged and info.iterations < 1000
    residual = (x + 0.999 * torch.tanh(x) - y).abs().amax(1)
    assert torch.isnan(residual[3]) and bool((residual[torch.arange(16) != 3] <= 1e-11).all())


def test_anderson_lets_finished_and_diverged_samples_go() -> None:
    """Per-sample early exit in Anderson: a NaN sample counts as finished (reported as diverged) and
    leaves the batch with the first eighth of finished samples, instead of iterating to max_iter;
    the other samples keep their own histories."""
    y = torch.randn(16, 2, dtype=torch.float64) * 2
    y[3] = float("nan")
    rotation = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)

    def g(x: torch.Tensor) -> torch.Tensor:
        return 0.9 * torch.tanh(x @ rotation)

    with pytest.warns(ConvergenceWarning, match="diverged to NaN/Inf in 1 of 16"):
        x, info = fixed_point_inverse(g, y, method="anderson", max_iter=500)
    assert info.iterations < 100
    finite = torch.arange(16) != 3
    x_ref, info_ref = fixed_point_inverse(g, y[finite], method="anderson", max_iter=500)
    assert info_ref.converged and bool((info.residual[finite] <= 1e-12 + 1e-13 * y[finite].abs().amax(1)).all())
    torch.testing.assert_close(x[finite], x_ref, rtol=0, atol=1e-11)


def test_anderson_reports_the_point_its_last_step_reached_as_converged_when_it_is() -> None:
    """The budget's last Anderson step lands on a point whose residual is checked: within the
    tolerance it is converged, not reported as a failure with a residual of 0."""
    y = torch.randn(3, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = fixed_point_inverse(lambda z: torch.full_like(z, 0.5), y, method="anderson", max_iter=1)
    assert info.converged and info.iterations == 1 and float(info.residual.max()) == 0.0
    torch.testing.assert_close(x, y - 0.5, rtol=0, atol=0)
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        _, info = fixed_point_inverse(lambda z: 0.99 * torch.sin(z), 3 * y, method="anderson", max_iter=2)
    assert not info.converged


def test_anderson_when_every_sample_is_done_at_its_first_iteration() -> None:
    """Every sample within the tolerance at the first check (a block at its fixed point, an all-NaN
    batch, and a fixed point handing Anderson iterates that already meet the tolerance) returns
    those points; the output is not the iterate's own storage (regression: a RuntimeError)."""
    net = LipschitzMLP([2, 8, 2], coeff=0.9).double()
    with torch.no_grad():
        net.layers[-1].weight.zero_(), net.layers[-1].bias.zero_()  # g = 0: y is its own inverse
    y = torch.randn(4, 2, dtype=torch.float64)
    block = ResidualBlock(net, inverse_method="anderson").eval()
    assert torch.equal(block.inverse(y), y) and block.last_diagnostics.inverse.iterations == 1
    with pytest.warns(ConvergenceWarning, match="diverged to NaN/Inf in 3 of 3 samples after 1 iterations"):
        x, info = fixed_point_inverse(lambda x: 0.5 * torch.tanh(x), torch.full((3, 2), float("nan")),
                                      method="anderson")
    assert torch.isnan(x).all() and not info.converged
    # g(x) = 0.995 x: the plain iteration stalls (its residual shrinks by 0.995 per step), and the
    # iterate it hands to Anderson after 100 steps already meets the tolerance
    y = torch.tensor([[1e-12 / 0.995 ** 100.5]], dtype=torch.float64)
    x, info = fixed_point_inverse(lambda x: 0.995 * x, y)
    assert info.converged and abs(float(x[0, 0]) - float(y[0, 0]) / 1.995) <= 1e-12


def test_adjoint_non_convergence_warns() -> None:
    # W has eigenvalues 0.5 and 0.995: y along the first converges in ~40 steps, the upstream
    # gradient along the second needs thousands, so only the adjoint solve runs out of max_iter
    q, _ = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))
    w = (q @ torch.diag(torch.tensor([0.5, 0.995], dtype=torch.float64)) @ q.T).requires_grad_()
    y = q[:, 0].repeat(3, 1)
    x, info = fixed_point_inverse(lambda z: z @ w.T, y, [w], max_iter=60)
    assert info.converged
    with pytest.warns(ConvergenceWarning, match=r"adjoint of the inverse did not converge in 60 iterations"):
        (x @ q[:, 1]).sum().backward()


def _newton_reference_inverse(block: ResidualBlock, y: torch.Tensor) -> torch.Tensor:
    """A differentiable inverse independent of the implicit Function: solve to convergence, then
    take one Newton step with the autograd Jacobian (exact gradient at the solution)."""
    with torch.no_grad():
        x = y.clone()
        for _ in range(2000):
            x = y - block.g(x)
    x = x.detach()
    jac = torch.func.vmap(torch.func.jacrev(lambda z: block.g(z.unsqueeze(0)).squeeze(0)))(x)
    eye = torch.eye(y.shape[-1], dtype=y.dtype)
    residual = x + block.g(x) - y
    return x - torch.linalg.solve(eye + jac, residual.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_implicit_gradient_matches_newton_reference(method: str) -> None:
    dtype = torch.float64
    net = make_active_mlp([3, 16, 16, 3], 0.95, dtype)
    block = ResidualBlock(net, inverse_method=method).eval()
    y = torch.randn(6, 3, dtype=dtype, requires_grad=True)
    weights = torch.randn(6, 3, dtype=dtype)
    params = list(net.parameters())

    loss = (block.inverse(y) ** 2 * weights).sum()
    ours = torch.autograd.grad(loss, [y, *params])
    loss_ref = (_newton_reference_inverse(block, y) ** 2 * weights).sum()
    reference = torch.autograd.grad(loss_ref, [y, *params])
    for a, b in zip(ours, reference):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12


@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e-8])
def test_implicit_gradient_keeps_its_accuracy_for_a_small_upstream_gradient(scale: float) -> None:
    """The adjoint is linear in the upstream gradient v, so its tolerance scales with v: with the
    forward's absolute atol (1e-6 in float32) a loss scaled by 1e-4 (a mean over many elements)
    stopped it after a few iterations and gave dL/dy off by ~1%, silently. Reference: the exact
    adjoint (I + J)^{-T} v at the solution, in float64."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([16, 16], coeff=0.97)).eval()  # float32 defaults
    y = (torch.randn(64, 16) * 2).requires_grad_()
    target = torch.randn(64, 16)
    x = block.inverse(y)
    (grad_y,) = torch.autograd.grad(scale * ((x - target) ** 2).sum(), y)
    x64, v = x.detach().double(), 2 * scale * (x.detach() - target).double()
    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacrev(lambda z: block.g(z[None].float())[0].double()))(x64)
        exact = torch.linalg.solve((torch.eye(16, dtype=torch.float64) + jac).mT, v[..., None])[..., 0]
    assert float((grad_y.double() - exact).norm() / exact.norm()) < 2e-5


def test_non_convergence_warns_with_details_and_strict_raises() -> None:
    net = make_active_mlp([4, 16, 4], 0.98, torch.float64)
    y = 3 * torch.randn(5, 4, dtype=torch.float64)
    block = ResidualBlock(net, max_iter=2).eval()
    with pytest.warns(ConvergenceWarning, match=r"2 iterations.*worst residual.*Lipschitz bound of g"):
        block.inverse(y)
    assert not block.last_diagnostics.inverse.converged
    strict = ResidualBlock(net, max_iter=2, strict=True).eval()
    with pytest.raises(ConvergenceError, match="max_iter"):
        strict.inverse(y)


def test_inverse_records_no_graph_of_iterations() -> None:
    net = make_active_mlp([2, 16, 2], 0.95, torch.float64)
    block = ResidualBlock(net)
    y = (3 * torch.randn(4, 2, dtype=torch.float64)).requires_grad_()
    x = block.inverse(y)
    assert block.last_diagnostics.inverse.iterations > 5
    # one autograd node for the whole solve (plus reshapes), fed by the leaves y and the parameters
    seen, stack = set(), [x.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    names = [type(node).__name__ for node in seen]
    assert sum("ImplicitInverse" in name for name in names) == 1
    assert len(seen) <= 4 + len(list(net.parameters()))


def test_spectral_norm_frozen_during_solve() -> None:
    net = make_active_mlp([2, 16, 2], 0.9, torch.float64)
    block = ResidualBlock(net).train()
    y = torch.randn(4, 2, dtype=torch.float64)
    block.inverse(y)  # first training call after the weights changed refreshes once
    buffers = [b.clone() for b in net.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = block.inverse(y)
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    assert (block(x) - y).abs().max() <= 1e-10


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_reported_residual_is_that_of_the_returned_point(method: str) -> None:
    """``SolveInfo.residual`` is the residual of the x returned. For g = 0.9 x rotation by 45 degrees
    the step after a checked iterate can have an inf-norm residual up to 0.9 * sqrt(2) times larger,
    above the tolerance for a quarter of the samples if that step were returned."""
    angle = math.pi / 4
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)

    def g(x: torch.Tensor) -> torch.Tensor:
        return 0.9 * x @ rotation.T

    torch.manual_seed(0)
    y = torch.randn(1000, 2, dtype=torch.float64)
    x, info = fixed_point_inverse(g, y, atol=1e-6, rtol=0.0, method=method)
    residual = (x + g(x) - y).abs().amax(1)
    assert info.converged
    torch.testing.assert_close(info.residual, residual, rtol=0, atol=1e-15)
    assert bool((residual <= 1e-6).all())
    # also when max_iter stops it (the plain iteration returned the step after the checked iterate)
    with pytest.warns(ConvergenceWarning):
        x, info = fixed_point_inverse(g, y, atol=1e-12, rtol=0.0, method=method, max_iter=5)
    torch.testing.assert_close(info.residual, (x + g(x) - y).abs().amax(1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["fixed_point", "anderson", "newton"])
def test_half_precision_inverse_reaches_its_default_tolerance(dtype: torch.dtype, method: str) -> None:
    """float16 and bfloat16 solves converge at their dtype's default tolerance (a ConvergenceWarning
    would fail the test); Anderson's least-squares system and Newton's d > 2 solve are factorised in
    float32."""
    torch.manual_seed(0)
    t = iresnet(3, hidden_dims=[8], inverse_method=method).to(dtype).eval()
    y = 2 * torch.randn(16, 3, dtype=dtype)
    x = t.inv(y)
    assert x.dtype == dtype and t.block.last_diagnostics.inverse.converged


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "newton", "newton_logdet"])
@pytest.mark.parametrize("bad", [dict(atol=math.nan), dict(rtol=math.nan), dict(atol=-1e-6)])
def test_public_solvers_refuse_nan_or_negative_tolerances(solver: str, bad: dict) -> None:
    """A NaN tolerance used to count every sample as finished at once: y came back as its own
    preimage, reported converged, without a warning."""
    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import newton_inverse, newton_inverse_and_logdet, solver_net

    torch.manual_seed(0)
    net = LipschitzMLP([2, 16, 2], coeff=0.9).eval()
    y = torch.randn(4, 2)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got"):
        if solver in ("fixed_point", "anderson"):
            with torch.no_grad():
                fixed_point_inverse(net, y, method=solver, **bad)
        elif solver == "newton":
            newton_inverse(fused_mlp(net), y, **bad)
        else:
            newton_inverse_and_logdet(solver_net(fused_mlp(net)), y, **bad)


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_exact_solution_meets_a_zero_tolerance_at_once(method: str) -> None:
    """'Finished' is residual <= tol: with atol = rtol = 0 an exact solution (residual 0) stops at
    the first check instead of running to max_iter and warning."""
    y = torch.zeros(3, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = fixed_point_inverse(lambda x: 0.5 * x, y, atol=0.0, rtol=0.0, method=method)
    assert info.converged and info.iterations == 1 and torch.equal(x, y)


def test_iterations_count_plain_and_anderson_iterations() -> None:
    """SolveInfo.iterations counts every iteration of the solve, including the plain iterations
    run before Anderson takes over: it equals the number of evaluations of g (one per iteration)
    and exceeds the 100 plain iterations of the two progress windows when Anderson was needed.

    g(x) = 0.995 Q x with Q orthogonal contracts by 0.995 per plain step, so the worst residual
    does not halve within 50 iterations and Anderson finishes the solve."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    calls = []

    def g(x):
        calls.append(1)
        return 0.995 * x @ q.T

    y = torch.randn(4, 8, dtype=torch.float64)
    x, info = fixed_point_inverse(g, y, max_iter=2000)
    assert info.converged
    assert torch.allclose(x + g(x), y, atol=1e-10)
    calls.pop()  # the check above
    assert info.iterations > 100
    assert info.iterations == len(calls)


def test_inverse_gradient_reaches_the_context() -> None:
    """The inverse x(y, c) of y = x + g(x, c) is differentiated in the context too (implicit
    function theorem): dx/dc = -(I + J_x)^{-1} J_c, with J_x, J_c the autograd Jacobians of g at
    the solution. Float64, default tolerances (residual <= 1e-12), so 1e-9 is ample."""
    from pyro_iresnet import LipschitzMLP, ResidualBlock
    from pyro_iresnet.pyro import ConcatContextNet

    torch.manual_seed(0)
    net = ConcatContextNet(LipschitzMLP([2 + 3, 16, 2], coeff=0.9), context_dim=3).double()
    block = ResidualBlock(net, logdet="exact").eval()
    y = torch.randn(1, 2, dtype=torch.float64)
    c = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    x = block.inverse(y, c)
    w = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    (x * w).sum().backward()
    x0, c0 = x.detach()[0], c.detach()[0]
    jx = torch.autograd.functional.jacobian(lambda z: net(z[None], c0[None])[0], x0)
    jc = torch.autograd.functional.jacobian(lambda z: net(x0[None], z[None])[0], c0)
    expected = -(w[0] @ torch.linalg.solve(torch.eye(2, dtype=torch.float64) + jx, jc))
    assert c.grad is not None
    assert (c.grad[0] - expected).abs().max() < 1e-9


def test_a_non_finite_upstream_gradient_leaves_the_other_samples_adjoint_alone() -> None:
    """A batch-wide tolerance scale was NaN/Inf when one sample's upstream gradient was: every
    sample's adjoint then stopped after one iteration (dL/dy off by 1-3%)."""
    torch.manual_seed(0)
    net = make_active_mlp([3, 16, 16, 3], 0.95, torch.float64)
    block = ResidualBlock(net).eval()
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 3, dtype=torch.float64)
    (reference,) = torch.autograd.grad(block.inverse(y), y, upstream)
    upstream[0, 0] = float("nan")
    with pytest.warns(ConvergenceWarning, match="1 of 6 samples"):
        (grad,) = torch.autograd.grad(block.inverse(y), y, upstream)
    torch.testing.assert_close(grad[1:], reference[1:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "newton"])
def test_strict_non_convergence_still_records_its_diagnostics(method: str) -> None:
    block = ResidualBlock(make_active_mlp([2, 16, 2], 0.97, torch.float64), max_iter=2, strict=True,
                          inverse_method=method).eval()
    with pytest.raises(ConvergenceError) as raised:
        block.inverse(torch.randn(4, 2, dtype=torch.float64) * 3)
    info = block.last_diagnostics.inverse
    assert info is raised.value.info and not info.converged and info.iterations == 2


@pytest.mark.parametrize(("dtype", "raw_beta", "scale"), [(torch.float16, 5000.0, 30.0), (torch.bfloat16, -88.0, 3.0)],
                         ids=["float16-large-beta", "bfloat16-tiny-beta"])
def test_half_precision_solver_matches_the_module_for_extreme_lipswish_betas(dtype, raw_beta, scale) -> None:
    """The fused solver folded LipSwish's beta into the weights: in float16 beta z overflowed for a
    large beta (samples reported diverged), in bfloat16 beta W underflowed to subnormals for a tiny
    one (g off by 0.2, a returned point 3x over the tolerance, reported converged)."""
    import copy

    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import solver_net

    torch.manual_seed(0)
    net = LipschitzMLP([3, 16, 16, 3], coeff=0.9)
    with torch.no_grad():
        for activation in net.layers[1::2]:
            activation.raw_beta.fill_(raw_beta)
    net = net.to(dtype).eval()
    reference = copy.deepcopy(net).double()
    y = (scale * torch.randn(64, 3)).to(dtype)
    with torch.no_grad():
        solver_error = (solver_net(fused_mlp(net))(y).double() - reference(y.double())).abs().max()
        module_error = (net(y).double() - reference(y.double())).abs().max()
        assert solver_error <= 2 * module_error + 1e-3
        for method in ("fixed_point", "newton"):
            block = ResidualBlock(net, inverse_method=method).eval()
            x = block.inverse(y)  # a ConvergenceWarning would fail the test
            residual = (x.double() + reference(x.double()) - y.double()).abs().amax(1)
            assert bool((residual <= 1e-2 + 1e-2 * y.double().abs().amax(1)).all())


@pytest.mark.parametrize(
    "y, context, error, match",
    [
        (torch.randn(3), None, ValueError, r"y must have shape \(N, \*event\), got \(3,\)"),
        (torch.ones(4, 3, dtype=torch.long), None, TypeError, "y must have a floating dtype, got torch.int64"),
        (torch.ones(4, 3, dtype=torch.bool), None, TypeError, "y must have a floating dtype, got torch.bool"),
        (torch.randn(4, 3), torch.randn(2, 3), ValueError, r"context must have one row per sample of y \(4\)"),
    ],
    ids=["1-d", "int", "bool", "context-rows"],
)
def test_fixed_point_inverse_checks_its_inputs(y, context, error: type, match: str) -> None:
    g = (lambda x: 0.5 * torch.tanh(x)) if context is None else (lambda x, c: 0.5 * torch.tanh(x + c))
    with pytest.raises(error, match=match):
        fixed_point_inverse(g, y, context=context)


@pytest.mark.parametrize(
    "y, error, match",
    [
        (torch.randn(4, 3), ValueError, r"y must have shape \(N, 2\) for this net, got \(4, 3\)"),
        (torch.randn(2, 4, 2), ValueError, r"y must have shape \(N, 2\) for this net, got \(2, 4, 2\)"),
        (torch.randn(4, 2, dtype=torch.float64), TypeError, "y has dtype torch.float64 but the net's weights"),
    ],
    ids=["size", "3-d", "dtype"],
)
def test_newton_solvers_check_their_inputs(y, error: type, match: str) -> None:
    from pyro_iresnet.fused import fused_mlp
    from pyro_iresnet.fused_inverse import newton_inverse, newton_inverse_and_logdet, solver_net

    mlp = fused_mlp(LipschitzMLP([2, 8, 2]).eval())
    with pytest.raises(error, match=match):
        newton_inverse(mlp, y)
    with pytest.raises(error, match=match), torch.no_grad():
        newton_inverse_and_logdet(solver_net(mlp), y)


@pytest.mark.parametrize("dtype", [torch.int64, "float32", torch.complex64])
def test_default_tolerances_refuse_what_is_not_a_real_floating_dtype(dtype) -> None:
    from pyro_iresnet.inverse import default_tolerances

    with pytest.raises(TypeError, match="dtype must be a real floating torch.dtype"):
        default_tolerances(dtype)
