"""normflows adapter: issue 4's six defects of ``normflows.flows.Residual`` (each check passes on
ours and is shown to fail on theirs), mixing with normflows layers, normflows' own ``FlowTest``,
power-iteration upkeep of normflows' nets (weight tying included), ``lipschitz_bound`` rules,
normflows checkpoints and argument types."""

from __future__ import annotations

import copy
import math
import warnings

import normflows as nf
import numpy as np
import pytest
import torch
from normflows.flows.flow_test import FlowTest
from sklearn.datasets import make_moons
from torch import nn

from pyro_iresnet import ConvergenceError, ConvergenceWarning, LipschitzCNN, LipschitzMLP, lipschitz_bound
from pyro_iresnet.normflows import Residual

from .conftest import make_active_mlp

TheirResidual = nf.flows.Residual
LAYERS = {"ours": Residual, "normflows": TheirResidual}


def exact_logdet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: per-sample autograd Jacobian of x + g(x) and slogdet."""
    rows = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: v + net(v[None])[0], xi)
        rows.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(rows)


def count_graph_nodes(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def strong_contraction() -> nn.Module:
    """g = W tanh(x) with eigenvalues of W near -0.55: large log-dets (about -1.2), and Lip(g) small
    enough (< 0.7) for the geometric roulette at p = 0.5 to have finite variance."""
    linear = nn.Linear(2, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-0.6, 0.15], [-0.1, -0.5]]))
    return nn.Sequential(nn.Tanh(), linear)


def generic_contraction() -> nn.Module:
    """Linear(2, 16) -> Tanh -> Linear(16, 2), each weight rescaled to spectral norm 0.8."""
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        for linear in (net[0], net[2]):
            linear.weight.mul_(0.8 / torch.linalg.matrix_norm(linear.weight, ord=2))
    return net


# -- the checks, each a function of a layer class ---------------------------------------------
def check_logdet_is_unbiased(cls: type) -> None:
    """(1) reduce_memory=True: the returned log_det's mean over draws is within 3 s.e. of exact."""
    net = strong_contraction()
    layer = cls(net, reduce_memory=True).double().train()
    x = 0.5 * torch.randn(4, 2, dtype=torch.float64)
    layer.inverse(x)  # power iteration refreshed once; then the operator stays put
    reference = exact_logdet(net, x)
    draws = torch.stack([layer.inverse(x.repeat(16, 1))[1].detach().view(16, 4).mean(0) for _ in range(150)])
    z = (draws.mean(0) - reference) / (draws.std(0) / math.sqrt(len(draws)))
    assert z.abs().max() < 3, (draws.mean(0), reference)


def check_weighted_gradient(cls: type) -> None:
    """(2) memory-efficient gradient of a per-sample weighted loss equals the plain autograd path
    with the same draws (x and parameters)."""
    net = generic_contraction()  # a plain torch net: the core's generic backward-in-forward path
    layer = cls(net, reduce_memory=True).double().train()
    plain = copy.deepcopy(layer)
    if isinstance(plain, Residual):
        plain.block.memory_efficient = False
    else:
        plain.iresblock.grad_in_forward = False
    weights = torch.tensor([0.3, -2.0, 1.0, 4.0, 0.0, 1.5], dtype=torch.float64)
    x0 = torch.randn(6, 2, dtype=torch.float64)
    grads = []
    for model in (layer, plain):
        torch.manual_seed(1)
        np.random.seed(1)
        x = x0.clone().requires_grad_()
        _, logdet = model.inverse(x)
        params = list(model.parameters())
        grads.append(torch.autograd.grad((weights * logdet).sum(), [x, *params], allow_unused=True))
    tensors = [x0, *layer.parameters()]
    for a, b, t in zip(*grads, tensors):  # None: the log-det does not depend on t (the last bias)
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def check_inverse_reaches_tolerance(cls: type) -> None:
    """(3a) the fixed point lands within 1e-6 of the true inverse (residual of x + g(x) = y)."""
    net = make_active_mlp([2, 32, 2], coeff=0.985)  # Lip <= 0.97: slow contraction
    layer = cls(net).double().eval()
    y = 3 * torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad():
        x, _ = layer(y)
        residual = (x + net(x) - y).abs().max()
    assert residual <= 1e-6, float(residual)


def check_inverse_reaches_float32_tolerance(cls: type) -> None:
    """(3a, float32) every sample's residual is within the float32 default 1e-6 (1 + |y|_inf), up to
    10% for the rounding difference between the solver's g (constants folded into the weights) and
    the module's forward used here (about 1e-7 relative)."""
    net = make_active_mlp([2, 32, 2], coeff=0.985, dtype=torch.float32)
    layer = cls(net).eval()
    y = 3 * torch.randn(64, 2)
    with torch.no_grad():
        x, _ = layer(y)
        residual = (x + net(x) - y).abs().amax(1)
    tolerance = 1.1e-6 * (1 + y.abs().amax(1))
    assert bool((residual <= tolerance).all()), float((residual / tolerance).max())


def check_warns_when_not_converged(cls: type) -> None:
    """(3b) a solve that cannot converge is never silent."""
    net = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(-torch.eye(2))  # Lip(g) = 1 and x + g(x) = 0: no solution for y != 0
    layer = cls(net).double().eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            layer(torch.randn(4, 2, dtype=torch.float64))
        except FloatingPointError:  # then the log-det, log|det(I + J_g)| = log 0, is refused too
            pass
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)


def check_reproducible_under_torch_seed(cls: type) -> None:
    """(4) torch.manual_seed alone fixes the estimates, whatever numpy's RNG state."""
    net = make_active_mlp([2, 16, 2], coeff=0.8)
    layer = cls(net, reduce_memory=False).double().train()
    x = torch.randn(8, 2, dtype=torch.float64)
    runs = []
    for numpy_seed in (1, 2):
        np.random.seed(numpy_seed)
        np.random.random(numpy_seed)
        torch.manual_seed(0)
        runs.append(torch.stack([layer.inverse(x)[1].detach() for _ in range(6)]))
    assert torch.equal(runs[0], runs[1])


def check_no_estimator_parameters(cls: type) -> None:
    """(5) geom_p and lamb are not trainable parameters."""
    net = LipschitzMLP([2, 8, 2], coeff=0.9)
    layer = cls(net)
    names = [name for name, _ in layer.named_parameters()]
    assert not any("geom_p" in name or "lamb" in name for name in names), names
    assert len(names) == len(list(net.parameters()))


def check_sampling_records_no_iterations(cls: type) -> None:
    """(6a) sampling in training mode keeps the fixed-point iterations out of the graph."""
    net = make_active_mlp([2, 32, 2], coeff=0.95, dtype=torch.float32)
    layer = cls(net).train()
    x, _ = layer(3 * torch.randn(16, 2))
    assert count_graph_nodes(x) < 20, count_graph_nodes(x)  # the solve, a reshape, the parameters


