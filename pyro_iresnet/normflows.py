r"""normflows adapter: ``Residual``, a drop-in replacement for ``normflows.flows.Residual``.

Switching is a one-line import change::

    from pyro_iresnet.normflows import Residual   # instead of: from normflows.flows import Residual

Every constructor argument of ``normflows.flows.Residual`` keeps its meaning; the core's options
(``logdet``, ``atol``, ``inverse_method``, ...) pass through and override. Importing this module
also teaches :func:`~pyro_iresnet.lipschitz_bound` to certify normflows' Lipschitz nets
(``InducedNormLinear``, ``InducedNormConv2d``, ``Swish``, ``LipschitzMLP``, ``LipschitzCNN``).
This is the only module of the package that imports normflows.

References:
    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735

    normflows: A PyTorch Package for Normalizing Flows (Stimper et al., 2023),
    https://arxiv.org/abs/2302.12014
"""

from __future__ import annotations

__all__ = ["Residual"]

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import MethodType
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from normflows.flows import Flow
from normflows.nets.lipschitz import InducedNormConv2d, InducedNormLinear, LipschitzCNN, LipschitzMLP, Swish
from torch import Tensor, nn

from .block import ResidualBlock, _eager_in_parameter_dtype
from .conv import conv_operator_norm
from .errors import check_choice, check_positive_finite, check_positive_int, check_roulette_p
from .fused import FusedMLP, _normalization, fused_mlp, supports_fused
from .lipschitz import LipschitzMLP as CoreLipschitzMLP
from .lipschitz import _tensor_state, _version, lipschitz_bound, register_lipschitz_rule

_INDUCED_NORM_LAYERS = (InducedNormLinear, InducedNormConv2d)
# The weight state (see ``_tensor_state``) each induced-norm layer's power iteration was last
# refreshed for, kept per layer so that layers shared by several ``Residual``s are refreshed once.
_REFRESHED_FOR: WeakKeyDictionary[nn.Module, tuple[int, int, int]] = WeakKeyDictionary()
# normflows.flows.Residual's state_dict entries that have no counterpart here (estimator settings,
# always constructor arguments, and the roulette's running statistics).
_NORMFLOWS_ONLY_KEYS = ("geom_p", "lamb", "last_n_samples", "last_firmom", "last_secmom")


def _event_dim(net: nn.Module) -> int:
    """Event dimensions of ``net``'s input: from ``event_shape``, else 3 for 2-d convolutions
    (``kernel_size`` of length 2), else 1."""
    shape = getattr(net, "event_shape", None)
    if shape is not None:
        return len(shape)
    for module in net.modules():
        kernel_size = getattr(module, "kernel_size", None)
        if isinstance(kernel_size, tuple):
            return len(kernel_size) + 1
    return 1


def _per_batch_element(logdet: Tensor, z: Tensor) -> Tensor:
    """The block's log-dets (one per vector along ``z``'s last axis, see ``Residual._prepare``)
    summed to one per batch element."""
    return logdet.flatten(1).sum(1) if logdet.dim() > 1 else logdet


def _check_first_layer_input(layer: InducedNormLinear | InducedNormConv2d, z: Tensor) -> None:
    """A clear error for an input the first layer of normflows' ``LipschitzMLP`` / ``LipschitzCNN``
    cannot take (their own error names a matmul or a convolution)."""
    if isinstance(layer, InducedNormLinear):
        dim, wanted, expected = -1, layer.in_features, f"(batch, {layer.in_features})"
    else:
        dim, wanted, expected = -3, layer.in_channels, f"(batch, {layer.in_channels}, H, W)"
    if z.shape[dim] != wanted:
        raise ValueError(
            f"z must have shape {expected} for the net's first layer ({type(layer).__name__}), got {tuple(z.shape)}"
        )


def _check_lamb(value: float) -> float:
    """The Poisson roulette's rate, checked under normflows' name: a finite real number (numpy
    scalars included, ``bool`` refused) ``> 0``, returned as a Python float."""
    return check_positive_finite("lamb", value)


