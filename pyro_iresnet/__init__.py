r"""Invertible residual networks (i-ResNet) and Residual Flows for Pyro and normflows.

Examples:
    Density estimation with two blocks: ``ComposeTransform(blocks).inv`` makes ``log_prob(data)``
    run only the explicit maps $x \mapsto x + g(x)$.

    >>> import pyro.distributions as dist
    >>> import torch
    >>> from pyro_iresnet import iresnet
    >>> blocks = [iresnet(2, hidden_dims=[16], logdet="exact") for _ in range(2)]
    >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    >>> flow = dist.TransformedDistribution(base, [dist.transforms.ComposeTransform(blocks).inv])
    >>> flow.log_prob(torch.randn(8, 2)).shape
    torch.Size([8])

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

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
    "NonFiniteError",
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
    "name_blocks",
]

from .block import Diagnostics, ResidualBlock, name_blocks
from .conv import LipschitzCNN, SpectralNormConv2d
from .errors import ConvergenceError, ConvergenceWarning, LipschitzWarning, NonFiniteError
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