def check_reverse_kld_without_score(cls: type) -> None:
    """(6b) reverse_kld(score_fn=False) runs (its density pass has every parameter frozen) and
    gives finite gradients that reach the residual net."""
    net = LipschitzMLP([2, 16, 2], coeff=0.9)
    target = nf.distributions.GaussianMixture(1, 2, loc=[[1.0, -1.0]], scale=[[0.7, 0.7]], trainable=False)
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), [cls(net), nf.flows.ActNorm(2)], p=target)
    loss = model.reverse_kld(32, score_fn=False)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


DEFECT_CHECKS = {
    "1-logdet-unbiased": check_logdet_is_unbiased,
    "2-weighted-gradient": check_weighted_gradient,
    "3a-inverse-tolerance": check_inverse_reaches_tolerance,
    "3a-inverse-tolerance-float32": check_inverse_reaches_float32_tolerance,
    "3b-convergence-warning": check_warns_when_not_converged,
    "4-torch-seed": check_reproducible_under_torch_seed,
    "5-no-estimator-parameters": check_no_estimator_parameters,
    "6a-no-recorded-iterations": check_sampling_records_no_iterations,
    "6b-reverse-kld-score-free": check_reverse_kld_without_score,
}


@pytest.mark.parametrize("name", DEFECT_CHECKS)
def test_defect_absent_in_ours(name: str) -> None:
    DEFECT_CHECKS[name](Residual)


@pytest.mark.parametrize("name", DEFECT_CHECKS)
def test_defect_present_in_normflows(name: str) -> None:
    """The same check fails on normflows.flows.Residual, so it can fail."""
    with pytest.raises((AssertionError, RuntimeError)):
        DEFECT_CHECKS[name](TheirResidual)


# -- argument mapping, attributes, errors -----------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, dict(logdet_method="unbiased", neumann_grad=True, memory_efficient=True, n_roulette_draws=1)),
        ({"reduce_memory": False}, dict(neumann_grad=False, memory_efficient=False)),
        ({"n_power_series": 7}, dict(logdet_method="series", n_terms=7)),
        ({"brute_force": True, "n_power_series": 7}, dict(logdet_method="exact")),
        ({"n_dist": "poisson", "lamb": 3.0, "n_samples": 4, "n_exact_terms": 5},
         dict(roulette="poisson", lam=3.0, n_roulette_draws=4, n_exact_terms=5)),
        ({"geom_p": 0.3, "exact_trace": True}, dict(p=0.3, exact_trace=True)),
        ({"brute_force": True, "logdet": "series", "atol": 1e-9, "inverse_method": "anderson"},
         dict(logdet_method="series", atol=1e-9, inverse_method="anderson")),
    ],
)
def test_argument_mapping(kwargs: dict, expected: dict) -> None:
    layer = Residual(LipschitzMLP([3, 8, 3], coeff=0.9), **kwargs)
    for attribute, value in expected.items():
        assert getattr(layer.block, attribute) == value, attribute


def test_estimator_attributes_are_plain_and_validated() -> None:
    layer = Residual(LipschitzMLP([2, 8, 2], coeff=0.9), geom_p=0.4, lamb=1.5)
    assert (layer.geom_p, layer.lamb) == (0.4, 1.5)
    layer.geom_p, layer.lamb = 0.25, 3.0
    assert (layer.block.p, layer.block.lam) == (0.25, 3.0)
    with pytest.raises(ValueError, match="geom_p must be in"):
        layer.geom_p = 1.5
    with pytest.raises(ValueError, match="lamb must be a finite float > 0"):
        layer.lamb = -1.0
    assert "geom_p" not in layer.state_dict() and "lamb" not in layer.state_dict()


def test_input_errors() -> None:
    layer = Residual(LipschitzMLP([2, 8, 2], coeff=0.9))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, \*event\) with 1"):
        layer(torch.randn(3))  # ((3, 4, 2) is a batch of sequences of vectors, as for normflows' layer)
    with pytest.raises(TypeError, match="net must be an nn.Module"):
        Residual(lambda x: x)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        layer.inverse([[0.0, 1.0]])


def test_strict_option_raises() -> None:
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(-1.05 * torch.eye(2))
    layer = Residual(net, strict=True, max_iter=20).eval()
    with pytest.raises(ConvergenceError, match="did not converge in 20 iterations"):
        layer(torch.randn(3, 2))


@pytest.mark.parametrize("reverse", [True, False])
def test_directions_and_signs(reverse: bool) -> None:
    """Explicit map on the density direction iff reverse; log_det = log|det dz'/dz| in both."""
    net = make_active_mlp([3, 16, 3], coeff=0.9)
    layer = Residual(net, reverse=reverse, brute_force=True).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    explicit = layer.inverse if reverse else layer.forward
    implicit = layer.forward if reverse else layer.inverse
    y, logdet = explicit(x)
    torch.testing.assert_close(y, x + net(x))
    torch.testing.assert_close(logdet, exact_logdet(net, x))
    x_back, logdet_back = implicit(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_back, -logdet)
    assert logdet.shape == logdet_back.shape == (5,)


# -- normflows nets: power iteration upkeep and lipschitz_bound rules --------------------------
def test_normflows_net_power_iteration_kept_fresh() -> None:
    net = nf.nets.LipschitzMLP([2, 16, 16, 2], lipschitz_const=0.9, init_zeros=False)
    layer = Residual(net).train()
    with torch.no_grad():  # an optimiser step that changes the operator a lot
        for linear in (net.net[1], net.net[3], net.net[5]):
            linear.weight.copy_(3 * torch.randn_like(linear.weight))
    stale = max(_applied_norm(m) for m in (net.net[1], net.net[3], net.net[5]))
    x = torch.randn(8, 2)
    y, _ = layer.inverse(x)
    fresh = max(_applied_norm(m) for m in (net.net[1], net.net[3], net.net[5]))
    assert stale > 0.95 and fresh <= 0.9 * 1.01, (stale, fresh)
    x_back, _ = layer(y)  # same operator for a forward and an inverse between steps
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    nf.utils.update_lipschitz(layer, 5)  # still harmless: a new operator, still a contraction
    assert max(_applied_norm(m) for m in (net.net[1], net.net[3], net.net[5])) <= 0.9 * 1.01
    y, _ = layer.inverse(x)
    x_back, _ = layer(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)


def _applied_norm(linear: nn.Module) -> float:
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(linear.compute_weight(update=False), ord=2))


