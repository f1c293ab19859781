"""ResidualBlock: shapes, state, input validation, diagnostics (registry of block factories)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pyro_iresnet import LipschitzMLP, ResidualBlock, SpectralNormLinear
from pyro_iresnet.pyro import ConcatContextNet
from tests.conftest import activate, make_active_mlp

DTYPE = torch.float64

FACTORIES = {
    "exact": lambda: ResidualBlock(make_active_mlp([3, 16, 3], 0.9), logdet="exact"),
    "series-generic": lambda: ResidualBlock(make_active_mlp([3, 16, 3], 0.9), logdet="series", fused=False),
    "unbiased-poisson": lambda: ResidualBlock(make_active_mlp([3, 16, 3], 0.9), roulette="poisson"),
    "unbiased-memory-efficient": lambda: ResidualBlock(make_active_mlp([3, 16, 3], 0.9), memory_efficient=True),
    "elu-anderson": lambda: ResidualBlock(make_active_mlp([3, 16, 3], 0.9, activation="elu"),
                                          inverse_method="anderson"),
}


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def block(request: pytest.FixtureRequest) -> ResidualBlock:
    return FACTORIES[request.param]()


@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)])
def test_shapes_and_round_trip(block: ResidualBlock, batch_shape: tuple[int, ...]) -> None:
    x = torch.randn(*batch_shape, 3, dtype=DTYPE)
    y, logdet = block.forward_and_logdet(x)
    assert y.shape == x.shape and logdet.shape == batch_shape
    assert torch.allclose(block(x), y)
    assert (block.inverse(y) - x).abs().max() <= 1e-10
    x_back, logdet_back = block.inverse_and_logdet(y)
    assert x_back.shape == x.shape and logdet_back.shape == batch_shape


def test_gradients_reach_every_parameter(block: ResidualBlock) -> None:
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    y, logdet = block.forward_and_logdet(x)
    (y.pow(2).sum() + logdet.sum() + block.inverse(y.detach()).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, param in block.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_input_is_not_mutated(block: ResidualBlock) -> None:
    x = torch.randn(4, 3, dtype=DTYPE)
    copy = x.clone()
    block.forward_and_logdet(x)
    block.inverse(x)
    assert torch.equal(x, copy) and not x.requires_grad


def test_state_dict_into_fresh_block_reproduces_outputs() -> None:
    block = ResidualBlock(make_active_mlp([3, 16, 16, 3], 0.9), logdet="exact")
    optimizer = torch.optim.Adam(block.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        block.logdet(torch.randn(8, 3, dtype=DTYPE)).sum().backward()
        optimizer.step()
    fresh = ResidualBlock(LipschitzMLP([3, 16, 16, 3], coeff=0.9).to(DTYPE), logdet="exact")
    fresh.load_state_dict(block.state_dict())  # no dummy forward
    x = torch.randn(6, 3, dtype=DTYPE)
    for mode in ("eval", "train"):
        getattr(block, mode)(), getattr(fresh, mode)()
        expected, got = block.forward_and_logdet(x), fresh.forward_and_logdet(x)
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
        assert torch.equal(block.inverse(x), fresh.inverse(x))


def test_train_and_eval_agree_in_exact_mode() -> None:
    block = ResidualBlock(make_active_mlp([3, 16, 3], 0.9), logdet="exact")
    x = torch.randn(5, 3, dtype=DTYPE)
    block.train().forward_and_logdet(x)  # refresh once after the weight change
    train = block.forward_and_logdet(x)
    evaluated = block.eval().forward_and_logdet(x)
    assert torch.equal(train[0], evaluated[0]) and torch.allclose(train[1], evaluated[1], atol=1e-12)


def test_diagnostics() -> None:
    block = ResidualBlock(make_active_mlp([3, 16, 3], 0.9), logdet="series", n_terms=7)
    block.forward_and_logdet(torch.randn(2, 3, dtype=DTYPE))
    assert block.last_diagnostics.logdet_method == "series" and block.last_diagnostics.n_terms == 7
    block.inverse(torch.randn(2, 3, dtype=DTYPE))
    info = block.last_diagnostics.inverse
    assert info.converged and info.iterations > 1 and info.residual.shape == (2,)


def test_context_broadcasts_and_round_trips() -> None:
    net = ConcatContextNet(make_active_mlp([5, 16, 3], 0.9), context_dim=2)
    block = ResidualBlock(net, logdet="exact")
    x, context = torch.randn(4, 1, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE, requires_grad=True)
    y, logdet = block.forward_and_logdet(x, context)
    assert y.shape == (4, 6, 3) and logdet.shape == (4, 6)
    x_back = block.inverse(y, context)
    assert (x_back - x).abs().max() <= 1e-10
    x_back.sum().backward()
    assert context.grad is not None and torch.isfinite(context.grad).all()
    with pytest.raises(ValueError, match=r"is conditional \(its net has context_dim=2\): pass a context"):
        block.forward_and_logdet(x)


def test_block_pickled_before_the_context_check_takes_a_context() -> None:
    """A block pickled by an older version has no ``_net_takes_context`` (or, older still, no
    ``context_dim`` / ``event_shape``) in its state; unpickling (``__new__`` then ``__setstate__``)
    must fill them in, so the block takes a context (it used to fail with an AttributeError on the
    first such call) or refuses one with the usual message."""
    import pickle

    block = ResidualBlock(ConcatContextNet(make_active_mlp([5, 16, 3], 0.9), context_dim=2), logdet="exact").eval()
    state = block.__getstate__()
    del state["_net_takes_context"]
    old = ResidualBlock.__new__(ResidualBlock)
    old.__setstate__(state)
    x, context = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    torch.testing.assert_close(old(x, context), block(x, context), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(old))(x, context), block(x, context), rtol=0, atol=0)
    plain = ResidualBlock(make_active_mlp([3, 8, 3], 0.9))
    state = plain.__getstate__()
    for name in ("_net_takes_context", "context_dim", "event_shape"):  # older still: none of the three
        del state[name]
    old_plain = ResidualBlock.__new__(ResidualBlock)
    old_plain.__setstate__(state)
    with pytest.raises(ValueError, match="got a context, but its net"):
        old_plain(x, context)


@pytest.mark.parametrize(
    "make_input, error, match",
    [
        (lambda: torch.randn(4, 2, dtype=DTYPE), ValueError,
         r"x \(input .*\) must have shape \(\.\.\., 3\), got \(4, 2\)"),
        (lambda: torch.randn(4, 3), TypeError,
         r"x \(input .*\) has dtype torch.float32 but the block's parameters are"),
        (lambda: torch.ones(4, 3, dtype=torch.int64), TypeError, r"x \(input .*\) must have a floating dtype"),
        (lambda: torch.tensor([[0.0, float("nan"), 1.0]], dtype=DTYPE), ValueError,
         r"x \(input .*\) must be finite, got 1 NaN and 0 Inf"),
        (lambda: [[0.0, 1.0, 2.0]], TypeError, r"x \(input .*\) must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_input, error: type, match: str) -> None:
    block = ResidualBlock(make_active_mlp([3, 16, 3], 0.9))
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(error, match=match):
        block.forward_and_logdet(make_input())
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())  # state untouched


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logdet="hutchinson"), "logdet must be one of"),
        (dict(n_terms=0), "n_terms must be >= 1, got 0"),
        (dict(p=1.5), r"p must be in \(0, 1\).*, got 1.5"),
        (dict(lam=-1.0), "lam must be a finite float > 0, got -1.0"),
        (dict(lam=float("inf")), "lam must be a finite float > 0, got inf"),
        (dict(probe="uniform"), "probe must be one of"),
        (dict(eval_logdet="fast"), "eval_logdet must be one of"),
        (dict(inverse_method="broyden"), "inverse_method must be one of"),
        (dict(atol=-1.0), "atol must be >= 0, got -1.0"),
        (dict(max_iter=0), "max_iter must be >= 1, got 0"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResidualBlock(make_active_mlp([3, 16, 3], 0.9), **kwargs)


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("p", 1.0, ValueError, r"p must be in \(0, 1\)"),
        ("n_terms", 0, ValueError, "n_terms must be >= 1, got 0"),
        ("atol", float("nan"), ValueError, "atol must be >= 0, got nan"),
        ("strict", "False", TypeError, "strict must be True or False"),
        ("logdet_method", "hutchinson", ValueError, "logdet_method must be one of"),
        ("fused", 1, TypeError, "fused must be True, False or 'auto'"),
        ("exact_trace", True, ValueError, "fused=True does not cover exact_trace=True"),
        ("inverse_method", "newton", ValueError, "inverse_method='newton' needs the fused path"),
    ],
)
def test_options_reassigned_later_are_checked(name: str, value: object, error: type, match: str) -> None:
    """``block.p = 1.0`` would silently make the unbiased estimator a fixed truncation; a rejected
    reassignment leaves the block as it was."""
    block = ResidualBlock(LipschitzMLP([2, 8, 2]), fused=True)
    if name == "inverse_method":
        block.fused = False  # checked too: newton needs the fused path
    before = dict(vars(block))
    with pytest.raises(error, match=match):
        setattr(block, name, value)
    assert {key: vars(block)[key] for key in before} == before
    block.atol, block.p = 1e-8, 0.25  # valid reassignments take
    assert (block.atol, block.p) == (1e-8, 0.25)


def test_net_must_be_module() -> None:
    with pytest.raises(TypeError, match="net must be an nn.Module, got function"):
        ResidualBlock(lambda x: 0.5 * x)


@pytest.mark.parametrize("option", ["exact_trace", "neumann_grad", "memory_efficient", "strict", "check_finite"])
def test_switches_take_only_booleans(option: str) -> None:
    """A string such as "False" (from a config file) would otherwise switch the option on."""
    with pytest.raises(TypeError, match=f"{option} must be True or False, got 'False'"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), **{option: "False"})


@pytest.mark.parametrize("fused", [0, 1])
def test_fused_takes_only_true_false_or_auto(fused: object) -> None:
    """``fused`` is checked by identity later, so 0 or 1 would silently mean "auto"."""
    with pytest.raises(TypeError, match="fused must be True, False or 'auto'"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), fused=fused)


def test_newton_inverse_with_exact_trace() -> None:
    """``exact_trace`` concerns the log-det; the Newton inverse still runs on the fused parameters."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2]), inverse_method="newton", exact_trace=True).double()
    y = torch.randn(5, 2, dtype=torch.float64)
    x = block.inverse(y)
    torch.testing.assert_close(block(x), y, atol=1e-10, rtol=0)


