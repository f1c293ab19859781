"""Reliability: bad input, loud failure modes, checkpoints, resumable training and reproducibility."""

from __future__ import annotations

import io
import math
import re
import warnings

import normflows as nf
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from torch import nn

from pyro_iresnet import (
    ConvergenceError,
    ConvergenceWarning,
    LipschitzMLP,
    LipschitzWarning,
    NonFiniteError,
    ResidualBlock,
    SpectralNormLinear,
    conditional_iresnet,
    conv_iresnet,
    iresnet,
    lipschitz_bound,
    logdet_error_bound,
    multiscale_iresnet,
    name_blocks,
)
from pyro_iresnet.errors import check_bool, check_positive_int, check_roulette_p
from pyro_iresnet.normflows import Residual

NAN = float("nan")


# -- bad input: (id, call, exception, message pattern naming the argument, the value and the rule) ----
BAD_ARGUMENTS = [
    ("coeff>1", lambda: iresnet(2, coeff=1.2), ValueError, r"coeff must be in \(0, 1\), got 1\.2"),
    ("coeff=1", lambda: iresnet(2, coeff=1.0), ValueError, r"coeff must be in \(0, 1\), got 1\.0"),
    ("coeff=0", lambda: iresnet(2, coeff=0.0), ValueError, r"coeff must be in \(0, 1\), got 0\.0"),
    ("coeff<0", lambda: iresnet(2, coeff=-0.5), ValueError, r"coeff must be in \(0, 1\), got -0\.5"),
    ("coeff=nan", lambda: iresnet(2, coeff=NAN), ValueError, r"coeff must be in \(0, 1\), got nan"),
    ("coeff-str", lambda: iresnet(2, coeff="0.9"), TypeError, r"coeff must be a float in \(0, 1\), got str"),
    ("coeff-layer", lambda: SpectralNormLinear(2, 2, coeff=1.5), ValueError, r"coeff must be in \(0, 1\), got 1\.5"),
    ("n_terms=0", lambda: iresnet(2, logdet="series", n_terms=0), ValueError, r"n_terms must be >= 1, got 0"),
    ("n_terms-float", lambda: iresnet(2, n_terms=2.5), TypeError, r"n_terms must be an int, got float"),
    ("max_iter=0", lambda: iresnet(2, max_iter=0), ValueError, r"max_iter must be >= 1, got 0"),
    ("max_iter<0", lambda: ResidualBlock(LipschitzMLP([2, 4, 2]), max_iter=-3), ValueError,
     r"max_iter must be >= 1, got -3"),
    ("logdet", lambda: iresnet(2, logdet="brute"), ValueError,
     r"logdet must be one of \('unbiased', 'series', 'exact'\), got 'brute'"),
    ("eval_logdet", lambda: iresnet(2, eval_logdet="fast"), ValueError, r"eval_logdet must be one of .*got 'fast'"),
    ("probe", lambda: iresnet(2, probe="uniform"), ValueError,
     r"probe must be one of \('gaussian', 'rademacher'\), got 'uniform'"),
    ("roulette", lambda: iresnet(2, roulette="binomial"), ValueError,
     r"roulette must be one of \('geometric', 'poisson'\), got 'binomial'"),
    ("inverse_method", lambda: iresnet(2, inverse_method="bisection"), ValueError,
     r"inverse_method must be one of \('fixed_point', 'anderson', 'newton'\), got 'bisection'"),
    ("hidden_dims=[]", lambda: iresnet(2, hidden_dims=[]), ValueError,
     r"hidden_dims must hold at least one hidden layer size, got \[\]"),
    ("hidden_dims=[0]", lambda: iresnet(2, hidden_dims=[16, 0]), ValueError,
     r"hidden_dims must hold positive ints, got \[16, 0\]"),
    ("hidden_dims<0", lambda: conditional_iresnet(2, 3, hidden_dims=[-4]), ValueError,
     r"hidden_dims must hold positive ints, got \[-4\]"),
    ("hidden_dims-int", lambda: iresnet(2, hidden_dims=16), TypeError,
     r"hidden_dims must be a sequence of ints, got int"),
    ("input_dim=0", lambda: iresnet(0), ValueError, r"input_dim must be >= 1, got 0"),
    ("nf-n_power_series", lambda: Residual(LipschitzMLP([2, 4, 2]), n_power_series=0), ValueError,
     r"n_power_series must be >= 1, got 0"),
    ("nf-geom_p", lambda: Residual(LipschitzMLP([2, 4, 2]), geom_p=1.5), ValueError,
     r"geom_p must be in \(0, 1\).*, got 1\.5"),
    ("nf-lamb", lambda: Residual(LipschitzMLP([2, 4, 2]), lamb=-1.0), ValueError,
     r"lamb must be a finite float > 0, got -1\.0"),
    ("nf-n_dist", lambda: Residual(LipschitzMLP([2, 4, 2]), n_dist="uniform"), ValueError,
     r"n_dist must be one of \('geometric', 'poisson'\), got 'uniform'"),
    ("fused+exact_trace", lambda: ResidualBlock(LipschitzMLP([2, 4, 2]), fused=True, exact_trace=True), ValueError,
     r"fused=True does not cover exact_trace=True"),
    ("context-to-plain-net", lambda: ResidualBlock(LipschitzMLP([2, 4, 2])).forward_and_logdet(
        torch.randn(3, 2), torch.randn(3, 1)), ValueError,
     r"residual block #\d+ got a context, but its net \(LipschitzMLP\) takes none"),
    ("context-to-plain-net-inverse", lambda: ResidualBlock(nn.Sequential(nn.Linear(2, 2))).inverse(
        torch.randn(3, 2), torch.randn(3, 1)), ValueError,
     r"residual block #\d+ got a context, but its net \(Sequential\) takes none"),
    # accepted before, failing (or silently meaning something else) later
    ("event_dim-vs-net", lambda: iresnet(2, event_dim=2), ValueError,
     r"event_dim=2 does not fit the net's event_shape \(2,\) \(LipschitzMLP takes inputs"),
    ("dims-int", lambda: LipschitzMLP(5), TypeError,
     r"dims must be a sequence of layer sizes, e\.g\. \[2, 64, 2\], got int"),
    ("bias-str", lambda: SpectralNormLinear(2, 2, bias="no"), TypeError, r"bias must be True or False, got 'no'"),
    ("factor_out-str", lambda: multiscale_iresnet((1, 4, 4), factor_out="no"), TypeError,
     r"factor_out must be True or False, got 'no'"),
    ("hidden_channels-float", lambda: conv_iresnet((2, 4, 4), hidden_channels=2.5), TypeError,
     r"hidden_channels must be an int or a sequence of ints, got float"),
    ("hidden_channels-0", lambda: conv_iresnet((2, 4, 4), hidden_channels=0), ValueError,
     r"hidden_channels must be >= 1, got 0"),
    ("error_bound-bool", lambda: logdet_error_bound(False, 5, 2), TypeError,
     r"lip must be a float in \[0, 1\), got bool"),
    ("error_bound-str", lambda: logdet_error_bound("0.5", 5, 2), TypeError,
     r"lip must be a float in \[0, 1\), got str"),
]