def test_lipschitz_bound_normflows_mlp_is_a_certificate() -> None:
    net = nf.nets.LipschitzMLP([3, 32, 32, 3], lipschitz_const=0.9, init_zeros=False).double()
    bound = lipschitz_bound(net)
    expected = math.prod(_applied_norm(net.net[i]) for i in (1, 3, 5))
    assert bound == pytest.approx(expected, rel=1e-12) and bound < 0.9**3 * 1.05
    a, b = torch.randn(2, 256, 3, dtype=torch.float64)
    ratios = (net(a) - net(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert ratios.max() <= bound
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(3), [Residual(net), nf.flows.ActNorm(3)])
    assert lipschitz_bound(model) == bound


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_lipschitz_bound_normflows_conv_is_operator_norm(kernel_size: int) -> None:
    padding = kernel_size // 2
    conv = nf.nets.lipschitz.InducedNormConv2d(2, 3, kernel_size, 1, padding, coeff=0.9, n_iterations=1)
    conv = conv.double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    conv(x)  # learns its input size
    with torch.no_grad():
        weight = conv.compute_weight(update=False)
    jac = torch.autograd.functional.jacobian(lambda v: nn.functional.conv2d(v, weight, padding=padding), x)
    reference = float(torch.linalg.matrix_norm(jac.reshape(3 * 25, 2 * 25), ord=2))
    assert lipschitz_bound(conv) == pytest.approx(reference, rel=1e-9)


def test_lipschitz_bound_conv_errors() -> None:
    conv = nf.nets.lipschitz.InducedNormConv2d(2, 3, 3, 1, 1, coeff=0.9, n_iterations=1)
    with pytest.raises(ValueError, match="run one forward pass"):
        lipschitz_bound(conv)
    strided = nf.nets.lipschitz.InducedNormConv2d(2, 3, 3, 2, 1, coeff=0.9, n_iterations=1)
    with pytest.raises(TypeError, match=r"stride 1 and 'same' padding .* stride=\(2, 2\)"):
        lipschitz_bound(strided)


# -- must work: mixed with normflows layers ---------------------------------------------------
def _mixed_flows(dtype: torch.dtype = torch.float32, **options) -> list[nn.Module]:
    def residual(hidden: int = 32) -> Residual:
        return Residual(LipschitzMLP([2, hidden, 2], coeff=0.9), **options)

    b = torch.tensor([1.0, 0.0])
    return [
        residual(), nf.flows.ActNorm(2), nf.flows.Permute(2, mode="swap"),
        nf.flows.MaskedAffineFlow(b, nf.nets.MLP([2, 16, 2], init_zeros=True),
                                  nf.nets.MLP([2, 16, 2], init_zeros=True)),
        nf.flows.Reverse(residual()),
        nf.flows.AutoregressiveRationalQuadraticSpline(2, 1, 16),
        nf.flows.Composite([residual(), nf.flows.ActNorm(2)]),
    ]


def test_forward_kld_training_lowers_heldout_nll() -> None:
    train = torch.tensor(make_moons(2048, noise=0.05, random_state=0)[0], dtype=torch.float32)
    test = torch.tensor(make_moons(512, noise=0.05, random_state=1)[0], dtype=torch.float32)
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), _mixed_flows())

    def heldout_nll() -> float:
        model.eval()
        with torch.no_grad():
            nll = -model.log_prob(test).mean()
        model.train()
        return float(nll)

    before = heldout_nll()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(60):
        batch = train[torch.randint(0, len(train), (256,))]
        optimizer.zero_grad()
        model.forward_kld(batch).backward()
        optimizer.step()
    after = heldout_nll()
    assert math.isfinite(after) and after < before - 0.3, (before, after)


@pytest.mark.parametrize("objective", ["reverse_kld", "reverse_kld_no_score", "alpha_div", "alpha_div_dreg"])
def test_reverse_objectives_train(objective: str) -> None:
    target = nf.distributions.GaussianMixture(1, 2, loc=[[1.5, -1.0]], scale=[[0.6, 0.6]], trainable=False)
    nets = [LipschitzMLP([2, 16, 2], coeff=0.9) for _ in range(2)]
    flows = [Residual(nets[0]), nf.flows.ActNorm(2), nf.flows.Permute(2, mode="swap"), Residual(nets[1])]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows, p=target)

    def kl() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            z, log_q = model.sample(512)
            return float((log_q - target.log_prob(z)).mean())

    losses = {
        "reverse_kld": lambda: model.reverse_kld(64),
        "reverse_kld_no_score": lambda: model.reverse_kld(64, score_fn=False),
        "alpha_div": lambda: model.reverse_alpha_div(64, alpha=0.5),
        "alpha_div_dreg": lambda: model.reverse_alpha_div(64, alpha=0.5, dreg=True),
    }
    model.sample(64)  # ActNorm's data-dependent initialisation
    before = kl()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(25):
        optimizer.zero_grad()
        loss = losses[objective]()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in nets[0].parameters())
        optimizer.step()
    after = kl()
    assert after < 0.5 * before, (before, after)


def test_model_methods_shapes_and_exact_agreement() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), _mixed_flows(brute_force=True))
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.double()
    x0 = torch.randn(64, 2, dtype=torch.float64)
    model.log_prob(x0)  # ActNorm initialisation
    for mode in ("train", "eval"):
        getattr(model, mode)()
        z, log_q = model.sample(16)
        assert z.shape == (16, 2) and log_q.shape == (16,)
        torch.testing.assert_close(model.log_prob(z), log_q, rtol=1e-7, atol=1e-7)
        latent = torch.randn(16, 2, dtype=torch.float64)
        x, log_det = model.forward_and_log_det(latent)
        back, log_det_inv = model.inverse_and_log_det(x)
        assert x.shape == back.shape == (16, 2) and log_det.shape == log_det_inv.shape == (16,)
        torch.testing.assert_close(back, latent, rtol=0, atol=1e-8)
        # normflows accumulates these two in float32 (torch.zeros(len(z)))
        torch.testing.assert_close(log_det + log_det_inv, torch.zeros(16), rtol=0, atol=1e-5)


# -- normflows' own FlowTest -----------------------------------------------------------------
class TestNormflowsFlowTest(FlowTest):
    def test_mlp(self) -> None:
        for net in (LipschitzMLP([3, 64, 64, 3], coeff=0.9),
                    nf.nets.LipschitzMLP([3, 64, 64, 3], lipschitz_const=0.9, init_zeros=False)):
            for reduce_memory in (True, False):
                flow = Residual(net, reduce_memory=reduce_memory, brute_force=True)
                self.checkForwardInverse(flow, torch.randn(7, 3), atol=1e-5, rtol=1e-5)
                flow = Residual(net, reduce_memory=reduce_memory, n_dist="poisson")
                outputs, _ = self.checkForward(flow, torch.randn(7, 3))
                inputs, _ = self.checkInverse(flow, outputs)
                self.assertClose(flow(inputs)[0], outputs, atol=1e-5, rtol=1e-5)

    def test_cnn(self) -> None:
        nets = [
            (nf.nets.LipschitzCNN([2, 16, 2], [1, 1], lipschitz_const=0.9, init_zeros=False), False),
            (nf.nets.LipschitzCNN([2, 16, 2], [3, 3], lipschitz_const=0.9, init_zeros=False), True),
            (LipschitzCNN([2, 16, 2], [3, 3], input_shape=(2, 4, 4), coeff=0.9), True),
        ]
        for net, reduce_memory in nets:
            flow = Residual(net, reduce_memory=reduce_memory, brute_force=True)
            self.checkForwardInverse(flow, torch.randn(2, 2, 4, 4), atol=1e-5, rtol=1e-5)
            flow = Residual(net, reduce_memory=reduce_memory)
            outputs, log_det = self.checkForward(flow, torch.randn(2, 2, 4, 4))
            assert log_det.shape == (2,)
            inputs, _ = self.checkInverse(flow, outputs)
            log_det.mean().backward()
            assert all(p.grad is not None for p in net.parameters())
            assert lipschitz_bound(flow) < 0.9**2 * 1.05


