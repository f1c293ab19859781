"""Invertible residual networks (i-ResNet) and Residual Flows for Pyro and normflows."""

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "ConditionalInvertibleResidual",
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnostics",
    "FactorOut",
    "InvertibleResidual",
    "LipSwish",
    "LipschitzCNN",
    "LipschitzMLP",
    "LipschitzWarning",
    "LogitTransform",
    "MultiscaleTransform",
    "ResidualBlock",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "Squeeze",
    "Unsqueeze",
    "bits_per_dim",
    "conditional_iresnet",
    "conv_iresnet",
    "dequantize",
    "iresnet",
    "lipschitz_bound",
    "logdet_error_bound",
    "multiscale_iresnet",
]

from .block import Diagnostics, ResidualBlock
from .conv import LipschitzCNN, SpectralNormConv2d
from .errors import ConvergenceError, ConvergenceWarning, LipschitzWarning
from .images import (
    ActNorm,
    FactorOut,
    LogitTransform,
    MultiscaleTransform,
    Squeeze,
    Unsqueeze,
    bits_per_dim,
    conv_iresnet,
    dequantize,
    multiscale_iresnet,
)
from .lipschitz import LipschitzMLP, LipSwish, SpectralNormLinear, lipschitz_bound
from .logdet import logdet_error_bound
from .pyro import ConditionalInvertibleResidual, InvertibleResidual, conditional_iresnet, iresnet