def test_numpy_scalars_are_accepted_where_python_numbers_are() -> None:
    """numpy ints for layer sizes and numpy booleans for fused were refused, unlike elsewhere."""
    import numpy as np

    assert len(iresnet(2, hidden_dims=[np.int64(8)]).block.net.layers) == 3
    assert ResidualBlock(LipschitzMLP([2, 4, 2]), fused=np.True_).fused is True
    assert conv_iresnet((2, 4, 4), hidden_channels=np.int64(4)) is not None


@pytest.mark.parametrize("make, error, pattern", [row[1:] for row in BAD_ARGUMENTS], ids=[r[0] for r in BAD_ARGUMENTS])
def test_bad_argument_names_argument_value_and_rule(make, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        make()


_FORWARD = r"x \(input to the forward map of residual block #\d+\)"
_INVERSE = r"y \(input to the inverse of residual block #\d+\)"
BAD_INPUTS = [
    ("last-dim", lambda t: t(torch.randn(5, 3)), ValueError,
     _FORWARD + r" must have shape \(\.\.\., 2\), got \(5, 3\)"),
    ("last-dim-inv", lambda t: t.inv(torch.randn(5, 3)), ValueError,
     _INVERSE + r" must have shape \(\.\.\., 2\), got \(5, 3\)"),
    ("scalar", lambda t: t(torch.tensor(1.0)), ValueError, _FORWARD + r" must have shape \(\.\.\., 2\), got \(\)"),
    ("int-dtype", lambda t: t(torch.ones(5, 2, dtype=torch.long)), TypeError,
     _FORWARD + r" must have a floating dtype, got torch\.int64"),
    ("dtype-mismatch", lambda t: t(torch.ones(5, 2, dtype=torch.float64)), TypeError,
     _FORWARD + r" has dtype torch\.float64 but the block's parameters are torch\.float32"),
    ("not-tensor", lambda t: t.inv([[0.0, 1.0]]), TypeError, _INVERSE + r" must be a torch\.Tensor, got list"),
    ("nan-forward", lambda t: t(torch.tensor([[NAN, 0.0], [1.0, 2.0]])), ValueError,
     _FORWARD + r" must be finite, got 1 NaN and 0 Inf entries"),
    ("inf-inverse", lambda t: t.inv(torch.tensor([[math.inf, 0.0], [-math.inf, 2.0]])), ValueError,
     _INVERSE + r" must be finite, got 0 NaN and 2 Inf entries"),
    ("nan-log-det", lambda t: t.log_abs_det_jacobian(torch.tensor([[NAN, 0.0]]), torch.zeros(1, 2)), ValueError,
     _FORWARD + r" must be finite, got 1 NaN"),
]


@pytest.mark.parametrize("call, error, pattern", [row[1:] for row in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS])
def test_bad_vector_input_says_which_and_what(call, error, pattern) -> None:
    t = iresnet(2, hidden_dims=[8])
    with pytest.raises(error, match=pattern):
        call(t)


def test_bad_image_input_names_event_shape() -> None:
    t = conv_iresnet((1, 4, 4), hidden_channels=4)
    with pytest.raises(ValueError, match=r"x \(input to the forward map .*\) must have shape \(\.\.\., 1, 4, 4\), "
                                         r"got \(2, 1, 4, 5\)"):
        t(torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"y \(input to the inverse .*\) must have shape \(\.\.\., 1, 4, 4\), "
                                         r"got \(2, 2, 4, 4\)"):
        t.inv(torch.randn(2, 2, 4, 4))


@pytest.mark.parametrize("context_shape", [(4,), (5, 2), ()], ids=["too-long", "too-short", "scalar"])
def test_conditional_rejects_context_of_wrong_shape(context_shape) -> None:
    t = conditional_iresnet(2, 3, hidden_dims=[8])
    expected = r"context must have shape \(\.\.\., 3\), got " + re.escape(str(context_shape))
    with pytest.raises(ValueError, match=expected):
        t.condition(torch.randn(context_shape))(torch.randn(5, 2))


def test_bad_input_leaves_state_untouched() -> None:
    t = iresnet(2, hidden_dims=[8])
    before = {k: v.clone() for k, v in t.state_dict().items()}
    for call in (lambda: t(torch.tensor([[NAN, 0.0]])), lambda: t.inv(torch.randn(3, 5))):
        with pytest.raises(ValueError):
            call()
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())