def test_geometric_roulette_refuses_p_one() -> None:
    """p = 1 always draws N = 1: the "unbiased" estimate would silently be a fixed truncation of
    n_exact_terms + 1 terms (its mean off the exact log-det by many standard errors)."""
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\) \(p = 1 always stops the roulette"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), p=1.0, n_exact_terms=2)


@pytest.mark.parametrize("options", [dict(fused=False, memory_efficient=True), dict(inverse_method="anderson")],
                         ids=["memory-efficient-backward", "anderson-inverse"])
def test_empty_batch_through_every_path(options: dict) -> None:
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2]), **options)
    x = torch.zeros(0, 2, requires_grad=True)
    y, logdet = block.forward_and_logdet(x)
    (y.sum() + logdet.sum()).backward()
    assert x.grad.shape == (0, 2) and block.inverse(y.detach()).shape == (0, 2)


def test_context_reaches_nets_that_take_it_through_a_pre_hook_or_a_decorator() -> None:
    """A net whose forward takes one input can still take a context: through a forward pre-hook
    that joins (x, context), or a decorator whose wrapper takes both. Neither is refused."""
    import functools

    def concat_inputs(fn):
        @functools.wraps(fn)
        def wrapper(self, x, context):
            return fn(self, torch.cat([x, context], -1))
        return wrapper

    class Decorated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2).double()

        @concat_inputs
        def forward(self, xc: torch.Tensor) -> torch.Tensor:
            return 0.1 * torch.tanh(self.linear(xc))

    hooked = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    hooked.register_forward_pre_hook(lambda module, args: (0.1 * torch.cat(args, -1),))
    x, context = torch.randn(5, 2, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    for net in (hooked, Decorated()):
        block = ResidualBlock(net, logdet="exact")
        y = block(x, context)
        torch.testing.assert_close(block.inverse(y, context), x, rtol=0, atol=1e-10)


def test_eval_logdet_auto_is_exact_up_to_and_including_exact_max_dim() -> None:
    block = ResidualBlock(LipschitzMLP([3, 8, 3]), exact_max_dim=3).eval()
    block.forward_and_logdet(torch.randn(4, 3))
    assert block.last_diagnostics.logdet_method == "exact"


def _linear_block(d: int, diagonal: bool = False, **options) -> tuple[ResidualBlock, torch.Tensor]:
    """A block whose g is linear, g(x) = A x with ||A||_2 = 0.5 (J_g = A everywhere)."""
    lin = nn.Linear(d, d, bias=False).to(DTYPE)
    with torch.no_grad():
        a = torch.diag(torch.linspace(-0.5, 0.5, d, dtype=DTYPE)) if diagonal else torch.randn(d, d, dtype=DTYPE)
        a = 0.5 * a / torch.linalg.matrix_norm(a, ord=2)
        lin.weight.copy_(a)
    return ResidualBlock(lin, fused=False, **options), a


@pytest.mark.parametrize("forced", ["series", "unbiased"])
def test_eval_logdet_forces_its_estimator_in_eval(forced: str) -> None:
    """With logdet="exact" and eval_logdet=forced, eval() must run the forced estimator."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9).double(), logdet="exact", eval_logdet=forced,
                          n_terms=3).eval()
    block.forward_and_logdet(torch.randn(4, 2, dtype=DTYPE))
    assert block.last_diagnostics.logdet_method == forced
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9).double(), logdet="series", eval_logdet="exact").eval()
    block.forward_and_logdet(torch.randn(4, 2, dtype=DTYPE))
    assert block.last_diagnostics.logdet_method == "exact"


def test_poisson_roulette_uses_lam() -> None:
    """A Poisson roulette with the wrong rate would stay unbiased, so only the number of terms shows
    it. With lam=30 the draw N has P(N <= 10) < 1e-4, so n_terms = n_exact_terms + N > 12 in all 20
    calls (a rate p=0.5 gives N <= 5 with probability > 0.9999 each time)."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9).double(), roulette="poisson", lam=30.0, p=0.5,
                          n_exact_terms=2)
    x = torch.randn(3, 2, dtype=DTYPE)
    terms = []
    for _ in range(20):
        block.forward_and_logdet(x)
        terms.append(block.last_diagnostics.n_terms)
    assert min(terms) > 12, terms