def _block_options(
    reduce_memory: bool,
    geom_p: float,
    lamb: float,
    n_power_series: int | None,
    exact_trace: bool,
    brute_force: bool,
    n_samples: int,
    n_exact_terms: int,
    n_dist: str,
) -> dict[str, Any]:
    """normflows' arguments as :class:`~pyro_iresnet.ResidualBlock` options (validated under
    normflows' names, so errors name the argument the user passed)."""
    check_roulette_p("geom_p", geom_p)
    _check_lamb(lamb)
    if n_power_series is not None:
        check_positive_int("n_power_series", n_power_series)
    check_positive_int("n_samples", n_samples)
    check_positive_int("n_exact_terms", n_exact_terms, minimum=0)
    check_choice("n_dist", n_dist, ("geometric", "poisson"))
    if brute_force:
        logdet = "exact"
    elif n_power_series is not None:
        logdet = "series"
    else:
        logdet = "unbiased"
    options: dict[str, Any] = dict(
        logdet=logdet, n_exact_terms=n_exact_terms, roulette=n_dist, p=geom_p, lam=lamb,
        n_roulette_draws=n_samples, exact_trace=bool(exact_trace),  # normflows takes any truthy value
        neumann_grad=bool(reduce_memory), memory_efficient=bool(reduce_memory),
    )
    if n_power_series is not None:
        options["n_terms"] = n_power_series
    return options


def _normalized_weight(layer: InducedNormLinear | InducedNormConv2d, spatial: tuple[int, int]) -> Tensor:
    r"""The weight the layer applies, $W / \max(1, \tilde\sigma / c)$ with $\tilde\sigma = u^\top W v$,
    as normflows' ``compute_weight(update=False)`` but without writing the ``scale`` buffer.

    The graph holds copies of ``u`` and ``v``: a later power iteration (another layer sharing the
    net, or a new optimiser step) updates the buffers in place and must not invalidate a graph
    recorded before it."""
    sigma = _sigma_estimate(layer, layer.u.clone(), layer.v.clone(), spatial)
    return layer.weight / torch.clamp(sigma / layer.coeff, min=1.0)


def _sigma_estimate(
    layer: InducedNormLinear | InducedNormConv2d, u: Tensor, v: Tensor, spatial: tuple[int, int] = (1, 1)
) -> Tensor:
    r"""$\tilde\sigma = u^\top W v$ of the layer's operator (a convolution's at input size ``spatial``)."""
    weight = layer.weight
    if isinstance(layer, InducedNormLinear) or layer.kernel_size == (1, 1):
        return torch.dot(u, torch.mv(weight.reshape(weight.shape[0], -1), v))
    wv = F.conv2d(v.reshape(1, layer.in_channels, *spatial), weight, stride=layer.stride, padding=layer.padding)
    return torch.dot(u, wv.reshape(-1))


