r"""Image flows: convolutional i-ResNet blocks, squeeze, actnorm, logit preprocessing, multi-scale.

Every transform here is a Pyro ``TransformModule`` on images $(C, H, W)$ (``event_dim = 3``) with
``cache_size=1``, so ``ComposeTransform`` reuses the values and log-dets of the pass just run;
each cache is dropped when the mode (``train()``/``eval()``, gradients on/off) or a parameter
changes, so the same input passed again after an optimiser step is computed afresh.
:func:`multiscale_iresnet` stacks them Glow-style: per scale a :class:`Squeeze`, ``n_blocks`` pairs
of :class:`ActNorm` + :func:`conv_iresnet`, then (optionally) half of the channels are factored out
and the rest go to the next scale.

Bits per dimension. With $K$ intensity levels (sklearn digits: $K = 17$, values $0..16$) the
dequantised data are $v = x + u$, $u \sim U[0, 1)^D$, and :class:`LogitTransform` maps $v$ to
$\operatorname{logit}(\alpha + (1 - 2\alpha) v / K)$, including that map's log-det. The model's
``log_prob(v)`` is therefore a density on the integer scale, and

$$ \mathrm{bpd} = -\frac{\log p(v)}{D \ln 2} \ \ge\ -\frac{\log P(x)}{D \ln 2}
   \quad\text{(in expectation over } u\text{)}, $$

an upper bound on the discrete model's bits/dim, comparable with $\log_2 K$ (a uniform model).
Data scaled to $[0, 1]$ first (as for 8-bit images with $K = 256$) would shift it by
$\log_2 K$; :func:`bits_per_dim` takes the log-density on the integer scale.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018),
    https://arxiv.org/abs/1807.03039

    Density estimation using Real NVP (Dinh et al., 2017), https://arxiv.org/abs/1605.08803
"""

from __future__ import annotations

__all__ = [
    "ActNorm",
    "FactorOut",
    "LogitTransform",
    "MultiscaleTransform",
    "Squeeze",
    "Unsqueeze",
    "bits_per_dim",
    "conv_iresnet",
    "dequantize",
    "multiscale_iresnet",
]

import math
from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Any

import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from .block import _LOW_PRECISION, _autocast_enabled, _disable_dynamo
from .conv import LipschitzCNN, _check_shape
from .errors import (
    _check_floating_tensor,
    _check_real,
    check_bool,
    check_finite,
    check_positive_finite,
    check_positive_int,
    check_unit_interval,
)
from .pyro import InvertibleResidual, _FreshCache, _pair_versions, _split_options

_IMAGE = constraints.independent(constraints.real, 3)