# -- failure modes -------------------------------------------------------------------------------------
def _break_lipschitz(t) -> None:
    """Overwrite the weights and the power-iteration buffers: with a unit u orthogonal to W v the
    estimate sigma = u^T W v is 0, so the normalisation no longer binds and the (scaled-up) raw weights
    are used as they are (a zero u would be noticed and restarted).

    The weights are written through ``.data`` after a call in ``eval()``: no optimiser step and no version
    change, so the layers see no new weight to settle (which would set u, v to the exact singular vectors
    and repair the constraint)."""
    t(torch.zeros(1, 2))
    with torch.no_grad():
        for layer in t.modules():
            if isinstance(layer, SpectralNormLinear):
                layer.weight.data.mul_(5.0)
                wv = layer.weight @ layer.v
                u = torch.ones_like(layer.u) - (torch.ones_like(layer.u) @ wv) / (wv @ wv) * wv
                layer.u.copy_(u / torch.linalg.vector_norm(u))


def test_broken_lipschitz_constraint_is_reported_and_the_inverse_is_loud() -> None:
    t = iresnet(2, hidden_dims=[16, 16], coeff=0.9).eval()
    assert lipschitz_bound(t) < 1
    _break_lipschitz(t)
    with pytest.warns(LipschitzWarning, match=r"certified Lip\(g\) = .* >= 1"):
        assert lipschitz_bound(t) >= 1
    y = 3 * torch.randn(8, 2)
    with pytest.warns(ConvergenceWarning, match=r"fixed-point inverse diverged to NaN/Inf in \d+ of 8 samples"):
        t.inv(y)
    assert not t.block.last_diagnostics.inverse.converged

    strict = iresnet(2, hidden_dims=[16, 16], coeff=0.9, strict=True).eval()
    _break_lipschitz(strict)
    with pytest.raises(ConvergenceError, match="diverged"):
        strict.inv(y)


