"""Warnings, exceptions and argument checks shared by every module (the ``check_*`` helpers are
internal: they give every module the same error messages).

Errors name the argument, the value and the rule, e.g. ``coeff must be in (0, 1), got 1.2``.
"""

from __future__ import annotations

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "LipschitzWarning",
    "NonFiniteError",
]

import math
from collections.abc import Callable
from numbers import Integral, Real

import torch
from torch import Tensor


class ConvergenceWarning(RuntimeWarning):
    r"""An iterative solve (the fixed-point inverse or its adjoint) stopped at ``max_iter``
    before its residual met the tolerance.

    The rule: every sample must reach $\|x + g(x) - y\|_\infty \le \mathrm{atol} +
    \mathrm{rtol}\,\|y\|_\infty$. The message names the worst residual, the iterations and the
    block's certified Lipschitz bound, and suggests raising ``max_iter``, loosening ``atol``/``rtol`` or
    lowering ``coeff``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> import warnings
        >>> from pyro_iresnet.inverse import fixed_point_inverse
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     x, info = fixed_point_inverse(lambda x: 0.9 * torch.tanh(x), torch.ones(2, 3), max_iter=2)
        >>> [w.category.__name__ for w in caught], info.converged
        (['ConvergenceWarning'], False)
    """


class LipschitzWarning(RuntimeWarning):
    r"""A certified Lipschitz bound of a residual function is not below 1: the block may not be
    invertible (power iteration lagging behind the weights, or an uncertified layer).

    The rule: $y = x + g(x)$ is invertible when $\mathrm{Lip}(g) < 1$, and
    :func:`~pyro_iresnet.lipschitz_bound` warns when its certificate is $\ge 1$.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> import warnings
        >>> from pyro_iresnet import ResidualBlock, lipschitz_bound
        >>> block = ResidualBlock(torch.nn.Identity())  # Lip(g) = 1: not a contraction
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     bound = lipschitz_bound(block)
        >>> bound, [w.category.__name__ for w in caught]
        (1.0, ['LipschitzWarning'])
    """


class ConvergenceError(RuntimeError):
    r"""Raised instead of :class:`ConvergenceWarning` when a solve runs with ``strict=True``: some
    sample still has $\|x + g(x) - y\|_\infty > \mathrm{atol} + \mathrm{rtol}\,\|y\|_\infty$ after
    ``max_iter`` iterations.

    Attributes:
        info: The solve's :class:`~pyro_iresnet.inverse.SolveInfo` (iterations, per-sample
            residuals); a residual block also records it in ``last_diagnostics`` before raising.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet.inverse import fixed_point_inverse
        >>> fixed_point_inverse(lambda x: 0.9 * torch.tanh(x), torch.ones(2, 3), max_iter=2, strict=True)
        Traceback (most recent call last):
            ...
        pyro_iresnet.errors.ConvergenceError: fixed-point inverse did not converge in 2 iterations: ...
    """


class NonFiniteError(FloatingPointError):
    r"""A residual block produced a NaN or Inf log-det $\log|\det(I + J_g(x))|$ (typically after a
    diverging optimiser step).

    The message names the block (see :func:`~pyro_iresnet.name_blocks`); the check runs where
    ``check_finite`` applies (CPU tensors by default, every device with ``check_finite=True``).

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), https://arxiv.org/abs/1906.02735

    Examples:
        >>> from pyro_iresnet import ResidualBlock, LipschitzMLP
        >>> block = ResidualBlock(LipschitzMLP([2, 8, 2]), logdet="exact").eval()
        >>> with torch.no_grad():
        ...     _ = block.net.layers[0].bias.fill_(float("nan"))  # a diverged parameter
        >>> block.forward_and_logdet(torch.randn(3, 2))
        Traceback (most recent call last):
            ...
        pyro_iresnet.errors.NonFiniteError: log-det of residual block ... is not finite in 3 of 3 samples ...
    """


def check_unit_interval(name: str, value: float) -> float:
    """Require ``0 < value < 1`` (e.g. the Lipschitz target ``coeff``).

    Args:
        name: Argument name used in the message.
        value: The value to check.

    Returns:
        ``value`` as a Python float.

    Raises:
        TypeError: If ``value`` is not a real number (``numbers.Real``, numpy scalars included;
            ``bool`` refused).
        ValueError: If ``value`` is outside $(0, 1)$.

    Examples:
        >>> check_unit_interval("coeff", 0.9)
        0.9
        >>> check_unit_interval("coeff", 1.2)
        Traceback (most recent call last):
            ...
        ValueError: coeff must be in (0, 1), got 1.2
    """
    return _check_real(name, value, lambda v: 0.0 < v < 1.0, "a float in (0, 1)", "in (0, 1)")


def check_roulette_p(name: str, value: float) -> float:
    """Require ``0 < value < 1`` for the geometric roulette's success probability ``p``: with
    $p = 1$ every draw is $N = 1$, so the "unbiased" series would be a fixed truncation, biased.

    Args:
        name: Argument name used in the message.
        value: The value to check.

    Returns:
        ``value`` as a Python float.

    Raises:
        TypeError: If ``value`` is not a real number (``numbers.Real``, numpy scalars included;
            ``bool`` refused).
        ValueError: If ``value`` is outside $(0, 1)$.

    Examples:
        >>> import numpy as np
        >>> check_roulette_p("p", np.float32(0.5))
        0.5
        >>> check_roulette_p("p", 1.0)
        Traceback (most recent call last):
            ...
        ValueError: p must be in (0, 1) (p = 1 always stops the roulette after one term: ...), got 1.0
    """
    rule = ("in (0, 1) (p = 1 always stops the roulette after one term: a fixed truncation, not an unbiased "
            "estimate; for that use logdet='series')")
    return _check_real(name, value, lambda v: 0.0 < v < 1.0, "a float in (0, 1)", rule)