@pytest.mark.parametrize("kind", ["mlp", "cnn3", "cnn1"])
def test_normflows_nets_match_their_own_forward(kind: str) -> None:
    """The explicit map and exact log-det through normflows' nets agree with the nets called
    directly (their own forward) and with an autograd Jacobian."""
    if kind == "mlp":
        net = nf.nets.LipschitzMLP([3, 32, 3], lipschitz_const=0.9, init_zeros=False).double()
        x = torch.randn(4, 3, dtype=torch.float64)
    else:
        k = int(kind[-1])
        net = nf.nets.LipschitzCNN([2, 8, 2], [k, k], lipschitz_const=0.9, init_zeros=False).double()
        x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    layer = Residual(net, brute_force=True).eval()
    y, logdet = layer.inverse(x)
    # normflows rounds its normalisation factor max(1, sigma / c) to float32 (torch.ones(1))
    torch.testing.assert_close(y, x + net(x), rtol=0, atol=1e-7)
    flat = x.flatten(1)
    reference = torch.stack([
        torch.linalg.slogdet(torch.autograd.functional.jacobian(
            lambda v: (v + net(v.view(1, *x.shape[1:])).flatten()), row)).logabsdet
        for row in flat
    ])
    torch.testing.assert_close(logdet, reference, rtol=1e-7, atol=1e-7)


# -- regressions: weight tying, evaluations at backward time, checkpoints, argument types -----
def test_normflows_net_shared_by_two_layers() -> None:
    """Weight tying: one normflows net under two layers is refreshed once per change of its
    weights, whichever layer runs first, and a later refresh never invalidates a recorded graph."""
    net = nf.nets.LipschitzMLP([2, 16, 2], lipschitz_const=0.9)
    flows = [Residual(net), nf.flows.ActNorm(2), Residual(net)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)
    x = torch.randn(8, 2)
    model.forward_kld(x).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    linear = net.net[1]
    flows[0].inverse(x)
    version = linear.u._version
    flows[2].inverse(x)  # the same operator: no second power iteration
    assert linear.u._version == version
    _, logdet = flows[0].inverse(x)
    net.zero_grad(set_to_none=True)  # a step that leaves the weights as they are (no gradients) ...
    torch.optim.SGD(net.parameters(), lr=0.1).step()  # ... but counts: a refresh is due
    _, logdet_after = flows[2].inverse(x)
    assert linear.u._version != version
    (logdet.sum() + logdet_after.sum()).backward()


def _count_normflows_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of normflows' own ``InducedNormLinear.forward`` / ``InducedNormConv2d.forward``."""
    calls = [0]
    for cls in (nf.nets.lipschitz.InducedNormLinear, nf.nets.lipschitz.InducedNormConv2d):
        def counting(self, x, original=cls.forward):
            calls[0] += 1
            return original(self, x)

        monkeypatch.setattr(cls, "forward", counting)
    return calls


