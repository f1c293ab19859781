"""Warnings, exceptions and argument checks shared by every module.

Errors name the argument, the value and the rule, e.g. ``coeff must be in (0, 1), got 1.2``.
"""

from __future__ import annotations

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "LipschitzWarning",
    "check_choice",
    "check_finite",
    "check_positive_int",
    "check_probability",
    "check_unit_interval",
]

import torch
from torch import Tensor


class ConvergenceWarning(RuntimeWarning):
    """An iterative solve (the fixed-point inverse or its adjoint) stopped at ``max_iter``
    before its residual met the tolerance."""


class LipschitzWarning(RuntimeWarning):
    """A certified Lipschitz bound of a residual function is not below 1: the block may not be
    invertible (power iteration lagging behind the weights, or an uncertified layer)."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when a solve runs with ``strict=True``."""


def check_unit_interval(name: str, value: float) -> float:
    """Require ``0 < value < 1`` (e.g. the Lipschitz target ``coeff``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {type(value).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def check_probability(name: str, value: float) -> float:
    """Require ``0 < value <= 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Require an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Require ``value`` to be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (this reads the tensor: a host sync on GPUs)."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} must be finite, got {n_nan} NaN and {n_inf} Inf entries")
