r"""Spectrally normalised convolutions and Lipschitz CNNs for image residual blocks.

A convolution with zero padding is a linear operator $A: \mathbb{R}^{C\times H\times W} \to
\mathbb{R}^{C'\times H\times W}$. Its Lipschitz constant is the operator norm $\|A\|_2$, which
differs from (and is not bounded by) the norm of the kernel reshaped to a $C' \times C k^2$ matrix.
:class:`SpectralNormConv2d` therefore runs power iteration on the operator itself,

$$ v \leftarrow A^\top u / \|A^\top u\|, \qquad u \leftarrow A v / \|A v\|, \qquad
   \tilde\sigma = u^\top A v, $$

with ``conv2d`` for $A$ and ``conv_transpose2d`` for $A^\top$ on images of the layer's input shape,
and rescales the kernel as in i-ResNet: $\tilde W = c\,W/\tilde\sigma$ when $\tilde\sigma > c$.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = ["LipschitzCNN", "SpectralNormConv2d", "conv_operator_norm"]

import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LipschitzWarning, check_choice, check_positive_int
from .lipschitz import _ACTIVATIONS, _SpectralNorm, lipschitz_bound

_DENSE_MAX_SIDE = 512
_LANCZOS_MAX_ITER = 500
_LANCZOS_RTOL = 1e-12


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """Three positive integers (numpy integers included, as Python ints; ``bool`` refused)."""
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{name} must be three positive ints (C, H, W), got {shape}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_kernel_size(name: str, kernel_size: int) -> int:
    check_positive_int(name, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"{name} must be odd (padding keeps the spatial size), got {kernel_size}")
    return kernel_size


def _lanczos_max_eigenvalue(matvec: Callable[[Tensor], Tensor], start: Tensor) -> float:
    r"""Largest eigenvalue of a symmetric PSD operator by Lanczos with full reorthogonalisation,
    stopped when the Ritz residual $\beta_j |s_j|$ is below $10^{-12}\,\theta$. Returns
    $\theta + \beta_j |s_j|$ (an eigenvalue lies within the residual of the Ritz value $\theta$).
    Warns (:class:`~pyro_iresnet.LipschitzWarning`) if the iteration cap ends it first: the value
    is then not known to be the largest eigenvalue, nor an upper bound on it."""
    n = start.numel()
    basis = [start.flatten() / start.norm()]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for j in range(min(n, _LANCZOS_MAX_ITER)):
        w = matvec(basis[j].reshape(start.shape)).flatten()
        alphas.append(basis[j] @ w)
        q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - q.T @ (q @ w)
        beta = w.norm()
        diag = torch.stack(alphas)
        tri = torch.diag(diag)
        if betas:
            off = torch.stack(betas)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        theta, residual = evals[-1], beta * evecs[-1, -1].abs()
        if residual <= _LANCZOS_RTOL * theta.abs() or beta <= _LANCZOS_RTOL * diag.abs().max():
            return float(theta + residual)
        betas.append(beta)
        basis.append(w / beta)
    warnings.warn(
        f"Lanczos for a convolution's operator norm stopped after {_LANCZOS_MAX_ITER} iterations with a "
        f"relative residual of {float(residual / theta.abs()):.2e} (target {_LANCZOS_RTOL:.0e}): the norm "
        "returned may be below the exact one, so a certificate built from it may not bound Lip(g)",
        LipschitzWarning,
        stacklevel=3,
    )
    return float(theta + residual)


def conv_operator_norm(weight: Tensor, input_shape: Sequence[int], padding: int) -> float:
    r"""Exact $\|A\|_2$ of the stride-1 convolution $A = $ ``conv2d(·, weight, padding)`` on inputs of
    shape ``input_shape`` = $(C, H, W)$, computed in float64.

    Small operators (the smaller side $\le 512$) are built densely by convolving the standard basis,
    and the norm is $\sqrt{\lambda_{\max}}$ of the smaller Gram matrix (``eigvalsh``): exact up to
    rounding. Larger ones run Lanczos with full reorthogonalisation on $A^\top A$ (``conv2d`` then
    ``conv_transpose2d``) from a fixed-seed start (the global RNG is untouched) until the top Ritz
    value's residual is below $10^{-12}$ relative, and return the Ritz value plus that residual.

    $$ \|A\|_2 = \max_{\|x\|_2 = 1} \|A x\|_2 = \sqrt{\lambda_{\max}(A^\top A)}. $$

    Args:
        weight: Kernel of shape ``(C', C, k, k)``.
        input_shape: $(C, H, W)$.
        padding: Zero padding on each side.

    Returns:
        $\|A\|_2$ as a float.

    Raises:
        ValueError: If ``input_shape`` is not three positive ints, or the convolution has no output
            on it.

    Warns:
        LipschitzWarning: If Lanczos reaches its cap of 500 iterations short of its tolerance (the
            value is then not known to bound the norm).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        A $1 \times 1$ convolution applies one matrix to every pixel, so its norm is the matrix's:

        >>> w = torch.randn(3, 2, 1, 1, dtype=torch.float64)
        >>> norm = conv_operator_norm(w, (2, 4, 4), padding=0)
        >>> math.isclose(norm, float(torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2)), rel_tol=1e-9)
        True
    """
    c, h, w = _check_shape("input_shape", input_shape)
    out_shape = (weight.shape[0], h + 2 * padding - weight.shape[2] + 1, w + 2 * padding - weight.shape[3] + 1)
    if min(out_shape[1:]) < 1:
        raise ValueError(
            f"a {tuple(weight.shape[2:])} kernel with padding {padding} has no output on inputs of shape {(c, h, w)}"
        )
    with torch.no_grad():
        weight = weight.detach().double()
        n_in, n_out = c * h * w, math.prod(out_shape)
        if min(n_in, n_out) <= _DENSE_MAX_SIDE:
            # the rows of A^T (convolve the input basis) or of A (transposed-convolve the output
            # basis), whichever is smaller; the norm is that of the smaller Gram matrix
            if n_in <= n_out:
                basis = torch.eye(n_in, dtype=weight.dtype, device=weight.device).reshape(n_in, c, h, w)
                rows = F.conv2d(basis, weight, padding=padding).reshape(n_in, n_out)
            else:
                basis = torch.eye(n_out, dtype=weight.dtype, device=weight.device).reshape(n_out, *out_shape)
                rows = F.conv_transpose2d(basis, weight, padding=padding).reshape(n_out, n_in)
            return float(torch.linalg.eigvalsh(rows @ rows.T)[-1].clamp_min(0.0).sqrt())

        def gram_matvec(v: Tensor) -> Tensor:
            return F.conv_transpose2d(F.conv2d(v, weight, padding=padding), weight, padding=padding)

        generator = torch.Generator().manual_seed(0)  # a CPU generator, whatever the default device
        start = torch.randn(1, c, h, w, dtype=weight.dtype, generator=generator, device="cpu").to(weight.device)
        return math.sqrt(max(_lanczos_max_eigenvalue(gram_matvec, start), 0.0))


class SpectralNormConv2d(_SpectralNorm):
    r"""Stride-1 convolution with zero padding (spatial size kept) whose *operator* norm is
    rescaled to $\lesssim c$ (i-ResNet normalisation, see the module docstring).

    The power-iteration buffers are images: ``v`` of ``input_shape`` $(C, H, W)$ and ``u`` of the
    output shape $(C', H, W)$, sized at construction (checkpoints load without a dummy forward).
    They run automatically, ``n_power_iterations`` steps in the first training-mode forward after
    each change of the weight; at construction, until $\tilde\sigma$ is within 1% of the exact norm.
    The bias is added after the normalised convolution and is not part of the operator.
    :meth:`exact_operator_norm` uses :func:`conv_operator_norm` (dense and exact for the small
    images this is meant for), so :func:`~pyro_iresnet.lipschitz_bound` certifies.

    $$ \tilde W = \frac{W}{\max(1, \tilde\sigma / c)}, \qquad \tilde\sigma = u^\top A_W v \le \|A_W\|_2. $$

    Args:
        in_channels: Input channels $C$.
        out_channels: Output channels $C'$.
        kernel_size: Odd kernel size $k$ (padding $k // 2$).
        input_shape: $(C, H, W)$ of the inputs the operator norm refers to; inputs have shape
            ``(N, C, H, W)`` and outputs ``(N, C', H, W)``.
        coeff: Lipschitz target $c \in (0, 1)$.
        n_power_iterations: Power-iteration steps per change of the weight. The default 5 (1 for
            linear layers) keeps $\tilde\sigma$ up with Adam on convolution operators, whose power
            iteration converges slowly; each step convolves a single image twice.
        bias: Whether to learn a per-channel bias.

    Raises:
        ValueError: If ``kernel_size`` is even, ``input_shape`` is not three positive ints or
            disagrees with ``in_channels``, or another argument is out of range.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> layer = SpectralNormConv2d(2, 8, 3, input_shape=(2, 4, 4), coeff=0.9)
        >>> layer(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 8, 4, 4])
        >>> layer.lipschitz_constant() <= 0.9 * 1.01
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_shape: Sequence[int],
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = _check_kernel_size("kernel_size", kernel_size)
        self.input_shape = _check_shape("input_shape", input_shape)
        if self.input_shape[0] != in_channels:
            raise ValueError(
                f"input_shape[0] must equal in_channels={in_channels}, got input_shape={self.input_shape}"
            )
        self.padding = kernel_size // 2
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=self.padding, bias=bias)
        u_shape = (out_channels, *self.input_shape[1:])
        self._init_spectral_norm(conv, u_shape, self.input_shape, coeff, n_power_iterations)

    def _apply_op(self, w: Tensor, x: Tensor) -> Tensor:
        return F.conv2d(x.unsqueeze(0), w, padding=self.padding).squeeze(0)

    def _apply_adjoint(self, w: Tensor, y: Tensor) -> Tensor:
        return F.conv_transpose2d(y.unsqueeze(0), w, padding=self.padding).squeeze(0)

    def _operator_norm(self, weight: Tensor) -> float:
        """Exact operator norm of the convolution with ``weight`` at ``input_shape`` (:func:`conv_operator_norm`)."""
        return conv_operator_norm(weight, self.input_shape, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-3:] != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"x must have shape (N, {shape}), got {tuple(x.shape)}")
        self._maybe_refresh()
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_shape={self.input_shape}, coeff={self.coeff}, "
            f"n_power_iterations={self.n_power_iterations}"
        )