def test_n_probes_averages_that_many_probes() -> None:
    """With linear g(x) = A x and the one-term series, each sample's estimate is the mean of k
    quadratic forms v^T A v, whose variance is 2 ||sym(A)||_F^2 / k for Gaussian probes. Over N =
    4000 samples the empirical variance is within 15 % of that (relative s.e. ~ sqrt(2/N) * (1 +
    excess kurtosis) < 5 %); one probe gives k = 8 times more."""
    torch.manual_seed(0)
    k = 8
    block, a = _linear_block(4, logdet="series", n_terms=1, n_probes=k)
    x = torch.randn(4000, 4, dtype=DTYPE)
    with torch.no_grad():
        _, est = block.forward_and_logdet(x)
    sym = 0.5 * (a + a.T)
    expected_var = 2 * float((sym**2).sum()) / k
    assert abs(float(est.mean()) - float(torch.trace(a))) < 5 * math.sqrt(expected_var / 4000)
    assert 0.85 < float(est.var()) / expected_var < 1.15


def test_rademacher_probe_is_used() -> None:
    """For a diagonal A, v^T A v = tr(A) exactly for every Rademacher v, so the one-term series is
    exactly tr(A) in every sample (to rounding); Gaussian probes scatter it with variance 2
    ||A||_F^2 ~ 0.3."""
    torch.manual_seed(0)
    block, a = _linear_block(5, diagonal=True, logdet="series", n_terms=1, probe="rademacher")
    with torch.no_grad():
        _, est = block.forward_and_logdet(torch.randn(50, 5, dtype=DTYPE))
    torch.testing.assert_close(est, torch.full_like(est, float(torch.trace(a))), rtol=0, atol=1e-12)