def test_slow_inverse_warns_with_worst_residual_iterations_and_lipschitz_bound() -> None:
    t = iresnet(2, hidden_dims=[16], coeff=0.9, max_iter=2).eval()
    with torch.no_grad():
        t.residual_net.layers[-1].bias.fill_(1.0)  # g is far from 0: two iterations cannot reach 1e-6
    with pytest.warns(ConvergenceWarning, match=r"did not converge in 2 iterations: worst residual .*Lipschitz "
                                                r"bound of g: 0\.\d+"):
        t.inv(torch.randn(16, 2))


def _pyro_flow(n_blocks: int, **options):
    blocks = [iresnet(2, hidden_dims=[8], **options) for _ in range(n_blocks)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    return blocks, dist.TransformedDistribution(base, [T.ComposeTransform(blocks).inv])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_nonfinite_log_det_during_training_names_the_block(fused) -> None:
    blocks, flow = _pyro_flow(3, fused=fused)
    names = name_blocks(flow)
    assert names == [f"{k} of 3 (transforms.0.{k}.block)" for k in range(3)]
    with torch.no_grad():  # what an absurd learning rate does to one block's weights
        blocks[1].residual_net.layers[0].weight[0, 0] = NAN
    data = torch.randn(32, 2)
    # log_prob runs the inverse transform, i.e. the blocks' explicit maps from the last to the first:
    # block 2 is fine, block 1 produces the NaN and is named, block 0 never sees it.
    with pytest.raises(NonFiniteError, match=r"log-det of residual block 1 of 3 \(transforms\.0\.1\.block\) is not "
                                             r"finite in 32 of 32 samples"):
        flow.log_prob(data)


def test_absurd_learning_rate_is_caught_in_the_next_step() -> None:
    blocks, flow = _pyro_flow(2)
    optimizer = torch.optim.SGD(torch.nn.ModuleList(blocks).parameters(), lr=1e36)
    data = 3 * torch.randn(64, 2)
    loss = -flow.log_prob(data).mean()
    loss.backward()
    optimizer.step()
    with pytest.raises(NonFiniteError, match=r"residual block #\d+ is not finite"):
        flow.log_prob(data)


def test_normflows_model_names_its_blocks() -> None:
    flows = [Residual(LipschitzMLP([2, 8, 2])), nf.flows.ActNorm(2), Residual(LipschitzMLP([2, 8, 2]))]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), flows)
    assert name_blocks(model) == ["0 of 2 (flows.0.block)", "1 of 2 (flows.2.block)"]
    with torch.no_grad():
        flows[2].block.net.layers[0].bias.fill_(math.inf)
    with pytest.raises(NonFiniteError, match=r"residual block 1 of 2 \(flows\.2\.block\)"):
        model.forward_kld(torch.randn(8, 2))


