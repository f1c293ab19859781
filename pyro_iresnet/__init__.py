"""Invertible residual networks (i-ResNet) and Residual Flows for Pyro and normflows."""

__version__ = "0.1.0"

__all__ = [
    "ConditionalInvertibleResidual",
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnostics",
    "InvertibleResidual",
    "LipSwish",
    "LipschitzMLP",
    "ResidualBlock",
    "SpectralNormLinear",
    "conditional_iresnet",
    "iresnet",
    "lipschitz_bound",
    "logdet_error_bound",
]

from .block import Diagnostics, ResidualBlock
from .errors import ConvergenceError, ConvergenceWarning
from .lipschitz import LipSwish, LipschitzMLP, SpectralNormLinear, lipschitz_bound
from .logdet import logdet_error_bound
from .pyro import ConditionalInvertibleResidual, InvertibleResidual, conditional_iresnet, iresnet