def test_memory_efficient_refuses_a_context_that_requires_grad() -> None:
    """On the generic path the backward-in-forward estimator cannot propagate to the context: the
    documented ValueError, not silently dropped context gradients (the fused path, which gives them
    exactly, is tested in test_fused.py)."""
    from pyro_iresnet.pyro import ConcatContextNet

    torch.manual_seed(0)
    net = ConcatContextNet(LipschitzMLP([2 + 3, 8, 2], coeff=0.9), context_dim=3).double()
    block = ResidualBlock(net, logdet="series", memory_efficient=True, fused=False)
    x = torch.randn(4, 2, dtype=DTYPE)
    context = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="memory_efficient=True does not propagate gradients to a context"):
        block.forward_and_logdet(x, context)
    block.forward_and_logdet(x, context.detach())  # fine without a context gradient


def test_memory_efficient_second_backward_raises_a_clear_error() -> None:
    """The memory-saving backward frees what it kept in its first call: a second backward (with
    retain_graph=True the first time) used to fail with an unrelated TypeError."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([3, 8, 3]), fused=False, memory_efficient=True, logdet="series")
    x = torch.randn(4, 3, requires_grad=True)
    y, logdet = block.forward_and_logdet(x)
    loss = logdet.mean() + y.pow(2).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time.*use memory_efficient=False"):
        loss.backward()


@pytest.mark.parametrize("fused", [True, False])
def test_logdet_gradient_reaches_the_input_with_frozen_parameters(fused: bool) -> None:
    """With every parameter frozen (e.g. a pretrained flow, gradients wanted for the input only) the
    log-det lost its graph. Reference: d/dx of slogdet(I + J_g(x)) by double autograd."""
    torch.manual_seed(0)
    net = activate(LipschitzMLP([2, 8, 2], coeff=0.9).double())
    net.requires_grad_(False)
    block = ResidualBlock(net, logdet="exact", fused=fused)
    x = torch.randn(5, 2, dtype=DTYPE, requires_grad=True)
    _, logdet = block.forward_and_logdet(x)
    (grad,) = torch.autograd.grad(logdet.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: v + block.g(v[None])[0]))(x_ref)
    (grad_ref,) = torch.autograd.grad(torch.linalg.slogdet(jac)[1].sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-11)
    assert grad_ref.abs().max() > 1e-4


def test_newton_sampling_keeps_the_configured_estimator() -> None:
    """With inverse_method="newton" in training mode and logdet="series", an inverse_and_logdet
    under no_grad must still use the series estimator (the value-only path is documented for an
    exact log-det only), so diagnostics say "series" with n_terms terms."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9).double(), logdet="series", n_terms=3,
                          inverse_method="newton")
    y = torch.randn(4, 2, dtype=DTYPE)
    with torch.no_grad():
        x, _ = block.inverse_and_logdet(y)
    assert block.last_diagnostics.logdet_method == "series"
    assert block.last_diagnostics.n_terms == 3
    assert block.last_diagnostics.inverse is not None and block.last_diagnostics.inverse.converged