class LipschitzCNN(nn.Module):
    r"""Convolutional net $g = \tilde A_L \circ \phi \circ \dots \circ \phi \circ \tilde A_1$ on images,
    each $\tilde A_i$ a :class:`SpectralNormConv2d`, so $\mathrm{Lip}(g) \lesssim c^L$.

    $$ \mathrm{Lip}(g) \le \prod_{i=1}^{L} \|\tilde A_i\|_2, $$

    with each operator norm computed exactly by :meth:`lipschitz_constant` (a certificate; the
    power-iteration estimate may leave $\|\tilde A_i\|_2$ slightly above $c$).

    Args:
        channels: Channels ``[C, h_1, ..., C_out]`` (one more entry than ``kernel_sizes``).
        kernel_sizes: Odd kernel size of each convolution.
        input_shape: $(C, H, W)$ of the inputs; the spatial size is kept.
        coeff: Lipschitz target of every convolution, in $(0, 1)$.
        activation: ``"lipswish"`` or ``"elu"`` (both 1-Lipschitz).
        n_power_iterations: Power-iteration steps per change of the weights (default 5, see
            :class:`SpectralNormConv2d`).

    Raises:
        ValueError: If the channels, kernel sizes and ``input_shape`` do not fit together, a
            kernel size is even, or ``activation`` is unknown.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> g = LipschitzCNN([2, 16, 16, 2], [3, 1, 3], input_shape=(2, 4, 4), coeff=0.9)
        >>> g(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
        >>> g.lipschitz_constant() < 1
        True
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        input_shape: Sequence[int],
        coeff: float = 0.97,
        activation: str = "lipswish",
        n_power_iterations: int = 5,
    ) -> None:
        super().__init__()
        channels, kernel_sizes = list(channels), list(kernel_sizes)
        input_shape = _check_shape("input_shape", input_shape)
        if len(channels) != len(kernel_sizes) + 1:
            raise ValueError(
                f"channels must have one more entry than kernel_sizes, got {len(channels)} channels "
                f"and {len(kernel_sizes)} kernel sizes"
            )
        if not kernel_sizes:
            raise ValueError("kernel_sizes must not be empty")
        if channels[0] != input_shape[0]:
            raise ValueError(f"channels[0] must equal input_shape[0]={input_shape[0]}, got {channels[0]}")
        check_choice("activation", activation, tuple(_ACTIVATIONS))
        _, h, w = input_shape
        layers: list[nn.Module] = []
        for i, (c_in, c_out, k) in enumerate(zip(channels[:-1], channels[1:], kernel_sizes)):
            if i > 0:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(SpectralNormConv2d(c_in, c_out, k, (c_in, h, w), coeff, n_power_iterations))
        self.layers = nn.Sequential(*layers)
        self.channels = channels
        self.event_shape = input_shape

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def lipschitz_constant(self) -> float:
        """Certified $\\mathrm{Lip}(g)$: product of the layers' exact operator norms."""
        return lipschitz_bound(self.layers)