# -- checkpoints ---------------------------------------------------------------------------------------
def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_whole_pyro_flow_saves_and_loads() -> None:
    blocks, flow = _pyro_flow(3, logdet="exact")
    _ = [b.inv for b in blocks]  # weakrefs to inverses exist: pickling must still work
    data = torch.randn(16, 2)
    loaded = _roundtrip(flow)
    assert torch.equal(loaded.log_prob(data), flow.log_prob(data))
    with torch.no_grad():
        torch.manual_seed(3)
        z = flow.sample((4,))
        torch.manual_seed(3)
        assert torch.equal(loaded.sample((4,)), z)


def test_conditional_transform_saves_and_loads() -> None:
    t = conditional_iresnet(2, 3, hidden_dims=[8], logdet="exact").eval()
    context, x = torch.randn(3), torch.randn(5, 2)
    loaded = _roundtrip(t)
    assert torch.equal(loaded.condition(context)(x), t.condition(context)(x))


def test_whole_normflows_model_saves_and_loads() -> None:
    flows = [Residual(nf.nets.LipschitzMLP([2, 8, 8, 2], init_zeros=False), brute_force=True), nf.flows.ActNorm(2)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), flows)
    data = torch.randn(16, 2)
    loaded = _roundtrip(model)
    assert torch.equal(loaded.log_prob(data), model.log_prob(data))


def test_state_dict_into_fresh_objects_without_dummy_forward() -> None:
    torch.manual_seed(0)
    source = [iresnet(2, hidden_dims=[8], logdet="exact") for _ in range(2)]
    torch.optim.SGD(torch.nn.ModuleList(source).parameters(), lr=0.1).zero_grad()
    state = _roundtrip(torch.nn.ModuleList(source).state_dict())
    torch.manual_seed(1)  # different initial weights and power-iteration vectors
    fresh = torch.nn.ModuleList([iresnet(2, hidden_dims=[8], logdet="exact") for _ in range(2)])
    fresh.load_state_dict(state)
    x = torch.randn(8, 2)
    for a, b in zip(source, fresh):
        a.eval(), b.eval()
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.log_abs_det_jacobian(x, a(x)), b.log_abs_det_jacobian(x, b(x)))
        assert torch.equal(a.inv(x), b.inv(x))


def test_pyro_param_store_save_and_load(tmp_path) -> None:
    pyro.clear_param_store()
    source = iresnet(2, hidden_dims=[8], logdet="exact").eval()
    with torch.no_grad():  # weights the fresh module's power-iteration vectors know nothing about
        for p in source.parameters():
            p.mul_(3.0)
    x = torch.randn(8, 2)
    expected_y = source(x)
    expected_x = source.inv(expected_y.clone())  # a new tensor: solved, not served from the cache
    state = {k: v.clone() for k, v in source.state_dict().items()}
    pyro.module("flow", source)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()

    torch.manual_seed(9)
    fresh = iresnet(2, hidden_dims=[8], logdet="exact").eval()
    pyro.get_param_store().load(tmp_path / "params.pt")
    pyro.module("flow", fresh, update_module_params=True)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), fresh.parameters()))
    # The param store holds parameters only: the layers notice the swapped-in Parameters and re-converge
    # their power iteration, so the normalisation (and the certificate) hold without the buffers ...
    fresh(x)
    for layer in fresh.modules():
        if isinstance(layer, SpectralNormLinear):
            exact = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
            assert abs(float(layer.sigma_estimate().detach()) / float(exact) - 1) < 1e-5
    assert lipschitz_bound(fresh) < 1
    # ... and with a state_dict loaded before or after pyro.module the outputs are bit-identical to
    # the saved model's.
    for state_first in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(9)
        fresh = iresnet(2, hidden_dims=[8], logdet="exact").eval()
        if state_first:
            fresh.load_state_dict(state)
        pyro.get_param_store().load(tmp_path / "params.pt")
        pyro.module("flow", fresh, update_module_params=True)
        if not state_first:
            fresh.load_state_dict(state)
        assert torch.equal(fresh(x), expected_y) and torch.equal(fresh.inv(expected_y.clone()), expected_x)
    pyro.clear_param_store()