def test_plain_forward_runs_power_iteration_in_training() -> None:
    """The class docstring says the power iteration runs at the start of every training-mode call,
    forward included. After an in-place weight change, block(x) must apply the same operator as
    forward_and_logdet(x) (which refreshes), and the buffers must have moved."""
    torch.manual_seed(0)
    block = ResidualBlock(activate(LipschitzMLP([2, 8, 2], coeff=0.9).double()), logdet="exact")
    with torch.no_grad():
        for layer in block.net.modules():
            if isinstance(layer, SpectralNormLinear):
                layer.weight.add_(0.5 * torch.randn_like(layer.weight))
    other = copy.deepcopy(block)
    x = torch.randn(5, 2, dtype=DTYPE)
    u_before = [m.u.clone() for m in block.net.modules() if isinstance(m, SpectralNormLinear)]
    y_forward = block(x)
    y_reference, _ = other.forward_and_logdet(x)
    torch.testing.assert_close(y_forward, y_reference, rtol=1e-13, atol=1e-13)
    u_after = [m.u for m in block.net.modules() if isinstance(m, SpectralNormLinear)]
    assert any(not torch.equal(a, b) for a, b in zip(u_before, u_after))


class _PositionalOnlyContextNet(torch.nn.Module):
    """g(x, c) = 0.5 tanh(W [x, c]) with a positional-only forward(x, context, /)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 2, dtype=DTYPE)
        with torch.no_grad():
            self.linear.weight.mul_(0.5 / torch.linalg.matrix_norm(self.linear.weight, 2))

    def forward(self, x: torch.Tensor, context: torch.Tensor, /) -> torch.Tensor:
        return 0.5 * torch.tanh(self.linear(torch.cat([x, context], dim=-1)))


def test_a_net_with_a_positional_only_context_argument_gets_the_context() -> None:
    """A net whose forward takes (x, context, /) positionally is recognised as conditional: the block
    computes y = x + g(x, c), with the exact log-det log|det(I + J_g)| from autograd."""
    from pyro_iresnet import ResidualBlock

    torch.manual_seed(0)
    net = _PositionalOnlyContextNet()
    block = ResidualBlock(net, logdet="exact")
    x, c = torch.randn(4, 2, dtype=DTYPE), torch.randn(4, 3, dtype=DTYPE)
    y, logdet = block.forward_and_logdet(x, c)
    assert torch.allclose(y, x + net(x, c), atol=1e-14, rtol=0)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda z, ci=c[i]: z + net(z, ci), x[i])
        assert math.isclose(float(logdet[i].detach()), float(torch.linalg.slogdet(jac)[1]), abs_tol=1e-12)


def test_torch_func_grad_and_vmap_on_the_generic_explicit_direction() -> None:
    """docs/troubleshooting.md: ``torch.func.grad`` works on the generic path, and ``vmap(grad)``
    too with ``check_finite=False``; both equal plain autograd."""
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9), logdet="exact", fused=False, check_finite=False).eval()

    def log_density(x: torch.Tensor) -> torch.Tensor:
        y, logdet = block.forward_and_logdet(x[None])
        return -0.5 * y.pow(2).sum() + logdet.sum()

    x = torch.randn(3, 2)
    x_leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sum(log_density(row) for row in x_leaf), x_leaf)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(log_density))(x), expected)
    torch.testing.assert_close(torch.func.grad(log_density)(x[0]), expected[0])


def test_torch_func_grad_through_the_generic_neumann_gradient() -> None:
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9), logdet="unbiased", fused=False).train()

    def log_density(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)  # the same roulette draw and probes in both calls
        y, logdet = block.forward_and_logdet(x)
        return (-0.5 * y.pow(2).sum(-1) + logdet).sum()

    x = torch.randn(3, 2)
    x_leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(log_density(x_leaf), x_leaf)
    torch.testing.assert_close(torch.func.grad(log_density)(x), expected)


def test_torch_func_jacrev_through_the_generic_neumann_gradient() -> None:
    """``jacrev`` batches the Neumann path's identity Functions (their vmap rule is generated)."""
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9), logdet="unbiased", fused=False,
                          check_finite=False).train()

    def log_density(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)
        y, logdet = block.forward_and_logdet(x)
        return -0.5 * y.pow(2).sum(-1) + logdet

    x = torch.randn(3, 2)
    x_leaf = x.clone().requires_grad_(True)
    expected = torch.stack([torch.autograd.grad(log_density(x_leaf)[n], x_leaf)[0] for n in range(3)])
    torch.testing.assert_close(torch.func.jacrev(log_density)(x), expected)