@pytest.mark.parametrize("reverse", [True, False])
def test_normflows_nets_never_run_their_own_forward(reverse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evaluation of g on the generic path, in the forward pass and at backward time (the
    memory-efficient re-run for per-sample weights, the inverse's adjoint solve), uses the pure
    forward."""
    net = nf.nets.LipschitzMLP([3, 16, 3], lipschitz_const=0.9, init_zeros=False).double()
    layer = Residual(net, reverse=reverse, fused=False).train()
    calls = _count_normflows_forwards(monkeypatch)
    for direction in (layer.inverse, layer.forward):
        z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        out, logdet = direction(z)
        (out.sum() + (torch.randn(5, dtype=torch.float64) * logdet).sum()).backward()
    assert calls[0] == 0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_normflows_nets_weighted_gradient(kind: str) -> None:
    """With normflows' nets too, the memory-efficient gradient of a per-sample weighted loss equals
    the plain autograd path with the same draws (to 1e-9, as docs/normflows.md states), on the
    generic path (the fast path has no separate memory-efficient mode)."""
    if kind == "mlp":
        net = nf.nets.LipschitzMLP([3, 16, 3], lipschitz_const=0.9, init_zeros=False).double()
        x0 = torch.randn(5, 3, dtype=torch.float64)
    else:
        net = nf.nets.LipschitzCNN([2, 4, 2], [3, 3], lipschitz_const=0.9, init_zeros=False).double()
        x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    weights = torch.randn(len(x0), dtype=torch.float64)
    grads = []
    for memory_efficient in (True, False):
        layer = Residual(net, memory_efficient=memory_efficient, fused=False).train()
        layer.inverse(x0)  # power iteration refreshed once; then the operator stays put
        torch.manual_seed(1)
        x = x0.clone().requires_grad_()
        y, logdet = layer.inverse(x)
        grads.append(torch.autograd.grad((weights * logdet).sum() + y.square().sum(), [x, *net.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# -- the fast path with normflows' LipschitzMLP ----------------------------------------------------
def _normflows_mlp_gradients(fused: bool, dims: list[int], direction: str, options: dict, seed: int = 3):
    """Values and gradients (input, every parameter, Swish betas included) of a per-sample weighted
    loss through one layer over normflows' LipschitzMLP in float64, with fixed draws."""
    torch.manual_seed(0)
    net = nf.nets.LipschitzMLP(dims, lipschitz_const=0.95, init_zeros=False).double()
    with torch.no_grad():  # an active normalisation in every layer, unequal Swish betas
        for linear in net.net[1::2]:
            linear.weight.mul_(4)
        for swish in net.net[0::2]:
            swish.beta.uniform_(-1, 1.5)
    layer = Residual(net, fused=fused, **options).train()
    z = torch.randn(6, dims[0], dtype=torch.float64) * 2
    layer(z)  # refresh the power iteration once: both paths then apply the same operator
    weights = torch.rand(6, dtype=torch.float64) * 3 - 1
    torch.manual_seed(seed)
    z.requires_grad_()
    out, logdet = getattr(layer, direction)(z)
    loss = (weights * logdet).sum() + (torch.linspace(-1, 2, dims[0], dtype=torch.float64) * out).sum()
    return out.detach(), logdet.detach(), torch.autograd.grad(loss, [z, *net.parameters()])


@pytest.mark.parametrize(
    ("dims", "options"),
    [
        ([2, 16, 16, 2], {}),  # normflows' defaults: unbiased roulette, reduce_memory
        ([2, 16, 16, 2], {"brute_force": True}),  # closed-form 2 x 2 determinant
        ([3, 16, 3], {"reduce_memory": False, "n_power_series": 4}),
        ([3, 12, 12, 3], {"brute_force": True}),  # slogdet
        ([2, 8, 8, 8, 2], {"n_exact_terms": 3, "n_samples": 2, "n_dist": "poisson"}),
        ([5, 12, 12, 5], {"n_power_series": 2, "n_probes": 1}),  # d >= terms x probes: VJPs
    ],
)
@pytest.mark.parametrize("direction", ["inverse", "forward"])  # explicit map / fixed-point solve
def test_normflows_mlp_fast_path_matches_generic_path(dims: list[int], options: dict, direction: str) -> None:
    """normflows' LipschitzMLP (a Swish before every linear layer) takes the fast path: values and
    gradients equal the generic autograd path's through its pure forward, to 1e-12 in float64."""
    fast = _normflows_mlp_gradients(True, dims, direction, options)
    slow = _normflows_mlp_gradients(False, dims, direction, options)
    tol = 1e-12 if direction == "inverse" else 1e-10  # the solve stops at 1e-12 (1 + |y|)
    for a, b in zip((fast[0], fast[1], *fast[2]), (slow[0], slow[1], *slow[2])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert float(fast[2][1].abs()) > 0  # the first Swish beta gets a gradient


def test_normflows_mlp_dispatch_and_newton_sampling() -> None:
    """fused='auto' takes the fast path for normflows' LipschitzMLP and not for its LipschitzCNN;
    fused=True and the Newton inverse accept the MLP; sampling agrees with the fixed point."""
    mlp = nf.nets.LipschitzMLP([2, 16, 16, 2], lipschitz_const=0.9, init_zeros=False)
    cnn = nf.nets.LipschitzCNN([2, 4, 2], [3, 3], lipschitz_const=0.9)
    assert Residual(mlp).block._fused_net() is not None
    assert Residual(mlp, fused=False).block._fused_net() is None
    assert Residual(cnn).block._fused_net() is None
    with pytest.raises(ValueError, match="fused=True needs a LipschitzMLP"):
        Residual(cnn, fused=True)
    base = nf.distributions.DiagGaussian(2, trainable=False)
    samples = []
    for method in ("fixed_point", "newton"):
        model = nf.NormalizingFlow(base, [Residual(mlp, fused=True, inverse_method=method)]).eval()
        torch.manual_seed(4)
        with torch.no_grad():
            x, log_q = model.sample(64)
        torch.testing.assert_close(log_q, model.log_prob(x), rtol=0, atol=1e-4)
        samples.append(x)
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=1e-5)


def test_normflows_power_iteration_equals_compute_weight() -> None:
    """The layer's own power iteration for normflows' 2-norm linear layers leaves u, v and scale
    bit for bit as compute_weight(update=True) does; other layers run compute_weight itself."""
    from pyro_iresnet.normflows import _power_iteration

    for net in (nf.nets.LipschitzMLP([3, 16, 2], lipschitz_const=0.9, max_lipschitz_iter=3),
                nf.nets.LipschitzCNN([2, 4, 2], [3, 3], lipschitz_const=0.9)):
        with torch.no_grad():
            for m in net.net[1::2]:
                m.weight.mul_(3)
        ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
        for a, b in zip(ours.net[1::2], theirs.net[1::2]):
            torch.manual_seed(0)  # a convolution before its first forward draws its buffers
            _power_iteration(a)
            torch.manual_seed(0)
            b.compute_weight(update=True)
            assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v) and torch.equal(a.scale, b.scale)


def _two_moons_flow(cls: type) -> nf.NormalizingFlow:
    torch.manual_seed(0)
    flows = []
    for _ in range(2):
        flows += [cls(nf.nets.LipschitzMLP([2, 16, 2], lipschitz_const=0.9, init_zeros=False)), nf.flows.ActNorm(2)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)


def test_loads_normflows_checkpoint() -> None:
    """A state_dict saved with normflows.flows.Residual loads (strict) after the one-line import
    change and gives the same densities (eval: exact log-det in both for 2-d data)."""
    theirs = _two_moons_flow(TheirResidual)
    x = torch.randn(16, 2)
    theirs.log_prob(x)  # ActNorm's data-dependent initialisation
    nf.utils.update_lipschitz(theirs, 5)
    state = copy.deepcopy(theirs.state_dict())
    ours = _two_moons_flow(Residual)
    ours.load_state_dict(state)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.log_prob(x), theirs.log_prob(x), rtol=1e-5, atol=1e-5)
    assert set(ours.state_dict()) == {k.replace("iresblock.nnet.", "block.net.") for k in state
                                      if ".iresblock." not in k or ".iresblock.nnet." in k}


@pytest.mark.parametrize("saved_by", ["ours", "normflows"])
def test_cnn_checkpoint_loads_into_a_fresh_layer(saved_by: str) -> None:
    """normflows' InducedNormConv2d resizes its power-iteration vectors on its first forward; a
    checkpoint saved after one loads (strict) into a freshly built layer, with no forward first,
    and gives the same outputs and log-dets."""
    def make() -> nf.nets.LipschitzCNN:
        torch.manual_seed(1)
        return nf.nets.LipschitzCNN([2, 8, 8, 2], [3, 1, 3], lipschitz_const=0.9)

    x = torch.randn(3, 2, 5, 5)
    saved = Residual(make()) if saved_by == "ours" else TheirResidual(make())
    saved(x)
    state = copy.deepcopy(saved.state_dict())
    loaded = Residual(make())
    loaded.load_state_dict(state)
    saved.eval(), loaded.eval()
    with torch.no_grad():
        z, logdet = loaded.inverse(x)
        if saved_by == "ours":
            z_ref, logdet_ref = saved.inverse(x)
            torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(z, x + saved.iresblock.nnet(x), rtol=0, atol=1e-6)
    for name, buffer in loaded.state_dict().items():
        torch.testing.assert_close(buffer, state[name.replace("block.net.", "iresblock.nnet.")]
                                   if name not in state else state[name])