def _check_image(name: str, x: Tensor, channels: int | None = None) -> None:
    _check_floating_tensor(name, x)  # integer pixels included: dequantize them first
    if x.dim() < 3 or (channels is not None and x.shape[-3] != channels):
        expected = f"(..., {channels}, H, W)" if channels is not None else "(..., C, H, W)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def _space_to_depth(x: Tensor) -> Tensor:
    _check_image("x", x)
    *batch, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Squeeze needs an even height and width, got shape {tuple(x.shape)}")
    x = x.reshape(*batch, c, h // 2, 2, w // 2, 2)
    x = x.movedim((-5, -3, -1), (-5, -4, -3))  # (..., c, 2, 2, h/2, w/2)
    return x.reshape(*batch, 4 * c, h // 2, w // 2)


def _depth_to_space(y: Tensor) -> Tensor:
    _check_image("y", y)
    *batch, c, h, w = y.shape
    if c % 4:
        raise ValueError(f"Unsqueeze needs a channel count divisible by 4, got shape {tuple(y.shape)}")
    y = y.reshape(*batch, c // 4, 2, 2, h, w).movedim((-4, -3), (-3, -1))  # (..., c/4, h, 2, w, 2)
    return y.reshape(*batch, c // 4, 2 * h, 2 * w)


class Squeeze(_FreshCache, TransformModule):
    r"""Space-to-depth $(C, H, W) \to (4C, H/2, W/2)$: each $2\times2$ patch becomes 4 channels
    (channel $4c + 2i + j$ holds pixel $(2h + i, 2w + j)$ of channel $c$, as in normflows). A
    permutation: exact inverse, log-det 0.

    Raises:
        ValueError: If the input is not ``(..., C, H, W)`` with even $H$ and $W$.

    References:
        Density estimation using Real NVP (Dinh et al., 2017), https://arxiv.org/abs/1605.08803

    Examples:
        >>> Squeeze()(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 4, 4, 4])
    """

    domain = _IMAGE
    codomain = _IMAGE
    bijective = True

    def __init__(self, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)

    def _call(self, x: Tensor) -> Tensor:
        return _space_to_depth(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return _depth_to_space(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-3])

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        if len(shape) < 3 or shape[-1] % 2 or shape[-2] % 2:
            raise ValueError(f"Squeeze needs a shape (..., C, H, W) with even H and W, got {tuple(shape)}")
        *batch, c, h, w = shape
        return torch.Size((*batch, 4 * c, h // 2, w // 2))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        if len(shape) < 3 or shape[-3] % 4:
            raise ValueError(
                f"Squeeze's inverse needs a shape (..., C, H, W) with C a multiple of 4, got {tuple(shape)}"
            )
        *batch, c, h, w = shape
        return torch.Size((*batch, c // 4, 2 * h, 2 * w))


class Unsqueeze(Squeeze):
    r"""Depth-to-space $(4C, H, W) \to (C, 2H, 2W)$, the inverse of :class:`Squeeze`.

    Pixel $(2h + i, 2w + j)$ of channel $c$ is read from channel $4c + 2i + j$ at $(h, w)$; a
    permutation with log-det 0.

    Raises:
        ValueError: If the input is not ``(..., C, H, W)`` with $C$ divisible by 4.

    References:
        Density estimation using Real NVP (Dinh et al., 2017), https://arxiv.org/abs/1605.08803

    Examples:
        >>> x = torch.randn(5, 1, 8, 8)
        >>> Unsqueeze()(torch.randn(5, 4, 4, 4)).shape
        torch.Size([5, 1, 8, 8])
        >>> torch.equal(Unsqueeze()(Squeeze()(x)), x)
        True
    """

    def _call(self, x: Tensor) -> Tensor:
        return _depth_to_space(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return _space_to_depth(y)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return super().inverse_shape(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return super().forward_shape(shape)


class ActNorm(_FreshCache, TransformModule):
    r"""Per-channel affine map $y_{c,h,w} = e^{s_c} x_{c,h,w} + b_c$ with data-dependent
    initialisation, log-det $H W \sum_c s_c$.

    The first call of the explicit map ($x \mapsto y$) sets $s_c = -\log(\mathrm{std}_c + \epsilon)$
    and $b_c = -\mathrm{mean}_c\, e^{s_c}$ from that batch, so its output has zero mean and unit
    variance per channel; an inverse call before it uses the identity. Whether the initialisation
    happened is a buffer, so a loaded checkpoint (or one broadcast by DDP) is not re-initialised;
    nor are parameters set from outside without that buffer (restored from Pyro's param store with
    ``pyro.module(..., update_module_params=True)``, a ``state_dict`` without it loaded with
    ``strict=False``, or by hand): the map initialises itself only while both are all zeros, as it
    starts.
    A first batch with fewer than two values per channel leaves the map as the identity and the
    initialisation to the next call. Under DDP each rank would initialise from its own batch: run
    one forward before wrapping the model, so that DDP's constructor broadcasts rank 0's parameters
    and buffers.

    Args:
        num_channels: Channels $C$.
        eps: Added to the standard deviation at initialisation (finite, $> 0$).

    Raises:
        TypeError: If an input is not a floating tensor.
        ValueError: If ``num_channels`` or ``eps`` is out of range, an input is not shaped
            ``(..., C, H, W)``, or the batch that initialises the map holds NaN/Inf.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018),
        https://arxiv.org/abs/1807.03039

    Examples:
        >>> t = ActNorm(3)
        >>> y = t(torch.randn(64, 3, 4, 4) * 5 + 2)
        >>> bool(y.mean().abs() < 1e-5)
        True
    """

    domain = _IMAGE
    codomain = _IMAGE
    bijective = True

    def __init__(self, num_channels: int, eps: float = 1e-6, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.num_channels = check_positive_int("num_channels", num_channels)
        self.eps = check_positive_finite("eps", eps)
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # mirrors the buffer without reading it on the device

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def _set_from_outside(self) -> bool:
        """Whether the parameters of a map not yet initialised were set from outside: anything but
        the zeros it starts with. Pyro's param store (``pyro.module(..., update_module_params=True)``)
        and a ``state_dict`` without the buffer (``strict=False``) restore parameters but not this
        buffer; such parameters are kept, and the map counts as initialised. Zeros put back on
        purpose are initialised from the next batch. Reads the device only while the map is not
        initialised (a fresh model's first call or calls)."""
        if not bool(torch.any(self.log_scale != 0) | torch.any(self.bias != 0)):
            return False
        self.initialized.fill_(True)
        return True

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        per_channel = x.detach().movedim(-3, 0).reshape(self.num_channels, -1)
        if per_channel.shape[1] < 2:  # no standard deviation yet: stay the identity until then
            return
        # a NaN/Inf in this batch would set the parameters for good (and raise at every later call)
        check_finite("x (the batch that initialises ActNorm; it stays uninitialised)", per_channel)
        log_scale = -torch.log(per_channel.std(dim=1) + self.eps)
        self.log_scale.copy_(log_scale)
        self.bias.copy_(-per_channel.mean(dim=1) * log_scale.exp())
        self.initialized.fill_(True)
        self._initialized = True

    def _affine(self) -> tuple[Tensor, Tensor]:
        return self.log_scale[:, None, None], self.bias[:, None, None]

    def _call(self, x: Tensor) -> Tensor:
        _check_image("x", x, self.num_channels)
        if not self._initialized:  # read the buffer: it may have been set by a load or a broadcast
            self._initialized = bool(self.initialized) or self._set_from_outside()
        if not self._initialized:
            self._initialize(x)
        log_scale, bias = self._affine()
        return x * log_scale.exp() + bias

    def _inverse(self, y: Tensor) -> Tensor:
        _check_image("y", y, self.num_channels)
        log_scale, bias = self._affine()
        return (y - bias) * torch.exp(-log_scale)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        return x.new_zeros(x.shape[:-3]) + height * width * self.log_scale.sum()

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class LogitTransform(_FreshCache, TransformModule):
    r"""Logit preprocessing of dequantised data $v \in (0, K)^{C\times H\times W}$ (the map is defined
    on the slightly larger interval where $p \in (0, 1)$, which also holds the model's samples; a
    sample on its edge, where float rounding saturates the inverse's sigmoid, is mapped as if it lay
    the dtype's eps inside):

    $$ y = \operatorname{logit}(p), \quad p = \alpha + (1 - 2\alpha)\, v / K, \qquad
       \log\Big|\det\frac{\partial y}{\partial v}\Big| = \sum_i \big[\log(1 - 2\alpha) - \log K
       - \log p_i - \log(1 - p_i)\big]. $$

    With it in front of a flow, ``log_prob(v)`` is a density on the integer scale, so
    :func:`bits_per_dim` needs no further correction (see the module docstring).

    Args:
        levels: Number of intensity levels $K$ (17 for sklearn digits, 256 for 8-bit images).
        alpha: Margin $\alpha \in (0, 1/2)$ keeping $p$ away from 0 and 1.

    Raises:
        ValueError: If ``levels`` is below 2, ``alpha`` is outside $(0, 1/2)$, or (on the CPU, where
            the check reads no device memory) data lies outside the domain.

    References:
        Density estimation using Real NVP (Dinh et al., 2017), https://arxiv.org/abs/1605.08803

    Examples:
        >>> t = LogitTransform(levels=17)
        >>> v = dequantize(torch.randint(0, 17, (4, 1, 8, 8)).double())
        >>> torch.allclose(t.inv(t(v)), v)
        True
    """

    codomain = _IMAGE
    bijective = True

    def __init__(self, levels: int, alpha: float = 0.05, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.levels = check_positive_int("levels", levels, minimum=2)
        self.alpha = _check_real("alpha", alpha, lambda v: 0.0 < v < 0.5, "a float in (0, 0.5)", "in (0, 0.5)")
        # the bijection's domain: p in (0, 1), i.e. v in (-alpha K, (1 - alpha) K) / (1 - 2 alpha),
        # which contains the data range (0, K) and the model's samples alike
        scale = self.levels / (1.0 - 2.0 * self.alpha)
        self.domain = constraints.independent(
            constraints.interval(-self.alpha * scale, (1.0 - self.alpha) * scale), 3
        )

    def _p(self, v: Tensor) -> Tensor:
        """$p$, with 0 and 1 moved to the nearest numbers inside $(0, 1)$: a model sample at the
        domain's edge (where the inverse's sigmoid rounds to 0 or 1) maps back to a finite value."""
        info = torch.finfo(v.dtype)  # the nearest numbers to 0 and 1 inside (0, 1): only p = 0 or 1 moves
        return (self.alpha + (1.0 - 2.0 * self.alpha) * v / self.levels).clamp(info.tiny * info.eps, 1.0 - info.eps / 2)

    def _call(self, x: Tensor) -> Tensor:
        _check_image("x", x)
        low, high = self.domain.base_constraint.lower_bound, self.domain.base_constraint.upper_bound
        slack = 8 * torch.finfo(x.dtype).eps * (high - low)  # a sample on the edge, up to rounding
        if x.device.type == "cpu" and not bool(((x >= low - slack) & (x <= high + slack)).all()):  # NaN too
            raise ValueError(
                f"x must lie in [{low:.4g}, {high:.4g}], the domain of the logit preprocessing for "
                f"levels={self.levels}, alpha={self.alpha} (data in [0, {self.levels}) after dequantize), got "
                f"values from {float(x.min()):.4g} to {float(x.max()):.4g}"
            )
        return torch.logit(self._p(x))

    def _inverse(self, y: Tensor) -> Tensor:
        _check_image("y", y)
        x = (torch.sigmoid(y) - self.alpha) * self.levels / (1.0 - 2.0 * self.alpha)
        # where the sigmoid saturates, x is the domain's edge, which rounding can put an ulp outside
        # the declared interval (Pyro's support check would then refuse the model's own sample)
        bounds = self.domain.base_constraint
        return x.clamp(bounds.lower_bound, bounds.upper_bound)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        p = self._p(x)
        const = math.log(1.0 - 2.0 * self.alpha) - math.log(self.levels)
        return (const - torch.log(p) - torch.log1p(-p)).flatten(-3).sum(-1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, alpha={self.alpha}"


def dequantize(x: Tensor) -> Tensor:
    r"""Uniform dequantisation $v = x + u$, $u \sim U[0, 1)$ (torch's RNG), of integer-valued data
    $x \in \{0, \dots, K - 1\}$; $v \in [0, K)$ is the input of :class:`LogitTransform`.

    Maximising the density of $v$ maximises a lower bound of the discrete log-likelihood,
    $\mathbb{E}_u[\log p(x + u)] \le \log P(x)$.

    Args:
        x: Integer-valued data in a floating dtype, any shape.

    Returns:
        $v$, shaped like ``x``.

    Raises:
        TypeError: If ``x`` is not a tensor of a floating dtype.

    References:
        A note on the evaluation of generative models (Theis et al., 2016),
        https://arxiv.org/abs/1511.01844

    Examples:
        >>> x = torch.randint(0, 17, (4, 1, 8, 8)).float()
        >>> v = dequantize(x)
        >>> bool((v.floor() == x).all())
        True
    """
    _check_floating_tensor("x", x)
    # x + u rounds up to x + 1 when u is within half an ulp of x below 1 (about 1 in 1.3e5 draws
    # at x = 255 in float32): keep v below x + 1, so that floor(v) = x
    return torch.minimum(x + torch.rand_like(x), torch.nextafter(x + 1, x))


def bits_per_dim(log_prob: Tensor, num_dims: int) -> Tensor:
    r"""$-\log p / (D \ln 2)$ for log-densities on the integer intensity scale (see the module
    docstring), elementwise.

    $$ \mathrm{bpd} = -\frac{\log p(v)}{D \ln 2}. $$

    Args:
        log_prob: Log-densities $\log p(v)$ of any shape (e.g. ``(N,)``).
        num_dims: Number of dimensions $D = C H W$ per sample.

    Returns:
        Bits per dimension, shaped like ``log_prob``.

    Raises:
        ValueError: If ``num_dims`` is below 1.

    References:
        Density estimation using Real NVP (Dinh et al., 2017), https://arxiv.org/abs/1605.08803

    Examples:
        A uniform model over $K = 17$ levels has $\log_2 17$ bits per dimension:

        >>> log_prob = torch.tensor([-64 * math.log(17.0)])
        >>> round(float(bits_per_dim(log_prob, num_dims=64)), 4)
        4.0875
    """
    return -log_prob / (check_positive_int("num_dims", num_dims) * math.log(2.0))


class FactorOut(_FreshCache, TransformModule):
    r"""Multi-scale factor-out: $y = (f(x_{1:k}), x_{k+1:C})$ along channels.

    The first ``keep_channels`` channels go through ``inner`` (which must keep their shape, e.g. a
    scale ending in :class:`Unsqueeze`); the others leave the flow here and are latent variables
    at this resolution. Log-det: that of ``inner``, served from a cache for the pair just produced;
    for a pair just produced by the inverse, ``inner``'s log-det of the very halves it produced, so
    that its own caches serve it (re-running its explicit maps on fresh slices would initialise a
    nested :class:`ActNorm` from model samples and add a scale the sample never had).

    $$ \log\Big|\det\frac{\partial y}{\partial x}\Big|
       = \log\Big|\det\frac{\partial f(x_{1:k})}{\partial x_{1:k}}\Big|. $$

    Args:
        inner: Shape-preserving image transform on ``(keep_channels, H, W)``.
        keep_channels: Channels $k$ passed on; inputs ``(..., C, H, W)`` need $C > k$.

    Raises:
        TypeError: If ``inner`` is not a module.
        ValueError: If an input has no more than ``keep_channels`` channels.

    References:
        Density estimation using Real NVP (Dinh et al., 2017), https://arxiv.org/abs/1605.08803

    Examples:
        >>> t = FactorOut(ActNorm(2), keep_channels=2)
        >>> x = torch.randn(5, 4, 4, 4)
        >>> y = t(x)
        >>> torch.equal(y[:, 2:], x[:, 2:]), t.log_abs_det_jacobian(x, y).shape
        (True, torch.Size([5]))
    """

    domain = _IMAGE
    codomain = _IMAGE
    bijective = True
    _cached_halves: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # x, y, x1, y1 of _inverse

    def __init__(self, inner: TransformModule, keep_channels: int, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        if not (isinstance(inner, nn.Module) and isinstance(inner, Transform)):  # ComposeTransformModule too
            raise TypeError(f"inner must be a TransformModule, got {type(inner).__name__}")
        self.inner = inner
        self.keep_channels = check_positive_int("keep_channels", keep_channels)
        self._cached_logdet: tuple[Tensor, Tensor, Tensor, tuple] | None = None

    def _split(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        if x.dim() < 3 or x.shape[-3] <= self.keep_channels:
            raise ValueError(
                f"{name} must have more than keep_channels={self.keep_channels} channels, "
                f"got shape {tuple(x.shape)}"
            )
        return x[..., : self.keep_channels, :, :], x[..., self.keep_channels :, :, :]

    @staticmethod
    def _same_shape(out: Tensor, inp: Tensor, what: str) -> Tensor:
        if out.shape != inp.shape:
            raise ValueError(
                f"FactorOut's inner transform must keep the shape of the channels it transforms: {what} has "
                f"shape {tuple(out.shape)}, its input {tuple(inp.shape)}"
            )
        return out

    def _call(self, x: Tensor) -> Tensor:
        x1, x2 = self._split(x, "x")
        y1 = self._same_shape(self.inner(x1), x1, "inner(x)")
        y = torch.cat([y1, x2], dim=-3)
        self._cached_logdet = (x, y, self.inner.log_abs_det_jacobian(x1, y1), _pair_versions(x, y))
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        y1, y2 = self._split(y, "y")
        x1 = self._same_shape(self.inner.inv(y1), y1, "inner.inv(y)")
        x = torch.cat([x1, y2], dim=-3)
        self._cached_halves = (x, y, x1, y1, _pair_versions(x, y))
        return x

    @_disable_dynamo
    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        self._drop_stale_cache()
        cached = self._cached_logdet
        if cached is not None and cached[0] is x and cached[1] is y and cached[3] == _pair_versions(x, y):
            return cached[2]
        halves = self._cached_halves
        if halves is not None and halves[0] is x and halves[1] is y and halves[4] == _pair_versions(x, y):
            return self.inner.log_abs_det_jacobian(halves[2], halves[3])
        x1, _ = self._split(x, "x")
        y1, _ = self._split(y, "y")
        return self.inner.log_abs_det_jacobian(x1, y1)

    def _cache_fields(self) -> dict[str, Any]:
        return {**super()._cache_fields(), "_cached_logdet": None, "_cached_halves": None}

    def extra_repr(self) -> str:
        return f"keep_channels={self.keep_channels}"


def conv_iresnet(
    input_shape: Sequence[int],
    hidden_channels: int | Sequence[int] = 32,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    **options: Any,
) -> InvertibleResidual:
    r"""An :class:`~pyro_iresnet.InvertibleResidual` on images (``event_dim=3``) whose residual net
    is a :class:`~pyro_iresnet.LipschitzCNN` ``C -> hidden -> ... -> C``.

    The block is $y = x + g(x)$ with $g = \tilde A_L \circ \phi \circ \dots \circ \phi \circ \tilde A_1$
    and $\mathrm{Lip}(g) \lesssim c^L$; its log-det $\log\det(I + J_g(x))$ comes from the estimator
    chosen by ``logdet``.

    Args:
        input_shape: $(C, H, W)$; the block maps it to itself.
        hidden_channels: Width of every hidden layer, or one width per hidden layer
            (``len(kernel_sizes) - 1`` entries).
        kernel_sizes: Odd kernel size of each convolution (i-ResNet uses ``(3, 1, 3)``).
        **options: ``coeff`` (default 0.97), ``activation``, ``n_power_iterations`` for the net;
            everything else goes to :class:`~pyro_iresnet.ResidualBlock` (``logdet``, ``n_terms``,
            ``atol``, ``inverse_method``, ...).

    Raises:
        ValueError: If ``input_shape`` is not three positive ints, ``hidden_channels`` has the
            wrong length, ``event_dim`` is passed, or an option is out of range.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> t = conv_iresnet((2, 4, 4), hidden_channels=8, logdet="exact")
        >>> t(torch.randn(3, 2, 4, 4)).shape
        torch.Size([3, 2, 4, 4])
    """
    input_shape = _check_shape("input_shape", input_shape)
    if not isinstance(kernel_sizes, Iterable) or isinstance(kernel_sizes, str):  # numpy arrays too
        raise TypeError(f"kernel_sizes must be a sequence of ints, got {type(kernel_sizes).__name__}")
    kernel_sizes = list(kernel_sizes)
    n_hidden = len(kernel_sizes) - 1
    if isinstance(hidden_channels, Integral) and not isinstance(hidden_channels, bool):
        hidden = [check_positive_int("hidden_channels", hidden_channels)] * n_hidden
    elif isinstance(hidden_channels, Sequence) and not isinstance(hidden_channels, str):
        hidden = [check_positive_int("hidden_channels", size) for size in hidden_channels]
        if len(hidden) != n_hidden:
            raise ValueError(
                f"hidden_channels must have len(kernel_sizes) - 1 = {n_hidden} entries, got {hidden}"
            )
    else:
        raise TypeError(f"hidden_channels must be an int or a sequence of ints, got {type(hidden_channels).__name__}")
    if "event_dim" in options:
        raise ValueError(f"conv_iresnet sets event_dim=3 itself: do not pass event_dim (got {options['event_dim']})")
    net_options, block_options = _split_options(dict(options))
    channels = [input_shape[0], *hidden, input_shape[0]]
    net = LipschitzCNN(channels, kernel_sizes, input_shape, **net_options)
    return InvertibleResidual(net, event_dim=3, **block_options)


class MultiscaleTransform(_FreshCache, TransformModule):
    r"""A flow from latents $z$ to data $x$ (both of the data's shape) whose inverse is explicit.

    ``encoder`` maps data to latents with explicit maps only (residual blocks, actnorm, squeezes,
    logit); this transform is its inverse, so in ``TransformedDistribution(base, [t])``
    ``log_prob(x)`` runs only the explicit maps and their log-dets, and ``sample`` runs the
    fixed-point inverses (with implicit gradients).

    With $x = f(z)$ and $f^{-1}$ the encoder,

    $$ \log p(x) = \log p_Z(f^{-1}(x)) + \log\Big|\det\frac{\partial f^{-1}(x)}{\partial x}\Big|, $$

    and ``log_abs_det_jacobian(z, x)`` is minus the encoder's log-det at $x$.

    Args:
        encoder: Image transform from data to latents of the same shape.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> encoder = ComposeTransformModule(
        ...     [Squeeze(), conv_iresnet((4, 2, 2), hidden_channels=8, logdet="exact"), Unsqueeze()])
        >>> t = MultiscaleTransform(encoder)
        >>> x = torch.randn(3, 1, 4, 4)
        >>> z = t.inv(x)  # the explicit direction
        >>> z.shape, t.log_abs_det_jacobian(z, x).shape
        (torch.Size([3, 1, 4, 4]), torch.Size([3]))
    """

    bijective = True

    def __init__(self, encoder: TransformModule, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.encoder = encoder
        self.domain = encoder.codomain
        self.codomain = encoder.domain

    def _call(self, z: Tensor) -> Tensor:
        return self.encoder.inv(z)

    def _inverse(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        return -self.encoder.log_abs_det_jacobian(x, z)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return self.encoder.inverse_shape(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self.encoder.forward_shape(shape)


def _scale(
    shape: tuple[int, int, int], scales_left: int, n_blocks: int, factor_out: bool, actnorm: bool,
    block_kwargs: dict[str, Any],
) -> _Scale:
    """Squeeze, blocks, the next scale (factored out or not), unsqueeze: shape-preserving."""
    c, h, w = shape  # H and W are even: multiscale_iresnet checked them for every scale
    inner = (4 * c, h // 2, w // 2)
    parts: list[TransformModule] = [Squeeze()]
    for _ in range(n_blocks):
        if actnorm:
            parts.append(ActNorm(inner[0]))
        parts.append(conv_iresnet(inner, **block_kwargs))
    if scales_left > 1:
        if factor_out:
            keep = inner[0] // 2
            nested = _scale((keep, *inner[1:]), scales_left - 1, n_blocks, factor_out, actnorm, block_kwargs)
            parts.append(FactorOut(nested, keep))
        else:
            parts.append(_scale(inner, scales_left - 1, n_blocks, factor_out, actnorm, block_kwargs))
    parts.append(Unsqueeze())
    return _Scale(parts, shape)


class _Compose(_FreshCache, ComposeTransformModule):
    """``ComposeTransformModule`` with ``cache_size=1`` whose cache is dropped when the mode or a
    parameter of a part changes (see the module docstring)."""

    def __init__(self, parts: Sequence[TransformModule]) -> None:
        super().__init__(parts, cache_size=1)


class _Scale(_Compose):
    """One scale of :func:`multiscale_iresnet` (see :func:`_scale`). Its explicit map checks the
    batch before any part runs, so that a batch a residual block would refuse (shape, dtype) cannot
    initialise an :class:`ActNorm` before it."""

    def __init__(self, parts: Sequence[TransformModule], shape: tuple[int, int, int]) -> None:
        super().__init__(parts)
        self.shape = shape

    def __call__(self, x: Tensor) -> Tensor:
        _check_image("x", x)
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"x must have shape (..., {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        dtype = next(self.parameters()).dtype
        cast_by_autocast = x.dtype in _LOW_PRECISION and _autocast_enabled(x.device.type)  # as blocks do
        if x.dtype != dtype and not cast_by_autocast:
            raise TypeError(
                f"x has dtype {x.dtype} but the model's parameters are {dtype}; convert one of them "
                f"(e.g. model.to({x.dtype}))"
            )
        return super().__call__(x)


def multiscale_iresnet(
    input_shape: Sequence[int],
    n_scales: int = 2,
    n_blocks: int = 2,
    hidden_channels: int | Sequence[int] = 32,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    factor_out: bool = True,
    actnorm: bool = True,
    levels: int | None = None,
    alpha: float | None = None,
    **options: Any,
) -> MultiscaleTransform:
    r"""Multi-scale convolutional i-ResNet flow, ready for ``TransformedDistribution``.

    Per scale: :class:`Squeeze`, ``n_blocks`` times (:class:`ActNorm`, :func:`conv_iresnet`); between
    scales half of the channels are factored out (``factor_out=True``) and the rest squeezed again.
    Each scale ends in :class:`Unsqueeze`, so the latent has the data's shape and a standard normal
    base over ``input_shape`` fits. With ``levels`` a :class:`LogitTransform` comes first and the
    model's density is over dequantised integer data (see :func:`bits_per_dim`).

    Args:
        input_shape: $(C, H, W)$, with $H$ and $W$ divisible by $2^{n_\text{scales}}$.
        n_scales: Number of resolutions.
        n_blocks: Residual blocks per scale.
        hidden_channels: Hidden width(s) of each block's :class:`~pyro_iresnet.LipschitzCNN`.
        kernel_sizes: Kernel sizes of each block's net.
        factor_out: Factor out half of the channels between scales.
        actnorm: Put an :class:`ActNorm` before every block.
        levels: Intensity levels $K$ of the data, or ``None`` for no logit preprocessing.
        alpha: Logit margin of :class:`LogitTransform` (default 0.05); only with ``levels``.
        **options: Options of :func:`conv_iresnet` (``coeff``, ``logdet``, ``n_terms``, ...).

    Returns:
        A transform from latents to data; its ``encoder`` maps data to latents explicitly.

    Raises:
        ValueError: If $H$ or $W$ is not divisible by $2^{n_\text{scales}}$, an option is out
            of range, or ``alpha`` is given without ``levels``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018),
        https://arxiv.org/abs/1807.03039

    Examples:
        >>> import pyro.distributions as dist
        >>> flow_t = multiscale_iresnet((1, 8, 8), hidden_channels=8, levels=17)
        >>> base = dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3)
        >>> flow = dist.TransformedDistribution(base, [flow_t])
        >>> flow.log_prob(dequantize(torch.randint(0, 17, (5, 1, 8, 8)).float())).shape
        torch.Size([5])
    """
    shape = _check_shape("input_shape", input_shape)
    check_positive_int("n_scales", n_scales)
    check_positive_int("n_blocks", n_blocks)
    factor_out, actnorm = check_bool("factor_out", factor_out), check_bool("actnorm", actnorm)
    factor = 2**n_scales
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"input_shape {shape}: H and W must be divisible by 2**n_scales = {factor} (n_scales={n_scales})"
        )
    if "coeff" in options:
        check_unit_interval("coeff", options["coeff"])
    block_kwargs = dict(options, hidden_channels=hidden_channels, kernel_sizes=kernel_sizes)
    parts: list[TransformModule] = []
    if levels is None and alpha is not None:
        raise ValueError(f"alpha={alpha} is the logit preprocessing's margin, which needs levels (got levels=None)")
    if levels is not None:
        parts.append(LogitTransform(levels, 0.05 if alpha is None else alpha))
    parts.append(_scale(shape, n_scales, n_blocks, factor_out, actnorm, block_kwargs))
    return MultiscaleTransform(_Compose(parts))
