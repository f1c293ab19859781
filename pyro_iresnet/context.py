r"""Conditioning a residual net on a context: :class:`ConcatContextNet`, $g(x, c) = \mathrm{net}([x, c])$.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995
"""

from __future__ import annotations

__all__ = ["ConcatContextNet"]

import torch
from torch import Tensor, nn

from .errors import check_positive_int
from .lipschitz import lipschitz_bound


class ConcatContextNet(nn.Module):
    r"""$g(x, c) = \mathrm{net}([x, c])$. Since $\|[\tilde W_x, \tilde W_c]\|_2 \ge \|\tilde W_x\|_2$,
    a Lipschitz ``net`` is a contraction in $x$ for every context $c$:

    $$ \mathrm{Lip}_x(g(\cdot, c)) \le \mathrm{Lip}(\mathrm{net}) < 1. $$

    Args:
        net: Network on ``input_dim + context_dim`` features returning ``input_dim``.
        context_dim: Size of the context.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import LipschitzMLP
        >>> g = ConcatContextNet(LipschitzMLP([2 + 3, 16, 2], coeff=0.9), context_dim=3)
        >>> g(torch.randn(4, 2), torch.randn(4, 3)).shape
        torch.Size([4, 2])
        >>> g.lipschitz_constant() < 1
        True
    """

    def __init__(self, net: nn.Module, context_dim: int) -> None:
        super().__init__()
        self.net = net
        self.context_dim = check_positive_int("context_dim", context_dim)
        in_shape = getattr(net, "event_shape", None)
        if in_shape is not None and in_shape[0] <= context_dim:
            raise ValueError(
                f"context_dim ({context_dim}) must be smaller than the net's input size ({in_shape[0]}): "
                "the net takes [x, c]"
            )
        self.event_shape = None if in_shape is None else (in_shape[0] - context_dim,)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return self.net(torch.cat([x, context], dim=-1))

    def lipschitz_constant(self) -> float:
        """Certified Lipschitz constant in $(x, c)$, hence in $x$ (:func:`~pyro_iresnet.lipschitz_bound`
        of ``net``)."""
        return lipschitz_bound(self.net)