def test_cnn_checkpoint_saved_before_any_forward_loads_into_a_used_layer() -> None:
    """Rewinding to weights saved before the first forward: the layer that already ran one must
    learn its input size again and end up as a fresh layer loaded with the same checkpoint."""
    def make() -> nf.nets.LipschitzCNN:
        torch.manual_seed(1)
        return nf.nets.LipschitzCNN([2, 8, 8, 2], [3, 3, 3], lipschitz_const=0.9, init_zeros=False)

    x = torch.randn(3, 2, 5, 5)
    initial = copy.deepcopy(Residual(make()).state_dict())
    used, fresh = Residual(make()), Residual(make())
    used(x)
    for layer in (used, fresh):
        layer.load_state_dict(initial)
        torch.manual_seed(5)  # the power-iteration vectors start at random
        layer(x)  # training mode: learns the input size
        layer.eval()
    assert used.block.input_sizes == fresh.block.input_sizes
    for (name, a), b in zip(used.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(used.inverse(x), fresh.inverse(x), rtol=0, atol=0)


def test_cnn_checkpoint_loads_over_buffers_mapped_from_a_file(tmp_path) -> None:
    """Buffers assigned from a memory-mapped checkpoint (``torch.load(mmap=True)``,
    ``load_state_dict(assign=True)``) cannot be resized; a later checkpoint with other vector
    shapes must still load into the same buffer objects, and a layer loaded so before its first
    forward must run it (both used to fail: "Trying to resize storage that is not resizable")."""
    def make() -> nf.nets.LipschitzCNN:
        torch.manual_seed(1)
        return nf.nets.LipschitzCNN([2, 8, 8, 2], [3, 1, 3], lipschitz_const=0.9)

    x = torch.randn(3, 2, 5, 5)
    before, after = tmp_path / "before_forward.pt", tmp_path / "after_forward.pt"
    torch.save(Residual(make()).state_dict(), before)  # 1-D vectors of the layer's channel sizes
    trained = Residual(make())
    trained(x)  # vectors of the 5 x 5 input's size
    torch.save(trained.state_dict(), after)
    layer = Residual(make())
    layer.load_state_dict(torch.load(before, mmap=True), assign=True)
    buffers = list(layer.buffers())
    layer.load_state_dict(torch.load(after, mmap=True))
    assert all(a is b for a, b in zip(layer.buffers(), buffers))  # the same objects (DDP holds them)
    trained.eval(), layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer.inverse(x), trained.inverse(x), rtol=0, atol=1e-6)
    # loaded before any forward, then run: normflows' first forward resizes the mapped vectors
    fresh = Residual(make())
    fresh.load_state_dict(torch.load(before, mmap=True), assign=True)
    fresh(x)
    assert fresh.block.input_sizes == trained.block.input_sizes


def test_checkpoint_of_a_bare_induced_norm_conv_net() -> None:
    """A net that is itself an InducedNormConv2d (its module name is empty) loads into a fresh layer."""
    from normflows.nets.lipschitz import InducedNormConv2d

    def make() -> InducedNormConv2d:
        torch.manual_seed(0)
        return InducedNormConv2d(2, 2, 3, 1, 1, coeff=0.9, n_iterations=5)

    x = torch.randn(3, 2, 5, 5)
    saved = Residual(make())
    saved(x)
    loaded = Residual(make())
    loaded.load_state_dict(copy.deepcopy(saved.state_dict()))
    saved.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.inverse(x), saved.inverse(x), rtol=0, atol=0)


def test_numpy_scalar_arguments() -> None:
    """numpy scalars are accepted where normflows accepts them (and converted); bools and floats
    for integers are still refused."""
    layer = Residual(LipschitzMLP([2, 8, 2], coeff=0.9), geom_p=np.float32(0.5), lamb=np.float32(2.0),
                     n_samples=np.int64(2), n_power_series=np.int64(5))
    assert (layer.geom_p, layer.lamb, layer.block.n_roulette_draws, layer.block.n_terms) == (0.5, 2.0, 2, 5)
    assert type(layer.lamb) is float and type(layer.block.n_terms) is int
    layer.inverse(torch.randn(3, 2))
    with pytest.raises(TypeError, match="n_samples must be an int, got float"):
        Residual(LipschitzMLP([2, 8, 2]), n_samples=2.0)
    with pytest.raises(TypeError, match="lamb must be a finite float > 0, got bool"):
        Residual(LipschitzMLP([2, 8, 2]), lamb=True)
    with pytest.raises(ValueError, match="lamb must be a finite float > 0, got -1.0"):
        Residual(LipschitzMLP([2, 8, 2]), lamb=np.float32(-1.0))


def test_conv_net_input_dtype_checked_first() -> None:
    """A mismatched input dtype is a TypeError naming z, before the conv's setup forward, on every call."""
    layer = Residual(nf.nets.LipschitzCNN([2, 4, 2], [3, 3], lipschitz_const=0.9))
    for _ in range(2):
        with pytest.raises(TypeError, match=r"z has dtype torch\.float64 but the block's parameters are torch\.float"):
            layer.inverse(torch.randn(2, 2, 4, 4, dtype=torch.float64))
    assert layer.inverse(torch.randn(2, 2, 4, 4))[0].shape == (2, 2, 4, 4)


def test_event_dim_of_a_convolutional_net_is_its_spatial_rank_plus_one() -> None:
    """Without an ``event_shape``, a net's event dimensions are read from its convolutions: one
    channel dimension plus one per spatial dimension of the kernel (Conv1d: 2, Conv2d: 3, Conv3d:
    4); a net without convolutions has 1."""
    from pyro_iresnet.normflows import _event_dim

    assert _event_dim(nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ELU(), nn.Conv1d(4, 2, 3, padding=1))) == 2
    assert _event_dim(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))) == 3
    assert _event_dim(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1))) == 4
    assert _event_dim(nn.Sequential(nn.Linear(2, 2))) == 1


def _unconverged_normflows_net(dim: int) -> nn.Module:
    """A normflows LipschitzMLP whose power-iteration buffers are far from converged, so that an
    update_lipschitz visibly changes the normalised weights."""
    net = nf.nets.LipschitzMLP([dim, 16, dim], lipschitz_const=0.9, init_zeros=False, max_lipschitz_iter=1).double()
    with torch.no_grad():
        for layer in net.net[1::2]:
            layer.weight.mul_(4)
            layer.u.copy_(nn.functional.normalize(torch.randn_like(layer.u), dim=0))
            layer.v.copy_(nn.functional.normalize(torch.randn_like(layer.v), dim=0))
    return net


@pytest.mark.parametrize("direction", ["inverse", "forward"])
@pytest.mark.parametrize("options", [dict(fused=False), dict(fused=True), dict(fused=False, brute_force=True),
                                     dict(fused=True, brute_force=True)],
                         ids=["generic", "fused", "generic-exact", "fused-exact"])
def test_update_lipschitz_between_forward_and_backward_leaves_the_gradient_unchanged(
    direction: str, options: dict
) -> None:
    """Evaluations of g at backward time (the adjoint of the solve, the memory-saving re-run for
    weighted losses) read the power-iteration buffers: updated in between, they silently gave the
    gradient of another g (off by 0.1-0.2). They now use the buffers of the forward pass."""
    torch.manual_seed(0)
    net0 = _unconverged_normflows_net(3)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    weights = torch.tensor([1.0, -3.0, 0.5, 2.0], dtype=torch.float64)

    def gradients(update_between: bool):
        net = copy.deepcopy(net0)
        layer = Residual(net, **options)
        x = x0.clone().requires_grad_()
        torch.manual_seed(5)
        z, log_det = getattr(layer, direction)(x)
        loss = (z**2).sum() + (weights * log_det).sum()
        if update_between:
            nf.utils.update_lipschitz(layer, 50)
        return torch.autograd.grad(loss, [x, *net.parameters()], allow_unused=True)

    for a, b in zip(gradients(True), gradients(False)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_normflows_mlp_on_sequences_takes_the_generic_path() -> None:
    """(batch, T, D) inputs with event_dim=2: the fused path (vectors only) crashed inside a matmul;
    the block now takes the generic path, exact against the autograd Jacobian."""
    torch.manual_seed(0)
    net = nf.nets.LipschitzMLP([3, 16, 3], lipschitz_const=0.9, init_zeros=False).double()
    layer = Residual(net, event_dim=2, brute_force=True)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        z, log_det = layer.inverse(x)  # the explicit map
        assert z.shape == x.shape and log_det.shape == (4,)
        with torch.no_grad():
            jac = torch.autograd.functional.jacobian(lambda v: layer.inverse(v[None])[0][0], x[0]).reshape(15, 15)
        torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jac).logabsdet, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="fused=True needs event_dim=1"):
        Residual(net, event_dim=2, fused=True)