@pytest.mark.parametrize("fused", ["auto", False])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_eval_call_between_forward_and_backward_leaves_the_gradient_unchanged(fused, memory_efficient) -> None:
    """An eval() call (which settles the power iteration) between a forward pass and its backward
    pass: the adjoint of the inverse and the memory-saving re-run evaluate g at backward time, and
    used the new buffers (a gradient off by up to 14%, silently). They now use the forward's."""
    torch.manual_seed(0)
    net = LipschitzMLP([3, 16, 16, 3], coeff=0.9, n_power_iterations=1).double()
    with torch.no_grad():
        for layer in net.layers[0::2]:
            layer.weight.mul_(3)  # far from the power iteration's converged u, v
    y0 = torch.randn(5, 3, dtype=DTYPE)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.1], dtype=DTYPE)

    def gradients(eval_between: bool) -> list[torch.Tensor]:
        block = ResidualBlock(copy.deepcopy(net), fused=fused, memory_efficient=memory_efficient, logdet="series")
        y = y0.clone().requires_grad_()
        torch.manual_seed(1)
        x = block.inverse(y)
        _, logdet = block.forward_and_logdet(x)
        loss = (x**3).sum() + (weights * logdet).sum()
        if eval_between:
            with torch.no_grad():
                block.eval().inverse(y0)
        return torch.autograd.grad(loss, [y, *block.net.parameters()])

    for a, b in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_parameter_changed_between_forward_and_backward_raises() -> None:
    """A parameter modified in place (an optimiser step) before the backward: the inverse and the
    memory-saving estimator evaluate g again at backward time, so they save the parameters and
    autograd refuses it (the memory-saving estimator did not save them and used the new values)."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9).double())
    y = torch.randn(4, 2, dtype=DTYPE, requires_grad=True)
    x = block.inverse(y)
    with torch.no_grad():
        block.net.layers[0].bias.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.sum().backward()
    block = ResidualBlock(LipschitzMLP([2, 8, 2], coeff=0.9).double(), fused=False, memory_efficient=True)
    _, logdet = block.forward_and_logdet(torch.randn(4, 2, dtype=DTYPE))
    with torch.no_grad():
        block.net.layers[0].bias.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logdet * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)).sum().backward()


def test_memory_efficient_first_derivative_under_create_graph_for_a_nonlinear_loss() -> None:
    """With create_graph=True and unequal per-sample upstream weights (a loss nonlinear in the
    log-dets), the memory-saving backward re-entered itself through the upstream gradient's graph
    and crashed ("backward through the graph a second time"). The first derivative now equals the
    plain path's; a second derivative raises the documented error."""
    torch.manual_seed(1)
    net = LipschitzMLP([3, 8, 3], coeff=0.9).double()
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    grads = []
    for memory_efficient in (True, False):
        block = ResidualBlock(net, logdet="series", fused=False, memory_efficient=memory_efficient)
        torch.manual_seed(2)
        _, logdet = block.forward_and_logdet(x)
        inputs = [x, *net.parameters()]
        grads.append(torch.autograd.grad((logdet**2).sum(), inputs, create_graph=True, allow_unused=True))
    for a, b, t in zip(*grads, inputs):
        a, b = (torch.zeros_like(t) if g is None else g.detach() for g in (a, b))  # an unused bias: None or 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        grads[0][1].sum().backward()