def check_positive_finite(name: str, value: float) -> float:
    """Require a finite real number ``> 0`` (e.g. the Poisson roulette's rate).

    Args:
        name: Argument name used in the message.
        value: The value to check.

    Returns:
        ``value`` as a Python float.

    Raises:
        TypeError: If ``value`` is not a real number (``numbers.Real``, numpy scalars included;
            ``bool`` refused).
        ValueError: If ``value`` is not finite or not ``> 0``.

    Examples:
        >>> check_positive_finite("lam", 2)
        2.0
        >>> check_positive_finite("lam", float("inf"))
        Traceback (most recent call last):
            ...
        ValueError: lam must be a finite float > 0, got inf
    """
    return _check_real(name, value, lambda v: 0.0 < v < math.inf, "a finite float > 0", "a finite float > 0")


def check_tolerance(name: str, value: float | None) -> float | None:
    """Require ``None`` (the dtype's default) or a real number ``>= 0`` (``inf`` allowed, NaN not: a
    NaN tolerance would make every comparison with it false).

    Args:
        name: Argument name used in the message (``atol``, ``rtol``).
        value: The value to check.

    Returns:
        ``None``, or ``value`` as a Python float.

    Raises:
        TypeError: If ``value`` is neither ``None`` nor a real number.
        ValueError: If ``value`` is NaN or negative.

    Examples:
        >>> check_tolerance("atol", None), check_tolerance("atol", 0)
        (None, 0.0)
        >>> check_tolerance("rtol", float("nan"))
        Traceback (most recent call last):
            ...
        ValueError: rtol must be >= 0, got nan
    """
    if value is None:
        return None
    return _check_real(name, value, lambda v: v >= 0, "a float >= 0 or None", ">= 0")


def _check_real(name: str, value: object, in_range: Callable[[Real], bool], kind: str, rule: str) -> float:
    """``value`` as a Python float: a ``TypeError`` ("``name`` must be ``kind``") unless it is a real
    number (numpy scalars included, ``bool`` refused), a ``ValueError`` ("``name`` must be ``rule``")
    unless ``in_range(value)``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not in_range(value):
        raise ValueError(f"{name} must be {rule}, got {value}")
    return float(value)


def _check_floating_tensor(name: str, x: object) -> None:
    """A ``TypeError`` naming ``name`` unless ``x`` is a tensor of a real floating dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_bool(name: str, value: bool) -> bool:
    """Require ``True`` or ``False`` (numpy booleans included): a string such as ``"False"`` would
    otherwise switch an option on.

    Args:
        name: Argument name used in the message.
        value: The value to check.

    Returns:
        ``value`` as a Python bool.

    Raises:
        TypeError: If ``value`` is not a boolean.

    Examples:
        >>> import numpy as np
        >>> check_bool("strict", True), check_bool("strict", np.True_)
        (True, True)
        >>> check_bool("exact_trace", "False")
        Traceback (most recent call last):
            ...
        TypeError: exact_trace must be True or False, got 'False'
    """
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")  # numpy 1 / 2
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Require an integer ``>= minimum``.

    Args:
        name: Argument name used in the message.
        value: The value to check.
        minimum: Smallest allowed value.

    Returns:
        ``value`` as a Python int.

    Raises:
        TypeError: If ``value`` is not an integer (``numbers.Integral``, numpy integers included;
            ``bool`` and floats refused).
        ValueError: If ``value < minimum``.

    Examples:
        >>> import numpy as np
        >>> check_positive_int("n_terms", 5), check_positive_int("n_terms", np.int64(5))
        (5, 5)
        >>> check_positive_int("n_exact_terms", -1, minimum=0)
        Traceback (most recent call last):
            ...
        ValueError: n_exact_terms must be >= 0, got -1
        >>> check_positive_int("n_terms", 2.0)
        Traceback (most recent call last):
            ...
        TypeError: n_terms must be an int, got float
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Require ``value`` to be one of ``choices``.

    Args:
        name: Argument name used in the message.
        value: The value to check.
        choices: The allowed values.

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not in ``choices``.

    Examples:
        >>> check_choice("probe", "gaussian", ("gaussian", "rademacher"))
        'gaussian'
        >>> check_choice("probe", "normal", ("gaussian", "rademacher"))
        Traceback (most recent call last):
            ...
        ValueError: probe must be one of ('gaussian', 'rademacher'), got 'normal'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite (``x * 0`` is 0 exactly there; three operations where
    ``torch.isfinite(x).all()`` takes six on CPU)."""
    return bool((x * 0 == 0).all())


def check_finite(name: str, x: Tensor) -> None:
    r"""Raise ``ValueError`` if ``x`` holds NaN or Inf (this reads the tensor: a host sync on GPUs).

    Args:
        name: Description of ``x`` used in the message.
        x: Tensor of any shape.

    Raises:
        ValueError: If an entry of ``x`` is NaN or $\pm\infty$; the message counts both.

    Examples:
        >>> check_finite("x", torch.ones(3))
        >>> check_finite("x", torch.tensor([1.0, float("nan"), float("inf")]))
        Traceback (most recent call last):
            ...
        ValueError: x must be finite, got 1 NaN and 1 Inf entries
    """
    if not all_finite(x):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} must be finite, got {n_nan} NaN and {n_inf} Inf entries")