def _two_norm_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is an ``InducedNormLinear`` normalised in the 2-norm on both sides (the
    spectral norm; normflows' ``LipschitzMLP`` builds its layers so)."""
    return (type(layer) is InducedNormLinear and not torch.is_tensor(layer.domain)
            and layer.domain == 2 and layer.codomain == 2)


def _pure_forward(
    layer: InducedNormLinear | InducedNormConv2d, x: Tensor, spatial: tuple[int, int] = (1, 1)
) -> Tensor:
    weight = _normalized_weight(layer, spatial)
    if isinstance(layer, InducedNormLinear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


@torch.no_grad()
def _iteration_count(layer: InducedNormLinear | InducedNormConv2d) -> int | None:
    """The layer's power-iteration count per refresh: its own (``max_lipschitz_iter``), ``None``
    where its tolerance decides, and normflows' default 5 for a layer built with neither (which
    normflows leaves to ``update_lipschitz(model, n)``)."""
    if layer.n_iterations is not None:
        return layer.n_iterations
    return None if layer.atol is not None and layer.rtol is not None else 5


def _power_iteration(layer: InducedNormLinear | InducedNormConv2d) -> None:
    r"""normflows' ``compute_weight(update=True)``: its power iteration on ``u``, ``v`` and its
    ``scale`` buffer set to $\tilde\sigma = u^\top W v$.

    For an ``InducedNormLinear`` with the 2-norm on both sides and a fixed number of iterations
    (normflows' ``LipschitzMLP``) the same steps, $u \leftarrow W v / \|W v\|$,
    $v \leftarrow W^\top u / \|W^\top u\|$ with the norms clamped at 1e-12 as ``F.normalize`` does,
    run in fewer operations, straight into the buffers; any other layer calls ``compute_weight``."""
    n_iterations = _iteration_count(layer)
    if not _two_norm_linear(layer) or n_iterations is None:
        layer.compute_weight(update=True, n_iterations=n_iterations)
        return
    weight, u, v = layer.weight.detach(), layer.u, layer.v
    weight_t = weight.t()
    for _ in range(n_iterations):
        torch.mv(weight, v, out=u)
        u.div_(torch.linalg.vector_norm(u).clamp_min_(1e-12))
        torch.mv(weight_t, u, out=v)
        v.div_(torch.linalg.vector_norm(v).clamp_min_(1e-12))
    torch.dot(u, torch.mv(weight, v), out=layer.scale)


def _scale_is_current(layer: InducedNormLinear | InducedNormConv2d, spatial: tuple[int, int]) -> bool:
    r"""Whether the layer's ``scale`` buffer is $\tilde\sigma = u^\top W v$ for its current weight
    (to a relative 1e-6: float32 rounding, a change of dtype or device), as a refresh
    (:func:`_power_iteration`, normflows' ``update_lipschitz``) leaves it. An optimiser step
    since then changes $W$ and so this product. The library writes ``scale`` only in a refresh;
    normflows' own forward (the net called directly) also writes it, leaving its buffers as
    normflows would use them."""
    sigma = _sigma_estimate(layer, layer.u, layer.v, spatial)
    return bool((layer.scale - sigma).abs() <= 1e-6 * sigma.abs())


@contextmanager
def _scale_kept(layers: list[nn.Module]) -> Iterator[None]:
    """Within the context normflows' own forward and ``compute_weight`` may run on ``layers``: the
    ``scale`` they write, which tells stale buffers from fresh ones (:func:`_scale_is_current`), is
    restored afterwards."""
    kept = [(layer, layer.scale.clone()) for layer in layers]
    try:
        yield
    finally:
        for layer, scale in kept:
            layer.scale.copy_(scale)


# The input size each InducedNormConv2d learned, with the state of its ``spatial_dims`` buffer it
# was read from (storage and version: normflows writes it in place on the first forward, as does
# ``load_state_dict``), so that it is read from the device only when it changed.
_INPUT_SIZE_READ: WeakKeyDictionary[nn.Module, tuple[tuple[int, int], tuple[int, int]]] = WeakKeyDictionary()


def _input_sizes(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """The input size $(H, W)$ each ``InducedNormConv2d`` learned on its first forward (read from
    the device only after its buffer changed); ``(1, 1)`` for linears."""
    return [_input_size(layer) if isinstance(layer, InducedNormConv2d) else (1, 1) for layer in layers]


def _input_size(layer: InducedNormConv2d) -> tuple[int, int]:
    dims = layer.spatial_dims
    state = (dims.data_ptr(), _version(dims))
    kept = _INPUT_SIZE_READ.get(layer)
    if kept is not None and kept[0] == state and state[1] is not None:  # an inference tensor has no version
        return kept[1]
    size = tuple(int(s) for s in dims.tolist())
    _INPUT_SIZE_READ[layer] = (state, size)
    return size


@contextmanager
def _pure_forwards(layers: list[nn.Module], input_sizes: list[tuple[int, int]]) -> Iterator[None]:
    r"""Within the context, normflows' induced-norm layers compute the same output without
    writing their ``scale`` buffer (so that ``torch.func`` transforms, the exact log-det's batched
    Jacobian, can run them) and without rounding $\max(1, \tilde\sigma / c)$ to float32."""
    for layer, spatial in zip(layers, input_sizes):
        layer.forward = MethodType(partial(_pure_forward, spatial=spatial), layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _supports_fused_normflows_mlp(net: nn.Module) -> bool:
    """Whether ``net`` is normflows' ``LipschitzMLP`` (exactly; layers ``[Swish, InducedNormLinear]``
    repeated, with the 2-norm on both sides of every linear layer, as its constructor sets)."""
    if type(net) is not LipschitzMLP or not isinstance(net.net, nn.Sequential):
        return False
    layers = list(net.net)
    return (len(layers) >= 2 and len(layers) % 2 == 0 and all(map(_two_norm_linear, layers[1::2]))
            and all(type(m) is Swish for m in layers[0::2]))


def _fused_normflows_mlp(net: nn.Module) -> FusedMLP | None:
    r"""The fast path's parameters of normflows' ``LipschitzMLP`` (``None`` for any other net).

    Its layers compute $g(x) = \tilde W_L \phi(\tilde W_{L-1} \cdots \phi(\tilde W_1 \phi(x)))$ with
    normflows' ``Swish`` $\phi(z) = z\,\mathrm{sigmoid}(\mathrm{softplus}(\beta) z) / 1.1$, the
    library's LipSwish, also before the first linear layer: an identity first weight in
    :class:`~pyro_iresnet.fused.FusedMLP`. The normalised weights are those of the generic path
    (:func:`_normalized_weight`), read from the power-iteration buffers as they are."""
    if not _supports_fused_normflows_mlp(net):
        return None
    layers = list(net.net)
    linears = layers[1::2]
    with torch.no_grad():
        norms = [
            _normalization(m.weight, _sigma_estimate(m, m.u, m.v), m.u, m.v, m.coeff) for m in linears
        ]
    first = linears[0].weight
    identity = torch.eye(first.shape[1], dtype=first.dtype, device=first.device)
    betas = [F.softplus(m.beta) for m in layers[0::2]]
    return FusedMLP(
        [identity, *(n.normalized for n in norms)], [None, *(m.bias for m in linears)],
        ["lipswish"] * len(betas), betas, [None] * len(betas), [None, *norms],
    )


class _NormflowsBlock(ResidualBlock):
    r"""A :class:`~pyro_iresnet.ResidualBlock` whose every evaluation of $g$ runs normflows'
    induced-norm layers through their pure forward (:func:`_pure_forwards`): in the forward pass
    and at backward time alike (the memory-efficient estimator's re-run for per-sample weights,
    the adjoint solve of the inverse), so gradients are those of the $g$ whose values were
    returned. normflows' ``LipschitzMLP`` also takes the fast path (:func:`_fused_normflows_mlp`).
    Its ``state_dict`` and :func:`~pyro_iresnet.lipschitz_bound` are the core block's."""

    def __init__(self, net: nn.Module, **options: Any) -> None:
        super().__init__(net, **options)
        self.induced_norm_layers = [m for m in net.modules() if isinstance(m, _INDUCED_NORM_LAYERS)]
        self.input_sizes = _input_sizes(self.induced_norm_layers)

    def _normalization_buffers(self) -> list[tuple[nn.Module, str]]:
        return super()._normalization_buffers() + [(m, name) for m in self.induced_norm_layers for name in ("u", "v")]

    @staticmethod
    def _supports_fused(net: nn.Module) -> bool:
        return supports_fused(net) or _supports_fused_normflows_mlp(net)

    def _read_fused(self) -> FusedMLP | None:
        return fused_mlp(self.net) or _fused_normflows_mlp(self.net)

    def refresh_lipschitz(self) -> None:
        r"""The core refresh, then ``compute_weight(update=True)`` on each of normflows' induced-norm
        layers whose weight changed since its last refresh, by this block or by another one sharing
        the net (:func:`_power_iteration`). It runs after the block has checked the call's input.

        In ``eval()`` only where the buffers are stale for the current weight (the last optimiser
        step of a training run: what normflows' ``update_lipschitz`` after it would do), told by
        :func:`_scale_is_current`. So the model that trained and a checkpoint of it, saved before or
        after its first ``eval()`` call, apply the same weights, and fresh buffers are used as
        they are."""
        super().refresh_lipschitz()
        if not self.induced_norm_layers:  # e.g. the library's own LipschitzMLP
            return
        self.input_sizes = _input_sizes(self.induced_norm_layers)
        with torch.no_grad():
            for layer, spatial in zip(self.induced_norm_layers, self.input_sizes):
                version = _tensor_state(layer.weight)
                if _REFRESHED_FOR.get(layer) == version:
                    continue
                if self.training or not _scale_is_current(layer, spatial):
                    _power_iteration(layer)
                _REFRESHED_FOR[layer] = version

    def g(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """$g(x)$ as :meth:`ResidualBlock.g`, with normflows' layers in their pure forward."""
        if not self.induced_norm_layers:  # e.g. the library's own LipschitzMLP
            return super().g(x, context)
        with _pure_forwards(self.induced_norm_layers, self.input_sizes):
            return super().g(x, context)


class Residual(Flow):
    r"""Invertible residual layer $f(x) = x + g(x)$ for ``normflows``, over
    :class:`~pyro_iresnet.ResidualBlock`.

    With ``reverse=True`` (the default, as in normflows) the explicit map $f$ runs in
    :meth:`inverse` (the density direction: ``log_prob``, ``forward_kld``) and the fixed-point
    solve of $f^{-1}$ in :meth:`forward` (sampling); ``reverse=False`` swaps them. Both return
    ``(z', log_det)`` with ``log_det`` $= \log|\det \partial z'/\partial z|$ of shape ``(batch,)``:

    $$ \log|\det J_f(x)| = \log\det(I + J_g(x)), \qquad
       \log|\det J_{f^{-1}}(y)| = -\log\det(I + J_g(f^{-1}(y))). $$

    Argument mapping to the core (``**options`` override it): ``brute_force`` → ``logdet="exact"``
    (any dimension); else ``n_power_series`` not ``None`` → ``logdet="series"`` with
    ``n_terms=n_power_series``; else ``logdet="unbiased"``. ``n_dist`` → ``roulette``, ``geom_p`` →
    ``p``, ``lamb`` → ``lam``, ``n_samples`` → ``n_roulette_draws``, ``n_exact_terms`` and
    ``exact_trace`` unchanged, ``reduce_memory`` → ``neumann_grad`` and ``memory_efficient``.

    Differences from normflows, all deliberate: the returned log-det is always an estimate of the
    log-det (normflows returns a gradient surrogate with ``reduce_memory=True``); memory-efficient
    gradients are right for per-sample weighted losses; the inverse stops on the residual
    (default 1e-6 in float32) and warns with :class:`~pyro_iresnet.ConvergenceWarning` when it
    cannot reach it; the sampling direction is differentiated implicitly (no recorded iterations,
    works with frozen parameters); roulette draws come from torch's RNG; ``geom_p``/``lamb`` are
    plain attributes. In ``eval()`` normflows uses an unbiased estimate with 20 exact terms (exact
    only for 2-d inputs); this layer uses the core's ``eval_logdet`` (default ``"auto"``: exact up
    to ``exact_max_dim=64`` event entries, else the training estimator).

    With normflows' own nets (``normflows.nets.LipschitzMLP``/``LipschitzCNN``) the layer keeps
    their power iteration fresh in training mode (and in ``eval()`` after optimiser steps it has
    not seen, such as the last one of a training run): ``compute_weight(update=True)`` on each
    ``InducedNormLinear``/``InducedNormConv2d`` before the block runs, once per change of the
    weights (so a forward and an inverse between two optimiser steps see one operator).
    ``normflows.utils.update_lipschitz`` is no longer needed, and calling it stays harmless. Layers
    sharing one net (weight tying) refresh it once per change of its weights, whichever runs first.

    ``load_state_dict`` also accepts checkpoints of ``normflows.flows.Residual``: their
    ``iresblock.nnet.*`` entries load into the net, and their estimator entries (``geom_p``,
    ``lamb``, the roulette statistics ``last_n_samples``, ``last_firmom``, ``last_secmom``) are
    dropped, since here those settings are constructor arguments.

    Args:
        net: The residual function $g$ with $\mathrm{Lip}(g) < 1$: a
            :class:`~pyro_iresnet.LipschitzMLP`, a normflows ``LipschitzMLP``/``LipschitzCNN``, or
            any module mapping ``(batch, *event)`` to the same shape.
        reverse: Put the explicit map on the density (inverse) direction.
        reduce_memory: Neumann-series gradient and backward-in-forward (memory flat in the number
            of series terms).
        geom_p: Success probability of the geometric roulette, in $(0, 1)$.
        lamb: Rate of the Poisson roulette.
        n_power_series: Number of series terms for a truncated (biased) estimate, or ``None``
            for the unbiased Russian-roulette estimate.
        exact_trace: Series traces from the full Jacobian instead of Hutchinson probes.
        brute_force: Exact log-det (full Jacobian and ``slogdet``).
        n_samples: Roulette draws averaged per call.
        n_exact_terms: Series terms always computed by the roulette estimator.
        n_dist: ``"geometric"`` or ``"poisson"``.
        **options: :class:`~pyro_iresnet.ResidualBlock` options (``logdet``, ``eval_logdet``,
            ``atol``, ``rtol``, ``max_iter``, ``inverse_method``, ``n_probes``, ``event_dim``, ...);
            they take precedence over the mapped arguments. ``event_dim`` defaults to
            ``len(net.event_shape)``, else 3 for 2-d convolutional nets, else 1.

    Raises:
        TypeError: If ``net`` is not an ``nn.Module``, an argument has the wrong type (numpy
            scalars are accepted, as in normflows) or an input is not a floating tensor of the
            net's dtype.
        ValueError: If an argument is out of range (named as normflows names it) or an input does
            not have the ``(batch, *event)`` layout.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> import normflows as nf, torch
        >>> from pyro_iresnet import LipschitzMLP
        >>> flows = [Residual(LipschitzMLP([2, 32, 2], coeff=0.9)), nf.flows.ActNorm(2)]
        >>> model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), flows)
        >>> model.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        net: nn.Module,
        reverse: bool = True,
        reduce_memory: bool = True,
        geom_p: float = 0.5,
        lamb: float = 2.0,
        n_power_series: int | None = None,
        exact_trace: bool = False,
        brute_force: bool = False,
        n_samples: int = 1,
        n_exact_terms: int = 2,
        n_dist: str = "geometric",
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        block_options = dict(event_dim=_event_dim(net))
        block_options.update(_block_options(
            reduce_memory, geom_p, lamb, n_power_series, exact_trace, brute_force,
            n_samples, n_exact_terms, n_dist,
        ))
        block_options.update(options)
        self.reverse = bool(reverse)
        self.block = _NormflowsBlock(net, **block_options)
        self._convs_initialized = not any(isinstance(m, InducedNormConv2d) for m in self.block.induced_norm_layers)
        self._register_load_state_dict_pre_hook(_load_normflows_checkpoint, with_module=True)

    @property
    def geom_p(self) -> float:
        """Success probability of the geometric roulette (a plain float, never trained)."""
        return self.block.p

    @geom_p.setter
    def geom_p(self, value: float) -> None:
        self.block.p = check_roulette_p("geom_p", value)

    @property
    def lamb(self) -> float:
        """Rate of the Poisson roulette (a plain float, never trained)."""
        return self.block.lam

    @lamb.setter
    def lamb(self, value: float) -> None:
        self.block.lam = _check_lamb(value)

    @_eager_in_parameter_dtype
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""Sampling direction: $f^{-1}$ (fixed point) if ``reverse`` else $f$; returns
        ``(z', log_det)`` with ``log_det`` of shape ``(batch,)``.

        Args:
            z: Inputs of shape ``(batch, *event)``.

        Returns:
            ``z'`` of shape ``(batch, *event)`` and $\log|\det \partial z'/\partial z|$ of shape
            ``(batch,)``.

        Warns:
            ConvergenceWarning: The fixed point did not reach its tolerance in ``max_iter``.
        """
        return self._solve(z) if self.reverse else self._explicit(z)

    @_eager_in_parameter_dtype
    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""Density direction: $f$ if ``reverse`` else $f^{-1}$; returns ``(z', log_det)``.

        Args:
            z: Inputs of shape ``(batch, *event)``.

        Returns:
            ``z'`` of shape ``(batch, *event)`` and $\log|\det \partial z'/\partial z|$ of shape
            ``(batch,)``.

        Warns:
            ConvergenceWarning: The fixed point did not reach its tolerance in ``max_iter``.
        """
        return self._explicit(z) if self.reverse else self._solve(z)

    def _explicit(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._prepare(x)
        y, logdet = self.block.forward_and_logdet(x)
        return y, _per_batch_element(logdet, x)

    def _solve(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._prepare(y)
        x, logdet = self.block.inverse_and_logdet(y)
        return x, -_per_batch_element(logdet, y)

    def _prepare(self, z: Tensor) -> None:
        """Check the ``(batch, *event)`` layout (the block checks the rest, then refreshes normflows'
        power iteration: :meth:`_NormflowsBlock.refresh_lipschitz`).

        An MLP (normflows' or the library's ``LipschitzMLP``) maps each vector along the last axis
        on its own, so it also takes ``(batch, T, ..., D)`` as normflows' layer does: the event is
        then ``(T, ..., D)``, and its log-det the sum of the rows' (the Jacobian is block diagonal)."""
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        rows = self.block.event_dim == 1 and type(self.block.net) in (LipschitzMLP, CoreLipschitzMLP)
        if z.dim() != self.block.event_dim + 1 and not (rows and z.dim() > 2):
            raise ValueError(
                f"z must have shape (batch, *event) with {self.block.event_dim} event dimension(s), "
                f"got {tuple(z.shape)}"
            )
        if type(self.block.net) in (LipschitzMLP, LipschitzCNN):  # whose first induced-norm layer reads z
            _check_first_layer_input(self.block.induced_norm_layers[0], z)
        if not self._convs_initialized:  # their convs learn the input size on the first forward
            self.block._check_tensor(z, "z")  # so first the block's checks (it runs them on every call)
            with torch.no_grad():
                for layer in self.block.induced_norm_layers:  # which resize_s u and v: give them storage
                    for buffer in (layer.u, layer.v):  # that can be (not mapped from a checkpoint file)
                        if not buffer.untyped_storage().resizable():
                            buffer.set_(buffer.clone())
                loaded = [m for m in self.block.induced_norm_layers if bool(getattr(m, "initialized", True))]
                with _scale_kept(loaded):  # a loaded checkpoint's staleness stays visible
                    self.block.net(z[:1])
            self._convs_initialized = True

    def extra_repr(self) -> str:
        return f"reverse={self.reverse}"


def _load_normflows_checkpoint(module: Residual, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of :class:`Residual`: a ``normflows.flows.Residual`` entry
    ``iresblock.nnet.*`` is renamed to ``block.net.*`` and its normflows-only entries are dropped
    (``state_dict`` is ``load_state_dict``'s own copy, edited in place). The power-iteration
    vectors ``u``, ``v`` of a normflows ``InducedNormConv2d`` get new storage of the checkpoint's
    shapes: the layer resizes them to its input size on its first forward, which a
    freshly built layer has not seen; and the next call reads the input size again, which the
    checkpoint may predate."""
    old, new = prefix + "iresblock.nnet.", prefix + "block.net."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old):]] = state_dict.pop(key)
    for name in _NORMFLOWS_ONLY_KEYS:
        state_dict.pop(prefix + "iresblock." + name, None)
    for name, layer in module.block.net.named_modules():
        if isinstance(layer, InducedNormConv2d):
            module._convs_initialized = False  # the checkpoint may predate the input size: re-read it
            for buffer in ("u", "v"):
                saved = state_dict.get(f"{new}{name}.{buffer}" if name else f"{new}{buffer}")
                current = getattr(layer, buffer)
                if isinstance(saved, Tensor) and saved.shape != current.shape:
                    # new storage for the same tensor object (which DDP may hold), not resize_: the
                    # buffer may not be resizable (assigned from a torch.load(mmap=True) checkpoint)
                    with torch.no_grad():
                        current.set_(current.new_empty(saved.shape))


# -- lipschitz_bound rules for normflows' nets ------------------------------------------------
def _applied_weight(layer: InducedNormLinear | InducedNormConv2d) -> Tensor:
    """normflows' ``compute_weight(update=False)``, with its write to ``scale`` undone: a query must
    not make stale buffers look fresh."""
    with _scale_kept([layer]):
        return layer.compute_weight(update=False)


def _induced_norm_linear_bound(layer: InducedNormLinear) -> float:
    """Exact spectral norm of the weight the layer applies."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(_applied_weight(layer).double(), ord=2))


def _induced_norm_conv_bound(layer: InducedNormConv2d) -> float:
    """Exact operator norm of the convolution the layer applies, at its input size
    (:func:`~pyro_iresnet.conv.conv_operator_norm`)."""
    with torch.no_grad():
        if layer.kernel_size == (1, 1) and layer.padding == (0, 0):
            weight = _applied_weight(layer).reshape(layer.out_channels, layer.in_channels)
            return float(torch.linalg.matrix_norm(weight.double(), ord=2))
        k, padding = layer.kernel_size, layer.padding
        if layer.stride != (1, 1) or k[0] != k[1] or padding != (k[0] // 2,) * 2 or k[0] % 2 == 0:
            raise TypeError(
                "lipschitz_bound certifies InducedNormConv2d with stride 1 and 'same' padding (odd "
                f"square kernel, padding k // 2), got kernel_size={k}, stride={layer.stride}, "
                f"padding={padding}"
            )
        if not bool(layer.initialized):
            raise ValueError(
                "lipschitz_bound needs the input size of this InducedNormConv2d: run one forward "
                "pass of the model first"
            )
        height, width = (int(s) for s in layer.spatial_dims.tolist())
        weight = _applied_weight(layer)
        return conv_operator_norm(weight, (layer.in_channels, height, width), padding[0])


register_lipschitz_rule(InducedNormLinear, _induced_norm_linear_bound)
register_lipschitz_rule(InducedNormConv2d, _induced_norm_conv_bound)
register_lipschitz_rule(Swish, lambda m: 1.0)  # sup |d/dx x sigmoid(b x)| / 1.1 < 1.0999 / 1.1
register_lipschitz_rule(LipschitzMLP, lambda m: lipschitz_bound(m.net))
register_lipschitz_rule(LipschitzCNN, lambda m: lipschitz_bound(m.net))


# -- multi-scale image flows (images issue) ----------------------------------------------------
class _TransformFlow(Flow):
    """A normflows ``Flow`` over an image transform whose explicit direction is data -> latent:
    ``inverse(x)`` runs it, ``forward(z)`` runs its inverse; log-dets with normflows' signs."""

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.transform.inv(z)
        return x, -self.transform.log_abs_det_jacobian(x, z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.transform(x)
        return z, self.transform.log_abs_det_jacobian(x, z)


def multiscale_normalizing_flow(input_shape: tuple[int, int, int], **options: Any) -> nn.Module:
    r"""The model of :func:`~pyro_iresnet.multiscale_iresnet` as a ``normflows.NormalizingFlow``.

    Same layers, same options and the same density: a fixed standard normal base over
    ``input_shape`` and the data-to-latent stages (logit preprocessing, then the scales) as flows,
    so ``log_prob(x)`` / ``forward_kld(x)`` run only the explicit maps and ``sample`` runs the
    fixed-point inverses.

    Args:
        input_shape: $(C, H, W)$ of the data.
        **options: Arguments of :func:`~pyro_iresnet.multiscale_iresnet`.

    Returns:
        A ``normflows.NormalizingFlow``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> model = multiscale_normalizing_flow((1, 8, 8), hidden_channels=8, levels=17)
        >>> model.log_prob(17 * torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
    """
    from normflows import NormalizingFlow
    from normflows.distributions import DiagGaussian

    from .images import multiscale_iresnet

    encoder = multiscale_iresnet(input_shape, **options).encoder
    flows = [_TransformFlow(part) for part in reversed(encoder.parts)]
    return NormalizingFlow(DiagGaussian(tuple(int(s) for s in input_shape), trainable=False), flows)


__all__ += ["multiscale_normalizing_flow"]