@pytest.mark.parametrize("model", [None, 3, "flow"])
def test_name_blocks_refuses_what_holds_no_blocks_by_type(model: object) -> None:
    from pyro_iresnet import name_blocks

    with pytest.raises(TypeError, match="model: expected an nn.Module, a transform"):
        name_blocks(model)


@pytest.mark.parametrize("items, where", [([42], "the item at 0"), ((nn.Identity(), [None]), "the item at 1.0")])
def test_name_blocks_refuses_an_item_that_holds_no_blocks_by_type(items: object, where: str) -> None:
    from pyro_iresnet import name_blocks

    with pytest.raises(TypeError, match=f"{where}: expected an nn.Module.*got"):
        name_blocks(items)


def test_a_lipschitz_mlp_with_layers_edited_by_hand_is_not_size_checked() -> None:
    """Its sizes cannot be read from a last layer that is not linear: the block takes the net as it
    is (on the generic path) instead of failing with an AttributeError."""
    torch.manual_seed(0)
    net = LipschitzMLP([2, 8, 2], coeff=0.9)
    net.layers.append(nn.Identity())
    block = ResidualBlock(net, logdet="exact")
    x = torch.randn(4, 2)
    y, logdet = block.forward_and_logdet(x)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: v + net(v)))(x)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-5, rtol=0)


def test_name_blocks_walks_a_conditional_transformed_distribution() -> None:
    import pyro.distributions as dist

    from pyro_iresnet import conditional_iresnet, iresnet, name_blocks

    blocks = [conditional_iresnet(2, 3) for _ in range(2)]
    # a plain transform in a conditional flow is wrapped in a ConstantConditionalTransform
    transforms = [blocks[0], dist.transforms.Permute(torch.tensor([1, 0])), iresnet(2), blocks[1]]
    flow = dist.ConditionalTransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), transforms)
    assert name_blocks(flow, prefix="flow") == [
        "0 of 3 (flow.transforms.0.block)",
        "1 of 3 (flow.transforms.2.transform.block)",
        "2 of 3 (flow.transforms.3.block)",
    ]
