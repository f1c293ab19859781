r"""Backward passes that give exact first derivatives but are not differentiable again.

The implicit gradient of the inverse (Behrmann et al., 2019), the Neumann-series gradient, the
backward-in-forward memory saving and the fused closed-form gradients (Chen et al., 2019) return
first derivatives that are not functions of the inputs autograd can differentiate again. Under
``create_graph=True`` (score matching, gradient penalties, Hessian-vector products) their results
would silently be treated as constants, giving wrong second derivatives.
:func:`first_order_backward` makes differentiating them again raise a ``RuntimeError`` that names
the part and what to use instead.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = ["first_order_backward"]

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

Backward = Callable[..., Any]

# what supports second derivatives (plain autograd on the explicit direction)
USE_THE_GENERIC_PATH = (
    "Use fused=False, memory_efficient=False (normflows: reduce_memory=False) and logdet='exact' or "
    "neumann_grad=False."
)


class _SecondDerivativeError(torch.autograd.Function):
    """Identity on the gradients ``tensors[:n]``; differentiating the result raises. The other
    tensors (anchors) only connect the result to whatever a second derivative may be taken for."""

    generate_vmap_rule = True  # a clone: torch.func's transforms (jacrev) batch it themselves

    @staticmethod
    def forward(message: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[None, ...]:
        raise RuntimeError(ctx.message)


def first_order_backward(
    what: str, instead: str, inputs: Callable[[Any], Iterable[Any]]
) -> Callable[[Backward], Backward]:
    r"""Decorate the ``backward`` of a ``torch.autograd.Function`` whose gradients are exact but not
    differentiable again.

    Without ``create_graph`` nothing changes. With it, the backward runs under ``no_grad`` and its
    gradients are returned through a node whose own backward raises ``RuntimeError`` naming
    ``what`` and ``instead``; the node is connected to the upstream gradients and to the
    ``inputs(ctx)`` of the forward that require grad, so any second derivative through it raises
    instead of being silently incomplete.

    Args:
        what: The part, e.g. ``"the fixed-point inverse's implicit gradient"``.
        instead: What supports second derivatives, or that nothing does.
        inputs: Maps ``ctx`` to the forward's differentiable inputs (called before ``backward``).

    Returns:
        The decorator.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     @first_order_backward("Square", "x * x", lambda ctx: ctx.saved_tensors)
        ...     def backward(ctx, grad):
        ...         (x,) = ctx.saved_tensors
        ...         return 2 * x.detach() * grad
        >>> x = torch.tensor(3.0, requires_grad=True)
        >>> (dx,) = torch.autograd.grad(Square.apply(x), x, create_graph=True)
        >>> float(dx.detach())
        6.0
        >>> try:
        ...     dx.backward()
        ... except RuntimeError as error:
        ...     print(str(error)[:55])
        Square gives exact first derivatives but cannot be diff
    """
    message = (
        f"{what} gives exact first derivatives but cannot be differentiated again (create_graph=True: "
        f"score matching, gradient penalties, Hessian-vector products through the block). {instead}"
    )

    def decorate(backward: Backward) -> Backward:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
            if not torch.is_grad_enabled():
                return backward(ctx, *grad_outputs)
            anchors = [t for t in (*grad_outputs, *inputs(ctx)) if isinstance(t, Tensor) and t.requires_grad]
            with torch.no_grad():
                result = backward(ctx, *grad_outputs)
            grads = list(result) if isinstance(result, tuple) else [result]
            present = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
            if not anchors or not present:
                return result
            wrapped = _SecondDerivativeError.apply(message, len(present), *(grads[i] for i in present), *anchors)
            for i, g in zip(present, wrapped):
                grads[i] = g
            return tuple(grads) if isinstance(result, tuple) else grads[0]

        return wrapper

    return decorate