@pytest.mark.parametrize("tolerance", [None, 1e-3])
def test_normflows_net_without_power_iteration_count(tolerance: float | None) -> None:
    """Without ``max_lipschitz_iter`` (normflows leaves the count to ``update_lipschitz(model, n)``)
    a refresh runs the tolerance's iteration, or normflows' default of 5 steps without one: what
    ``update_lipschitz(model, 5)`` does to the same net."""
    torch.manual_seed(0)
    net = nf.nets.LipschitzMLP([2, 8, 2], max_lipschitz_iter=None, lipschitz_tolerance=tolerance, init_zeros=False)
    layer = Residual(net)
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nf.nets.lipschitz.InducedNormLinear):
                m.weight.mul_(1.5)  # a change of the weights, as an optimiser step makes
        for m in reference.modules():
            if isinstance(m, nf.nets.lipschitz.InducedNormLinear):
                m.weight.mul_(1.5)
                m.compute_weight(update=True, n_iterations=None if tolerance else 5)
    layer.inverse(torch.randn(4, 2))
    for ours, theirs in zip(net.modules(), reference.modules()):
        if isinstance(ours, nf.nets.lipschitz.InducedNormLinear):
            assert torch.equal(ours.u, theirs.u) and torch.equal(ours.v, theirs.v)


def test_eval_after_the_last_optimiser_step_refreshes_normflows_power_iteration_once() -> None:
    """After the last optimiser step of a run nothing refreshed normflows' power iteration in eval()
    (the layer said update_lipschitz was unnecessary), so the applied weights were one step stale
    (||W~|| / c up to 1.0056 at lr 3e-2). Now eval() runs what update_lipschitz(model, 5) after that
    step does, bit for bit; a loaded checkpoint's buffers are kept as they are."""
    torch.manual_seed(0)
    flows = []
    for _ in range(2):
        flows += [Residual(nf.nets.LipschitzMLP([2, 32, 32, 2], lipschitz_const=0.9)), nf.flows.ActNorm(2)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)
    _train_forward_kld(model, torch.randn(64, 2), steps=3, lr=3e-2)
    reference = copy.deepcopy(model)
    nf.utils.update_lipschitz(reference, 5)
    model.eval()
    reference.eval()
    x = torch.randn(32, 2)
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), reference.log_prob(x))
        buffers = [b.clone() for b in model.buffers()]
        loaded = copy.deepcopy(reference)
        loaded.load_state_dict(model.state_dict())
        loaded.log_prob(x)
        assert all(torch.equal(a, b) for a, b in zip(loaded.buffers(), buffers))  # used as loaded


def test_a_checkpoint_loaded_into_the_trained_model_keeps_its_buffers_in_eval() -> None:
    """After training, restoring an earlier checkpoint into the same model and calling eval() ran
    normflows' power iteration on the loaded u, v (the model had optimiser steps the refresh had not
    seen): log_prob differed from the checkpoint's in a fresh model by 9e-4."""

    def build() -> nf.NormalizingFlow:
        torch.manual_seed(0)
        flows = []
        for _ in range(2):
            flows += [Residual(nf.nets.LipschitzMLP([2, 32, 32, 2], lipschitz_const=0.9)), nf.flows.ActNorm(2)]
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)

    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    data = torch.randn(64, 2)

    def step() -> None:
        optimizer.zero_grad()
        model.forward_kld(data).backward()
        optimizer.step()

    for _ in range(3):
        step()
    nf.utils.update_lipschitz(model, 5)
    checkpoint = copy.deepcopy(model.state_dict())
    for _ in range(2):
        step()
    model.load_state_dict(checkpoint)
    fresh = build()
    fresh.load_state_dict(checkpoint)
    x = torch.randn(32, 2)
    with torch.no_grad():
        assert torch.equal(model.eval().log_prob(x), fresh.eval().log_prob(x))
    assert all(torch.equal(value, checkpoint[key]) for key, value in model.state_dict().items())


def test_a_wrong_channel_count_on_the_first_call_leaves_normflows_convs_uninitialised() -> None:
    """normflows' convs learn the input size on their first forward: a refused first call must not
    leave them half-initialised (their buffers sized for the wrong input)."""

    def make() -> Residual:
        torch.manual_seed(0)
        net = nf.nets.LipschitzCNN([2, 8, 8, 2], [3, 1, 3], init_zeros=False, lipschitz_const=0.9)
        return Residual(net, logdet="series", n_terms=3)

    layer, fresh = make(), make()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 2, H, W\) for the net's first layer"):
        layer.inverse(torch.randn(4, 3, 4, 4))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    x = torch.randn(4, 2, 4, 4)
    torch.manual_seed(1)
    z, log_det = layer.inverse(x)
    torch.manual_seed(1)
    z_fresh, log_det_fresh = fresh.inverse(x)
    assert torch.equal(z, z_fresh) and torch.equal(log_det, log_det_fresh)


@pytest.mark.parametrize(
    "z, error, match",
    [
        (torch.randn(5, 4), ValueError, r"z must have shape \(batch, 3\) for the net's first layer"),
        (torch.full((5, 3), float("nan")), ValueError, "must be finite"),
        (torch.randn(5, 3, dtype=torch.float64), TypeError, "has dtype torch.float64"),
    ],
    ids=["size", "nan", "dtype"],
)
def test_a_refused_call_over_normflows_mlp_leaves_its_buffers_untouched(z: torch.Tensor, error: type, match: str):
    """After an optimiser step the next call refreshes the power iteration: not before its input
    is checked."""
    torch.manual_seed(0)
    layer = Residual(nf.nets.LipschitzMLP([3, 16, 3], init_zeros=False, lipschitz_const=0.9))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    out, log_det = layer.inverse(torch.randn(5, 3))
    (out.sum() + log_det.sum()).backward()
    optimizer.step()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer.inverse(z)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("save_after_first_eval", [False, True])