# -- resume and reproducibility ------------------------------------------------------------------------
def _train_state(seed: int = 0) -> tuple[list, torch.optim.Optimizer, dist.TransformedDistribution]:
    torch.manual_seed(seed)
    blocks, flow = _pyro_flow(2, logdet="unbiased")  # the roulette and the probes consume torch's RNG
    optimizer = torch.optim.Adam(torch.nn.ModuleList(blocks).parameters(), lr=1e-2)
    return blocks, optimizer, flow


def _steps(blocks, optimizer, flow, n: int) -> None:
    for _ in range(n):
        data = torch.randn(32, 2) * torch.tensor([2.0, 0.5])
        optimizer.zero_grad()
        (-flow.log_prob(data).mean()).backward()
        optimizer.step()


def test_resume_from_checkpoint_is_bit_identical() -> None:
    blocks, optimizer, flow = _train_state()
    _steps(blocks, optimizer, flow, 6)
    uninterrupted = torch.nn.ModuleList(blocks).state_dict()

    blocks, optimizer, flow = _train_state()
    _steps(blocks, optimizer, flow, 3)
    checkpoint = _roundtrip({
        "model": torch.nn.ModuleList(blocks).state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    })
    torch.manual_seed(123)  # the interruption: a fresh process with other RNG state and other weights
    resumed, resumed_optimizer, resumed_flow = _train_state(seed=7)
    torch.nn.ModuleList(resumed).load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    _steps(resumed, resumed_optimizer, resumed_flow, 3)

    final = torch.nn.ModuleList(resumed).state_dict()
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_identical_seeds_give_identical_draws_probes_and_inverses() -> None:
    def run() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(42)
        t = iresnet(3, hidden_dims=[8], logdet="unbiased", n_probes=2)
        x = torch.randn(16, 3)
        y = t(x)
        logdet = t.log_abs_det_jacobian(x, y + 0)  # a different pair: a fresh estimator draw
        return logdet, t.inv(y + 0.1), t.block.last_diagnostics.inverse.residual

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_float64_end_to_end() -> None:
    blocks = [iresnet(2, hidden_dims=[8], logdet="unbiased").to(torch.float64) for _ in range(2)]
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)).to_event(1)
    flow = dist.TransformedDistribution(base, [T.ComposeTransform(blocks).inv])
    optimizer = torch.optim.Adam(torch.nn.ModuleList(blocks).parameters(), lr=1e-2)
    data = torch.randn(32, 2, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimizer.step()
    assert loss.dtype == torch.float64
    assert all(p.dtype == torch.float64 for b in blocks for p in b.parameters())
    for b in blocks:
        b.eval()
    with torch.no_grad():
        sample = flow.sample((8,))
        assert sample.dtype == torch.float64
        z = T.ComposeTransform(blocks).inv(sample)
        assert (T.ComposeTransform(blocks)(z) - sample).abs().max() < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lipschitz_bound(flow) < 1


def test_eval_settles_power_iteration_after_the_weights_changed() -> None:
    t = iresnet(2, hidden_dims=[16, 16], coeff=0.9).to(torch.float64)
    layers = [m for m in t.modules() if isinstance(m, SpectralNormLinear)]

    def worst_relative_gap() -> float:
        with torch.no_grad():
            return max(1 - float(m.sigma_estimate()) / float(torch.linalg.matrix_norm(m.weight, ord=2))
                       for m in layers)

    with torch.no_grad():  # a large optimiser step: the power-iteration vectors are now stale
        for p in t.parameters():
            p.add_(torch.randn_like(p))
    assert worst_relative_gap() > 1e-3
    x = torch.randn(8, 2, dtype=torch.float64)
    t.eval()
    y = t(x)
    assert worst_relative_gap() < 1e-6
    assert lipschitz_bound(t) <= 0.9**3 * (1 + 1e-5)
    u = [m.u.clone() for m in layers]
    assert torch.equal(t(x), y) and all(torch.equal(m.u, a) for m, a in zip(layers, u))  # settled once


# -- corrupted weights and state between calls ---------------------------------------------------------
def test_nan_weight_leaves_power_iteration_intact_and_restoring_the_weight_repairs_the_block() -> None:
    torch.manual_seed(0)
    t = iresnet(2, hidden_dims=[8])
    layer = t.residual_net.layers[0]
    x = torch.randn(16, 2)
    good = layer.weight.detach().clone()
    buffers = layer.u.clone(), layer.v.clone()
    with torch.no_grad():
        layer.weight[0, 0] = NAN  # what an absurd learning rate does
    with pytest.raises(NonFiniteError, match="log-det of residual block"):
        t.block.forward_and_logdet(x)
    assert torch.equal(layer.u, buffers[0]) and torch.equal(layer.v, buffers[1])  # not overwritten with NaN
    t.eval()
    with pytest.raises(NonFiniteError, match=r"weight of SpectralNormLinear\(.*\) holds NaN/Inf"):
        t(x)
    with torch.no_grad():
        layer.weight.copy_(good)
    for mode in (t.eval, t.train):
        mode()
        _, logdet = t.block.forward_and_logdet(x)
        assert bool(torch.isfinite(logdet).all())
    assert lipschitz_bound(t) < 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_an_optimizer_step_between_forward_and_backward(fused: bool) -> None:
    """Another model's optimiser step between a forward and its backward makes the next forward run a
    power step; the first forward's graph must not depend on the buffers it overwrites."""
    torch.manual_seed(0)
    block = ResidualBlock(LipschitzMLP([2, 16, 2], coeff=0.9), logdet="series", n_terms=3, fused=fused)
    other = torch.nn.Linear(2, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    first = sum(t.sum() for t in block.forward_and_logdet(torch.randn(4, 2)))
    other(torch.randn(3, 2)).sum().backward()
    other_optimizer.step()
    second = sum(t.sum() for t in block.forward_and_logdet(torch.randn(4, 2)))
    (first + second).backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("options", [dict(logdet="exact", fused=False), dict(exact_trace=True)],
                         ids=["generic-exact", "exact-trace"])
def test_swapped_in_weight_parameter_in_training_mode(options: dict) -> None:
    """``pyro.module(..., update_module_params=True)`` swaps in new Parameters: the layer re-converges
    its power iteration before the call, not inside the log-det's ``torch.func`` transform."""
    torch.manual_seed(0)
    t = iresnet(2, hidden_dims=[8], **options)
    layer = t.residual_net.layers[0]
    layer.weight = torch.nn.Parameter(3 * layer.weight.detach())
    _, logdet = t.block.forward_and_logdet(torch.randn(4, 2))
    assert bool(torch.isfinite(logdet).all())
    exact = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    assert abs(float(layer.sigma_estimate().detach()) / exact - 1) < 1e-5


def test_bool_is_refused_where_a_real_is_expected() -> None:
    """p=True would silently become p=1.0. The docstrings say bool is refused (TypeError)."""
    with pytest.raises(TypeError, match="p must be a float in"):
        check_roulette_p("p", True)
    with pytest.raises(TypeError, match="p must be a float in"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), p=True)
    with pytest.raises(TypeError, match="lam must be a finite float"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), lam=True)


def test_bool_is_refused_where_an_int_is_expected() -> None:
    """n_terms=True would silently become 1."""
    with pytest.raises(TypeError, match="n_terms must be an int, got bool"):
        check_positive_int("n_terms", True)
    with pytest.raises(TypeError, match="n_terms must be an int, got bool"):
        ResidualBlock(LipschitzMLP([2, 8, 2]), n_terms=True)


def test_numpy_bools_are_accepted_as_switches() -> None:
    """The docstring accepts numpy booleans."""
    assert check_bool("strict", np.bool_(True)) is True
    block = ResidualBlock(LipschitzMLP([2, 8, 2]), strict=np.True_, neumann_grad=np.False_)
    assert block.strict is True and block.neumann_grad is False


def test_name_blocks_counts_a_block_reached_twice_once() -> None:
    """A block reachable along two paths is counted once: it is block 0 of 1, named by one of its
    paths."""
    from pyro_iresnet import iresnet, name_blocks

    t = iresnet(2)
    names = name_blocks([t, t])
    assert names == [t.block.name]
    assert names[0] in ("0 of 1 (0.block)", "0 of 1 (1.block)")
