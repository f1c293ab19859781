r"""Pyro transforms over the residual block: ``InvertibleResidual`` and its conditional variant.

Orientation. ``t = iresnet(d)`` maps $x \mapsto y = x + g(x)$ explicitly; ``t.inv`` needs the
fixed-point solve. Hence:

* sampling and variational inference use ``t`` (explicit forward; the log-det computed in
  ``_call`` is cached, so SVI never needs the inverse);
* density estimation uses ``ComposeTransform(blocks).inv``, so that ``log_prob(data)`` runs only
  the explicit maps (and sampling runs the fixed point, differentiably by implicit gradients).

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = [
    "ConcatContextNet",
    "ConditionalInvertibleResidual",
    "ConditionedInvertibleResidual",
    "InvertibleResidual",
    "conditional_iresnet",
    "iresnet",
]

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from .block import ResidualBlock, _disable_dynamo
from .context import ConcatContextNet
from .errors import check_positive_int
from .lipschitz import LipschitzMLP, _settings_state, _tensor_state, _version

_NET_OPTIONS = ("coeff", "activation", "n_power_iterations")


def _pair_versions(x: Tensor, y: Tensor) -> tuple[int | None, int | None]:
    """The version counters of a pair whose log-det is kept: an in-place change of either moves one."""
    return _version(x), _version(y)


class _FreshCache:
    """torch's one-pair transform cache (``cache_size=1``), dropped when the state it was made in
    changes: the mode (``train()``/``eval()``, gradients recorded or not) or a tensor it depends
    on (a parameter updated in place, an optimiser step, also one writing through ``.data``,
    ``.to()``, or ``requires_grad_`` switched), or the cached input or output itself modified in
    place (torch's cache matches tensors by identity alone). So the same input tensor passed again
    after a training step, first under ``no_grad`` and then with gradients, after unfreezing the
    flow, or after ``x.add_(1)``, is computed afresh instead of served stale. It is also dropped
    when a setting of a layer or block changes anywhere (``layer.coeff``, ``block.atol``, see
    :func:`~pyro_iresnet.lipschitz._settings_changed`). The cache is not pickled (``torch.save``,
    ``copy.deepcopy``): a copy starts with none. Its bookkeeping runs eagerly under
    ``torch.compile`` (it reads version counters, on which compiled code would guard and recompile).

    Put it before the torch/Pyro ``Transform`` base class; ``_state_tensors`` and ``_training``
    say what the state is (by default the module's parameters and its ``training`` flag)."""

    _cached_state: tuple | None = None

    def _state_tensors(self) -> list[Tensor]:
        return list(self.parameters())

    def _training(self) -> bool:
        return self.training

    def _state(self) -> tuple:
        tensors = self._state_tensors()
        pair = [_version(t) for t in getattr(self, "_cached_x_y", ()) if isinstance(t, Tensor)]
        return (self._training(), torch.is_grad_enabled(), _settings_state(), *(_tensor_state(t) for t in tensors),
                *(t.requires_grad for t in tensors), *pair)

    @_disable_dynamo
    def _drop_stale_cache(self) -> None:
        if self._cached_state is not None and self._cached_state != self._state():
            self.clear_cache()

    @_disable_dynamo
    def __call__(self, x: Tensor) -> Tensor:
        self._drop_stale_cache()
        y = super().__call__(x)
        self._cached_state = self._state()
        return y

    @_disable_dynamo
    def _inv_call(self, y: Tensor) -> Tensor:
        self._drop_stale_cache()
        x = super()._inv_call(y)
        self._cached_state = self._state()
        return x

    def clear_cache(self) -> None:
        """Forget everything cached (the last pair and, where kept, its log-det); not needed after an
        optimiser step or a change of mode: see the class docstring."""
        for name, empty in self._cache_fields().items():
            setattr(self, name, empty)

    def __getstate__(self) -> dict[str, Any]:
        """The state without the cached tensors (the last batch's pair, a log-det with its graph),
        which would bloat ``torch.save`` and make ``copy.deepcopy`` fail on non-leaf tensors."""
        state = super().__getstate__()
        for name, empty in self._cache_fields().items():
            state[name] = empty
        return state

    def _cache_fields(self) -> dict[str, Any]:
        """The attributes holding cached tensors, with their empty values."""
        return {"_cached_x_y": (None, None), "_cached_state": None}


class _ResidualTransform(_FreshCache):
    """``_call``/``_inverse``/``log_abs_det_jacobian`` shared by the plain and conditioned transforms."""

    bijective = True
    sign = +1
    block: ResidualBlock
    _context: Tensor | None

    def _init_transform(self, event_dim: int) -> None:
        self._cached_logdet: tuple[Tensor, Tensor, Tensor, tuple] | None = None
        if event_dim != 1:
            self.domain = constraints.independent(constraints.real, event_dim)
            self.codomain = constraints.independent(constraints.real, event_dim)

    @property
    def event_dim(self) -> int:
        return self.block.event_dim

    @property
    def residual_net(self) -> nn.Module:
        return self.block.net

    def _state_tensors(self) -> list[Tensor]:
        """The block's parameters and the context."""
        return [*self.block.parameters(), *(() if self._context is None else (self._context,))]

    def _training(self) -> bool:
        return self.block.training

    def _call(self, x: Tensor) -> Tensor:
        y, logdet = self.block.forward_and_logdet(x, self._context)
        self._cached_logdet = (x, y, logdet, _pair_versions(x, y))
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        return self.block.inverse(y, self._context)

    @_disable_dynamo
    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """Log-det of ``x -> y``, shape = batch shape. The pair just produced by ``_call`` is served
        from a cache (the same estimator draw; whatever ``cache_size`` says, which is about the
        pair), unless either tensor was modified in place since; any other pair is estimated
        afresh at ``x``."""
        self._drop_stale_cache()
        cached = self._cached_logdet
        if cached is not None and cached[0] is x and cached[1] is y and cached[3] == _pair_versions(x, y):
            return cached[2]
        return self.block.logdet(x, self._context)

    def _cache_fields(self) -> dict[str, Any]:
        return {**super()._cache_fields(), "_cached_logdet": None}

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        self.block._check_shape(shape, f"inputs of residual block {self.block.name}")
        return torch.Size(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self.forward_shape(shape)


class InvertibleResidual(_ResidualTransform, TransformModule):
    r"""Pyro ``TransformModule`` for the i-ResNet block $y = x + g(x)$, $\mathrm{Lip}(g) < 1$.

    Explicit direction: $x \mapsto y$, with the log-det from the block's estimator (cached for the
    pair just produced). Inverse direction (``.inv``): fixed-point iteration with implicit
    gradients. Use ``t`` for sampling/VI and ``ComposeTransform(blocks).inv`` for density
    estimation (see the module docstring). In a ``TransformedDistribution``,

    $$ \log p_Y(y) = \log p_X(x) - \log\det(I + J_g(x)), \qquad y = x + g(x). $$

    ``domain = codomain = real_vector``; with ``event_dim=3`` (images, see
    :func:`~pyro_iresnet.conv_iresnet`) both are ``independent(real, 3)``.

    Caching (``cache_size=1``): ``log_abs_det_jacobian(x, y)`` on the pair just returned by ``t(x)``
    is the log-det drawn in that call (no second estimator draw); any other pair is estimated
    afresh at ``x``. Both the pair and its log-det are dropped once a parameter changes in place
    (an optimiser step) or moves, so no ``clear_cache()`` is needed between training steps, and
    when the mode (``train()``/``eval()``, gradients on/off) differs from the one they were made in.

    Args:
        net: The residual function $g$, e.g. :class:`~pyro_iresnet.LipschitzMLP`.
        cache_size: Pyro/torch transform cache size (1 keeps the last pair).
        **options: Options of :class:`~pyro_iresnet.ResidualBlock` (``logdet``, ``n_terms``,
            ``atol``, ``inverse_method``, ...).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> import pyro.distributions as dist
        >>> from pyro_iresnet import iresnet
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [iresnet(2)])
        >>> flow.log_prob(flow.sample((4,))).shape
        torch.Size([4])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, net: nn.Module, cache_size: int = 1, **options: Any) -> None:
        super().__init__(cache_size=cache_size)
        self.block = ResidualBlock(net, **options)
        self._context = None
        self._init_transform(self.block.event_dim)

    def __hash__(self) -> int:
        return super(nn.Module, self).__hash__()


class ConditionedInvertibleResidual(_ResidualTransform, Transform):
    r"""An :class:`InvertibleResidual` with a fixed context (from
    :meth:`ConditionalInvertibleResidual.condition`): $x \mapsto x + g(x, c)$ for the stored $c$.

    Args:
        block: The conditional block, shared with the :class:`ConditionalInvertibleResidual`.
        context: Context $c$ of shape ``(..., context_dim)``, broadcast against the batch shape.
        cache_size: Pyro/torch transform cache size (1 keeps the last pair).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> t = conditional_iresnet(2, 3).condition(torch.randn(3))
        >>> x = torch.randn(4, 2)
        >>> y = t(x)
        >>> torch.allclose(t.inv(y.clone()), x, atol=1e-4)  # a copy of y: a real solve, not the cache
        True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, block: ResidualBlock, context: Tensor, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.block = block
        self._context = context
        self._init_transform(block.event_dim)

    def _broadcast_batch(self, shape: torch.Size) -> torch.Size:
        """``shape`` with its batch part broadcast against the context's batch shape."""
        self.block._check_shape(shape, f"inputs of residual block {self.block.name}")
        event = shape[len(shape) - self.event_dim:]
        try:
            batch = torch.broadcast_shapes(shape[: len(shape) - self.event_dim], self._context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"residual block {self.block.name}: batch shape {tuple(shape[: len(shape) - self.event_dim])} does "
                f"not broadcast with context shape {tuple(self._context.shape)}"
            ) from None
        return torch.Size((*batch, *event))

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return self._broadcast_batch(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self._broadcast_batch(shape)


class ConditionalInvertibleResidual(ConditionalTransformModule):
    r"""Conditional i-ResNet block $y = x + g(x, c)$ with $\mathrm{Lip}_x(g) < 1$ for every context.

    For each context $c$ the map is an i-ResNet block in $x$, so

    $$ \log p(y \mid c) = \log p(x \mid c) - \log\det(I + J_{g(\cdot, c)}(x)). $$

    ``condition(c)`` returns a :class:`ConditionedInvertibleResidual` sharing this block.

    Args:
        net: Module called as ``net(x, context)``, e.g. :class:`ConcatContextNet`.
        **options: Options of :class:`~pyro_iresnet.ResidualBlock`.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> import pyro.distributions as dist
        >>> net = ConcatContextNet(LipschitzMLP([2 + 3, 16, 2], coeff=0.9), context_dim=3)
        >>> t = ConditionalInvertibleResidual(net, logdet="exact")
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow = dist.ConditionalTransformedDistribution(base, [t]).condition(torch.randn(3))
        >>> x = flow.sample((4,))
        >>> x.shape, flow.log_prob(x).shape
        (torch.Size([4, 2]), torch.Size([4]))
    """

    def __init__(self, net: nn.Module, **options: Any) -> None:
        super().__init__()
        self.block = ResidualBlock(net, **options)

    @property
    def residual_net(self) -> nn.Module:
        return self.block.net

    def condition(self, context: Tensor) -> ConditionedInvertibleResidual:
        """The transform at ``context`` (shape ``(..., context_dim)``), cached (``cache_size=1``)."""
        return ConditionedInvertibleResidual(self.block, context)


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    net_options = {k: options.pop(k) for k in _NET_OPTIONS if k in options}
    return net_options, options


def _hidden_dims(hidden_dims: Sequence[int] | None, input_dim: int) -> list[int]:
    """``hidden_dims`` checked (a non-empty sequence of positive ints), or the default two layers of
    ``max(64, 4 d)``."""
    if hidden_dims is None:
        return [max(64, 4 * input_dim)] * 2
    if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Sequence):
        raise TypeError(f"hidden_dims must be a sequence of ints, got {type(hidden_dims).__name__}")
    if not hidden_dims:
        raise ValueError("hidden_dims must hold at least one hidden layer size, got []")
    for size in hidden_dims:
        if isinstance(size, bool) or not isinstance(size, Integral) or size < 1:
            raise ValueError(f"hidden_dims must hold positive ints, got {list(hidden_dims)}")
    return list(hidden_dims)


def iresnet(input_dim: int, hidden_dims: Sequence[int] | None = None, **options: Any) -> InvertibleResidual:
    r"""An :class:`InvertibleResidual` with a :class:`~pyro_iresnet.LipschitzMLP` residual net.

    Args:
        input_dim: Event size $d$.
        hidden_dims: Hidden layer sizes (default two layers of ``max(64, 4 d)``).
        **options: ``coeff`` (default 0.97), ``activation``, ``n_power_iterations`` for the net;
            everything else goes to :class:`~pyro_iresnet.ResidualBlock`.

    Returns:
        The transform $x \mapsto x + g(x)$ with $g$ a ``LipschitzMLP([d, *hidden_dims, d])``,
        $\mathrm{Lip}(g) \lesssim c^{L}$ ($L$ = ``len(hidden_dims) + 1`` layers).

    Raises:
        TypeError: If ``input_dim`` is not an int (``bool`` included), or ``hidden_dims`` is not a
            sequence (e.g. ``hidden_dims=3``; a ``str`` does not count).
        ValueError: If ``input_dim`` is below 1, ``hidden_dims`` is empty or holds an entry that is
            not a positive int (e.g. ``[1.5]``, ``[0]``, ``[True]``), or an option is out of range.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> t = iresnet(3, coeff=0.9, logdet="exact")
        >>> t(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """
    check_positive_int("input_dim", input_dim)
    hidden = _hidden_dims(hidden_dims, input_dim)
    net_options, block_options = _split_options(dict(options))
    net = LipschitzMLP([input_dim, *hidden, input_dim], **net_options)
    return InvertibleResidual(net, **block_options)


def conditional_iresnet(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None, **options: Any
) -> ConditionalInvertibleResidual:
    r"""A :class:`ConditionalInvertibleResidual` with $g(x, c) = \mathrm{MLP}([x, c])$.

    Args:
        input_dim: Event size $d$.
        context_dim: Context size.
        hidden_dims: Hidden layer sizes (default two layers of ``max(64, 4 d)``).
        **options: As for :func:`iresnet`.

    Returns:
        The conditional transform $x \mapsto x + g(x, c)$ with $g$ a :class:`ConcatContextNet` over
        ``LipschitzMLP([d + context_dim, *hidden_dims, d])``.

    Raises:
        TypeError: If ``input_dim`` or ``context_dim`` is not an int, or ``hidden_dims`` is not a
            sequence.
        ValueError: If ``input_dim`` or ``context_dim`` is below 1, ``hidden_dims`` is empty or holds
            an entry that is not a positive int, or an option is out of range.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> t = conditional_iresnet(2, 3)
        >>> t.condition(torch.randn(3))(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """
    check_positive_int("input_dim", input_dim)
    check_positive_int("context_dim", context_dim)
    hidden = _hidden_dims(hidden_dims, input_dim)
    net_options, block_options = _split_options(dict(options))
    mlp = LipschitzMLP([input_dim + context_dim, *hidden, input_dim], **net_options)
    return ConditionalInvertibleResidual(ConcatContextNet(mlp, context_dim), **block_options)