def test_a_checkpoint_and_the_model_that_saved_it_agree_in_eval(save_after_first_eval: bool) -> None:
    """``eval()`` refreshes normflows' power iteration only where it is stale for the current
    weights (told by its ``scale`` buffer), so the trained model and its checkpoint, saved before
    or after the model's first ``eval()`` call, give the same log-densities (they differed by
    about 1e-4 when a loaded checkpoint was always taken as fresh)."""

    def build() -> nf.NormalizingFlow:
        torch.manual_seed(1)
        flows = []
        for _ in range(2):
            net = nf.nets.LipschitzMLP([2, 16, 16, 2], init_zeros=False, lipschitz_const=0.9)
            flows += [Residual(net), nf.flows.ActNorm(2)]
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)

    model = build()
    x = torch.randn(64, 2)
    _train_forward_kld(model, x, steps=5, lr=1e-2)
    model.eval()
    if save_after_first_eval:
        with torch.no_grad():
            model.log_prob(x[:1])
    reloaded = build()
    reloaded.load_state_dict(copy.deepcopy(model.state_dict()))
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), reloaded.log_prob(x))
    layer = next(m for m in model.modules() if isinstance(m, nf.nets.lipschitz.InducedNormLinear))
    with torch.no_grad():  # (rewrites the scale buffer with the value it holds: the buffers are fresh)
        weight = layer.compute_weight(update=False)
    assert float(torch.linalg.matrix_norm(weight.double(), ord=2)) <= layer.coeff * (1 + 1e-3)  # refreshed


def test_a_custom_net_whose_first_induced_norm_layer_is_not_first_is_not_size_checked() -> None:
    """Only normflows' own nets apply their first induced-norm layer to z first; a custom net
    (here one that flattens an image first) is taken as it is."""

    class FlatNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nf.nets.LipschitzMLP([4, 8, 4], init_zeros=False, lipschitz_const=0.9)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner(z.flatten(1)).reshape(z.shape)

    torch.manual_seed(0)
    layer = Residual(FlatNet(), brute_force=True, event_dim=3)
    z, log_det = layer.inverse(torch.randn(5, 1, 2, 2))
    assert z.shape == (5, 1, 2, 2) and log_det.shape == (5,)


def _train_forward_kld(model: nn.Module, data: torch.Tensor, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model.forward_kld(data).backward()
        optimizer.step()


@pytest.mark.parametrize("net_kind", ["normflows", "ours"])
def test_an_mlp_takes_sequences_of_vectors_as_normflows_layer_does(net_kind: str) -> None:
    """``(batch, T, D)``: the event is ``(T, D)`` and its exact log-det, that of the block-diagonal
    Jacobian, matches ``slogdet`` of the autograd Jacobian of the whole event."""
    torch.manual_seed(0)
    if net_kind == "normflows":
        net = nf.nets.LipschitzMLP([2, 16, 2], init_zeros=False, lipschitz_const=0.9)
    else:
        net = LipschitzMLP([2, 16, 2], coeff=0.9)
    layer = Residual(net.double(), brute_force=True)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    y, log_det = layer.inverse(x)  # the explicit map (reverse=True)
    assert y.shape == x.shape and log_det.shape == (4,)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: (v + net(v)).reshape(6), row) for row in x])
    # (normflows' own forward, the reference's, rounds its normalisation factor to float32: 1e-9 here)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jac.reshape(4, 6, 6)).logabsdet, atol=1e-7, rtol=0)
    x_back, log_det_back = layer.forward(y)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(log_det_back, -log_det, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kernels", [[3, 3], [1, 1]])
def test_a_cnn_checkpoint_and_the_model_that_saved_it_agree_in_eval(kernels: list[int]) -> None:
    """The reloaded model's first call runs normflows' own forward to learn the input size, which
    writes ``scale``: that must not make its stale buffers look fresh."""

    def make() -> Residual:
        torch.manual_seed(1)
        net = nf.nets.LipschitzCNN([2, 8, 2], kernels, lipschitz_const=0.9, init_zeros=False)
        return Residual(net, logdet="series", n_terms=3, eval_logdet="exact")

    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    x = torch.randn(4, 2, 4, 4)
    for _ in range(3):
        optimizer.zero_grad()
        z, log_det = model.inverse(x)
        ((z**2).sum() - log_det.sum()).backward()
        optimizer.step()
    reloaded = make()
    reloaded.load_state_dict(copy.deepcopy(model.state_dict()))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        (z, log_det), (z_loaded, log_det_loaded) = model.inverse(x), reloaded.inverse(x)
    assert torch.equal(z, z_loaded) and torch.equal(log_det, log_det_loaded)


def test_buffers_stay_as_they_are_after_a_query_or_a_change_of_dtype() -> None:
    """``lipschitz_bound`` after the last step does not mark stale buffers fresh (the next
    ``eval()`` call still refreshes them), and fresh buffers converted by ``.double()`` are not
    refreshed again (float32 rounding of ``scale`` is not staleness)."""
    torch.manual_seed(0)
    layer = Residual(nf.nets.LipschitzMLP([2, 16, 2], init_zeros=False, lipschitz_const=0.9))
    twin = copy.deepcopy(layer)
    x = torch.randn(8, 2)
    for module in (layer, twin):
        torch.manual_seed(1)  # the same draws: the same weights and buffers
        _train_forward_kld(nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), [module]),
                           x, steps=2, lr=1e-2)
    lipschitz_bound(layer)
    layer.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(layer.inverse(x)[1], twin.inverse(x)[1])
    buffers = {k: v.clone() for k, v in layer.state_dict().items() if k.endswith((".u", ".v"))}
    layer.double()
    with torch.no_grad():
        layer.inverse(x.double())
    assert all(torch.equal(layer.state_dict()[k], v.double()) for k, v in buffers.items())


def test_an_empty_batch_of_sequences() -> None:
    layer = Residual(nf.nets.LipschitzMLP([3, 8, 3], init_zeros=False), brute_force=True)
    z, log_det = layer.inverse(torch.randn(0, 2, 3))
    assert z.shape == (0, 2, 3) and log_det.shape == (0,)


def test_the_conv_input_size_is_read_from_the_device_only_after_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The input size an ``InducedNormConv2d`` learned is read back (a host sync on an accelerator)
    when its buffer changes (the first forward, ``load_state_dict``), not on every call; a checkpoint
    of another input size still takes effect."""
    torch.manual_seed(0)
    net = nf.nets.LipschitzCNN([2, 4, 2], [3, 3], lipschitz_const=0.9, init_zeros=False)
    layer = Residual(net)
    convs = [m for m in net.modules() if isinstance(m, nf.nets.lipschitz.InducedNormConv2d)]
    reads = []
    original = torch.Tensor.tolist

    def counted(tensor: torch.Tensor):
        if any(tensor is conv.spatial_dims for conv in convs):
            reads.append(1)
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    layer(torch.randn(3, 2, 4, 4))
    first = len(reads)
    for _ in range(3):
        layer(torch.randn(3, 2, 4, 4))
        layer.inverse(torch.randn(3, 2, 4, 4))
    assert first >= len(convs) and len(reads) == first
    other = Residual(nf.nets.LipschitzCNN([2, 4, 2], [3, 3], lipschitz_const=0.9, init_zeros=False))
    other(torch.randn(3, 2, 6, 6))
    layer.load_state_dict(other.state_dict())
    layer(torch.randn(3, 2, 6, 6))
    assert [layer.block.input_sizes[i] for i in range(len(convs))] == [(6, 6)] * len(convs)
