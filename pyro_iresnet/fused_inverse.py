r"""Inverse solves on the fused path of :class:`~pyro_iresnet.ResidualBlock` (the library's own
:class:`~pyro_iresnet.LipschitzMLP`, and normflows' in the normflows adapter; see
:mod:`pyro_iresnet.fused`).

* :class:`SolverNet`: $g$ with its constants folded into the weights, for solver iterations and the
  Newton iteration's Jacobians; :func:`solver_net` builds it.
* :func:`newton_inverse`: fixed-point steps $x \leftarrow y - g(x)$ that turn, per sample, into
  Newton and chord steps with the exact Jacobian where they contract slowly; implicit gradient
  with the adjoint $(I + J_g)^\top u = \bar x$ solved exactly.
* :func:`newton_inverse_and_logdet`: the same solve and $\log|\det(I + J_g(x))|$ at the solution,
  from the forward pass that checked it (sampling).

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = ["SolverNet", "newton_inverse", "newton_inverse_and_logdet", "solver_net"]

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import _check_floating_tensor, check_positive_int
from .first_order import first_order_backward
from .fused import (
    _LIPSWISH_SCALE,
    FusedMLP,
    _act,
    _backward,
    _forward,
    _inverse,
    _jacobian,
    _jacobian_product,
    _logabsdet,
    _scratch,
)
from .inverse import (
    _COMPACT_FRACTION,
    _INVERSE_INSTEAD,
    SolveInfo,
    _check_targets,
    _finished,
    _max_abs,
    _residual_tolerance,
    _tolerances,
)
from .inverse import _report as report_nonconvergence


class SolverNet:
    r"""$x \mapsto g(x)$ for solver iterations, and $J_g$ at the points of a forward pass (no
    autograd; call under ``no_grad``).

    Constants are folded into the weights once: a LipSwish layer computes $u = \beta(\tilde W h + b)$,
    $a = u\,\mathrm{sigmoid}(u)$ and the next layer uses $\tilde W / (1.1\beta)$, so each hidden layer
    costs one ``addmm`` and one SiLU ($u \mapsto u\,\mathrm{sigmoid}(u)$). In these folded terms
    $J_g = V_L S_{L-1} V_{L-1} \cdots S_1 V_1$ with $V_l$ the folded weights and
    $S_l = \operatorname{diag}(\mathrm{SiLU}'(u_l))$ (ELU layers are not folded: $S_l = \mathrm{ELU}'(z_l)$).
    In float16/bfloat16 nothing is folded (LipSwish is computed as $z\,\mathrm{sigmoid}(\beta z)/1.1$):
    there $\beta z$ overflows for a large $\beta$ and $\beta \tilde W$ underflows to subnormals for
    a tiny one, where the module itself stays accurate. A conditional net's context enters the first
    layer through its (folded) context weight (its Jacobians, in $x$, do not involve it).

    Args:
        mlp: From :func:`fused_mlp` (detached here).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import LipschitzMLP
        >>> from pyro_iresnet.fused import fused_mlp
        >>> net = LipschitzMLP([2, 8, 2]).eval()
        >>> g = solver_net(fused_mlp(net))
        >>> x = torch.randn(4, 2)
        >>> with torch.no_grad():
        ...     gx, reference = g(x), net(x)
        >>> torch.allclose(gx, reference, atol=1e-6)
        True
    """

    def __init__(self, mlp: FusedMLP) -> None:
        self.mlp = mlp = mlp.detached()
        self.layers: list[tuple[Tensor, Tensor | None, str | None, float | None]] = []
        self.fold = mlp.weights[0].dtype not in (torch.float16, torch.bfloat16)
        scale: Tensor | float = 1.0
        context_weight = mlp.context_weight
        for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
            kind = mlp.kinds[i] if i < len(mlp.kinds) else None
            w = w * scale
            scale = 1.0
            if kind == "lipswish" and self.fold:
                # beta >= 4 / (largest float) keeps 1 / (1.1 beta) finite; the clamp changes
                # sigmoid(beta z) by at most beta_min |z| / 4: nothing in float32/64, < 1.5e-5 |z| in float16
                beta = mlp.betas[i].clamp(min=4.0 / torch.finfo(w.dtype).max)
                w, b = w * beta, None if b is None else b * beta
                if i == 0 and context_weight is not None:
                    context_weight = context_weight * beta
                scale = 1.0 / (_LIPSWISH_SCALE * beta)
            self.layers.append((w.t(), b, kind, mlp.alphas[i] if kind else None))
        self.context_weight_t = None if context_weight is None else context_weight.t()
        self.weights_t = [wt for wt, *_ in self.layers]

    def __call__(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""$g(x)$ (or $g(x, c)$ for a conditional net) for ``x`` of shape ``(N, d)`` and ``context``
        of shape ``(N, context_dim)``; overwrites its temporaries in place, so do not differentiate
        through it."""
        if (self.context_weight_t is None) != (context is None):
            raise ValueError("SolverNet: pass a context exactly when the net is conditional")
        return self._forward(x, keep=False, context=context)[0]

    def _forward(self, x: Tensor, keep: bool, context: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """$g(x)$ (fresh) and, with ``keep``, the hidden layers' folded pre-activations (scratch
        tensors, valid until the next call)."""
        h, pre = x, []
        last = len(self.layers) - 1
        for i, (wt, b, kind, alpha) in enumerate(self.layers):
            out = _scratch(("solver_u", i), (h.shape[0], wt.shape[1]), h) if keep and i < last else None
            h = torch.mm(h, wt, out=out) if b is None else torch.addmm(b, h, wt, out=out)
            if i == 0 and context is not None:
                h.addmm_(context, self.context_weight_t)
            if i == last:
                break
            if keep:
                pre.append(h)
            if kind == "lipswish" and self.fold:
                h = torch.nn.functional.silu(h, inplace=not keep)
            elif kind == "lipswish":
                h = h * torch.sigmoid(h * self.mlp.betas[i]) / _LIPSWISH_SCALE
            else:
                h = torch.nn.functional.elu(h, alpha)
        return h, pre

    def _jacobian(self, pre: list[Tensor], n: int, rows: Tensor | None = None) -> Tensor:
        """$J_g$ ``(n, d, d)`` at the ``n`` points whose pre-activations are ``pre`` (or at those of
        its rows ``rows``, ``n`` of them)."""
        slopes = []
        for i, u in enumerate(pre):
            if rows is not None:
                u = u.index_select(0, rows)
            _, _, kind, alpha = self.layers[i]
            if kind == "lipswish" and self.fold:  # SiLU'(u) = s (1 + u (1 - s)), s = sigmoid(u), in one pass
                out = _scratch(("solver_slope", i), u.shape, u)
                slopes.append(torch.ops.aten.silu_backward(u.new_ones(()).expand_as(u), u, grad_input=out))
            elif kind == "lipswish":
                slopes.append(_act(kind, u, self.mlp.betas[i], None)[1])
            else:
                slopes.append(torch.where(u > 0, 1.0, torch.exp(u.clamp(max=0.0)).mul_(alpha)))
        return _jacobian_product(self.weights_t, slopes, n, scratch=True)[0]


def solver_net(mlp: FusedMLP) -> SolverNet:
    r"""The :class:`SolverNet` of ``mlp``: $x \mapsto g(x)$ for solver iterations (no autograd).

    Args:
        mlp: From :func:`fused_mlp`.

    Returns:
        A callable mapping ``(N, d)`` to $g(x)$ of shape ``(N, d)``; it may overwrite its
        temporaries in place, so do not differentiate through it.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import LipschitzMLP
        >>> from pyro_iresnet.fused import fused_mlp
        >>> net = LipschitzMLP([2, 8, 2], activation="elu").eval()
        >>> x = torch.randn(4, 2)
        >>> with torch.no_grad():
        ...     gx = solver_net(fused_mlp(net))(x)
        >>> torch.allclose(gx, net(x), atol=1e-6)
        True
    """
    return SolverNet(mlp)


def _newton(
    net: SolverNet, y: Tensor, tol: Tensor, max_iter: int, with_logdet: bool = False, context: Tensor | None = None
) -> tuple[Tensor, Tensor | None, SolveInfo]:
    r"""Solve $F(x) = x + g(x, c) - y = 0$ per sample by chord steps
    $x \leftarrow x - (I + J_0)^{-1} F(x)$; per-sample early exit on the residual.

    Every sample starts with $J_0 = 0$, i.e. fixed-point steps $x \leftarrow y - g(x)$. A sample
    whose steps contract by $\rho = \|F(x_k)\|_\infty / \|F(x_{k-1})\|_\infty$ would need about
    $\ln(\mathrm{tol} / \|F(x_k)\|_\infty) / \ln \rho$ more of them; when that exceeds $d + 2$ (a
    Jacobian costs $d$ Jacobian-vector products) it sets $J_0 = J_g(x_k)$, a Newton step, and keeps
    it for the chord steps that follow until they too contract slowly. A Jacobian step that did not
    reduce the residual ends the sample's Jacobian steps: it continues with fixed-point steps,
    which contract for $\mathrm{Lip}(g) < 1$ from any point.

    Finished samples (residual within ``tol``, or NaN/Inf) leave the batch once they are an
    eighth of it; until then they keep iterating and are checked again. Returns the points
    whose residual was evaluated and, ``with_logdet``, $\log|\det(I + J_g(x))|$ at them, from the
    hidden pre-activations of the forward pass that checked them, in one Jacobian over the batch at
    the end (meaningless where the iterate is not finite; those samples are not converged). A
    context $c$ (one row per sample) leaves the batch with its sample.
    """
    n, d = y.shape
    x_out, residual = y.clone(), torch.full_like(tol, float("inf"))
    if n == 0:
        return x_out, y.new_zeros(0) if with_logdet else None, SolveInfo(0, residual, True)
    # the hidden pre-activations at the returned points, for the log-det
    pre_out = [y.new_empty(n, wt.shape[1]) for wt in net.weights_t[:-1]] if with_logdet else []
    logdet = None
    active = torch.arange(n, device=y.device)
    x, y_act, tol_act, context_act = y, y, tol, context
    eye = torch.eye(d, dtype=y.dtype, device=y.device)
    step = eye.expand(n, d, d)  # (I + J_0)^{-1}; J_0 = 0 (a fixed-point step) until a refresh
    use_jac = banned = prev_res = None  # masks, created by the first refresh
    for iteration in range(1, max_iter + 1):
        gx, pre = net._forward(x, keep=True, context=context_act)
        f = gx.add_(x).sub_(y_act)  # F(x); the fixed-point step is x - F(x)
        res = _max_abs(f)
        done = _finished(res, tol_act)
        n_done = int(done.sum()) if iteration < max_iter else done.shape[0]
        if n_done and (n_done * _COMPACT_FRACTION >= done.shape[0] or iteration == max_iter):
            ended = done.nonzero().squeeze(1) if n_done < done.shape[0] else None
            rows = active if ended is None else active.index_select(0, ended)
            for out, t in zip((x_out, residual, *pre_out), (x, res, *pre)):
                out[rows] = t if ended is None else t.index_select(0, ended)
            if ended is None:
                break
            keep = (~done).nonzero().squeeze(1)
            pre = [p.index_select(0, keep) for p in pre]
            active, x, f, y_act, tol_act, context_act, res, prev_res, step, use_jac, banned, done = (
                t if t is None else t.index_select(0, keep)
                for t in (active, x, f, y_act, tol_act, context_act, res, prev_res, step, use_jac, banned, done))
        if prev_res is not None:
            if use_jac is not None:
                worse = use_jac & (res > prev_res)  # the Jacobian step failed: fixed-point steps only
                banned, use_jac = banned | worse, use_jac & ~worse
                step = torch.where(worse[:, None, None], eye, step)
            # fixed-point (or chord) steps still needed at the observed contraction rate
            remaining = torch.log(tol_act / res) / torch.log(res / prev_res).clamp(max=-1e-12)
            refresh = ~done & (remaining > d + 2)
            if banned is not None:
                refresh &= ~banned
            if bool(refresh.any()):
                rows = refresh.nonzero().squeeze(1)
                if use_jac is None:
                    use_jac, banned, step = torch.zeros_like(done), torch.zeros_like(done), step.clone()
                step[rows] = _inverse(net._jacobian(pre, rows.shape[0], rows))
                use_jac = use_jac | refresh
        x = x - (f if use_jac is None else torch.bmm(step, f.unsqueeze(-1)).squeeze(-1))
        prev_res = res
    if with_logdet:  # J_g at the returned points, from the pre-activations that checked them
        logdet = _logabsdet(net._jacobian(pre_out, n), for_backward=False)[0]
    converged = bool((residual <= tol).all())
    return x_out, logdet, SolveInfo(iteration, residual, converged)


def _check_newton_inputs(y: Tensor, weight: Tensor, context: Tensor | None, context_weight: Tensor | None) -> None:
    """``y`` of shape ``(N, d)`` in the dtype of the net, whose first weight is ``weight`` (``(h, d)``),
    and a context of shape ``(N, context_dim)`` in that dtype exactly when the net is conditional
    (``context_weight``, ``(h, context_dim)``, not ``None``)."""
    _check_targets(y, context)  # also: a context is a tensor with one row per sample
    d = weight.shape[1]
    if y.dim() != 2 or y.shape[1] != d:
        raise ValueError(f"y must have shape (N, {d}) for this net, got {tuple(y.shape)}")
    if y.dtype != weight.dtype:
        raise TypeError(f"y has dtype {y.dtype} but the net's weights are {weight.dtype}; convert one of them")
    if (context_weight is None) != (context is None):
        raise ValueError(
            "the net is conditional: pass a context" if context is None else "the net takes no context, got one"
        )
    if context is None:
        return
    _check_floating_tensor("context", context)
    if context.dim() != 2 or context.shape[1] != context_weight.shape[1]:
        raise ValueError(f"context must have shape (N, {context_weight.shape[1]}), got {tuple(context.shape)}")
    if context.dtype != weight.dtype:
        raise TypeError(
            f"context has dtype {context.dtype} but the net's weights are {weight.dtype}; convert one of them"
        )


@dataclass
class _InverseConfig:
    mlp: FusedMLP
    atol: float
    rtol: float
    max_iter: int
    strict: bool
    lipschitz: Callable[[], float | None]
    info: SolveInfo


class _NewtonInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config: _InverseConfig, y: Tensor, context: Tensor | None, *tensors: Tensor) -> Tensor:
        mlp = config.mlp.detached()
        tol = _residual_tolerance(y.detach(), config.atol, config.rtol)
        context = None if context is None else context.detach()
        x, _, info = _newton(SolverNet(mlp), y.detach(), tol, config.max_iter, context=context)
        config.info.iterations, config.info.residual, config.info.converged = (
            info.iterations, info.residual, info.converged)
        if not info.converged:
            report_nonconvergence(info, "Newton inverse", config.strict, config.lipschitz())
        ctx.mlp, ctx.conditional = mlp, context is not None
        ctx.save_for_backward(x, *(() if context is None else (context,)), *tensors)
        return x

    @staticmethod
    @first_order_backward("The Newton inverse's implicit gradient", _INVERSE_INSTEAD, lambda ctx: ctx.saved_tensors)
    def backward(ctx, grad_x: Tensor) -> tuple[Tensor | None, ...]:
        x = ctx.saved_tensors[0]
        context = ctx.saved_tensors[1] if ctx.conditional else None
        _, cache = _forward(ctx.mlp, x, context=context)
        inv_t = _inverse(_jacobian(ctx.mlp, cache)[0]).mT
        u = torch.bmm(inv_t, grad_x.unsqueeze(-1)).squeeze(-1)  # u = (I + J)^{-T} grad_x
        # x(y, c, theta) solves x + g(x, c; theta) = y: dx = (I + J)^{-1} (dy - dg), so the
        # gradients are u for y and -u^T dg/d(c, theta) for the context and the parameters
        _, grads, grad_context = _backward(ctx.mlp, cache, -u, None, None)
        return (None, u, grad_context, *ctx.mlp.raw_weight_grads(grads))


def newton_inverse(
    mlp: FusedMLP,
    y: Tensor,
    context: Tensor | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 1000,
    strict: bool = False,
    lipschitz: Callable[[], float | None] = lambda: None,
) -> tuple[Tensor, SolveInfo]:
    r"""Solve $x + g(x) = y$ (or $x + g(x, c) = y$) by fixed-point steps accelerated with the exact
    per-sample Jacobian (safeguarded Newton and chord steps).

    Stops per sample on the residual $\|x + g(x) - y\|_\infty \le \mathrm{atol} +
    \mathrm{rtol}\|y\|_\infty$ (defaults from :func:`~pyro_iresnet.inverse.default_tolerances`).
    Differentiable in ``y``, the context and ``mlp.tensors()`` by the implicit function theorem, with the adjoint
    $u = (I + J_g)^{-\top} \bar x$ solved exactly rather than iterated (first derivatives only:
    differentiating them again raises, see :mod:`pyro_iresnet.first_order`). Meant for small $d$ (a
    Jacobian costs $d$ Jacobian-vector products; the $d \times d$ inverse is in closed form for
    $d \le 2$).

    Each sample takes fixed-point steps $x \leftarrow y - g(x)$ while they contract fast. Once the
    observed contraction predicts more than $d + 2$ further steps, it takes a Newton step and keeps
    its Jacobian for chord steps

    $$ x \leftarrow x - (I + J_g(x_k))^{-1} (x + g(x) - y), $$

    refreshed when they contract slowly in turn. A Jacobian step that does not reduce the residual
    ends the sample's Jacobian steps; fixed-point steps, a contraction for $\mathrm{Lip}(g) < 1$,
    finish it.

    Args:
        mlp: From :func:`fused_mlp`.
        y: Targets ``(N, d)``.
        context: For a conditional net (``mlp.context_weight`` set): the context ``(N, context_dim)``.
        atol: Absolute residual tolerance.
        rtol: Tolerance relative to $\|y\|_\infty$ per sample.
        max_iter: Iteration cap.
        strict: Raise :class:`~pyro_iresnet.ConvergenceError` instead of warning.
        lipschitz: Returns a Lipschitz bound of $g$ (or None) for the non-convergence message.

    Returns:
        $x$ of shape ``(N, d)`` and a :class:`~pyro_iresnet.inverse.SolveInfo`.

    Raises:
        TypeError: If ``y`` or the context is not a floating tensor in the net's dtype.
        ValueError: If ``atol``/``rtol`` is NaN or negative, ``y`` is not ``(N, d)`` for the
            net's $d$, or a context is missing for a conditional net, given to an unconditional
            one, or not ``(N, context_dim)``.
        ConvergenceError: Instead of the warning, with ``strict=True``.

    Warns:
        ConvergenceWarning: A sample did not reach the tolerance in ``max_iter`` iterations.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import LipschitzMLP
        >>> from pyro_iresnet.fused import fused_mlp
        >>> net = LipschitzMLP([2, 8, 2], coeff=0.9).eval()
        >>> y = torch.randn(4, 2)
        >>> x, info = newton_inverse(fused_mlp(net), y)
        >>> info.converged, torch.allclose(x + net(x), y, atol=1e-5)
        (True, True)
    """
    check_positive_int("max_iter", max_iter)
    _check_newton_inputs(y, mlp.weights[0], context, mlp.context_weight)
    info = SolveInfo()
    config = _InverseConfig(mlp, *_tolerances(y.dtype, atol, rtol), max_iter, strict, lipschitz, info)
    return _NewtonInverse.apply(config, y, context, *mlp.tensors()), info


def newton_inverse_and_logdet(
    net: SolverNet,
    y: Tensor,
    context: Tensor | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 1000,
    strict: bool = False,
    lipschitz: Callable[[], float | None] = lambda: None,
) -> tuple[Tensor, Tensor, SolveInfo]:
    r"""$x$ with $x + g(x) = y$ (or $x + g(x, c) = y$) and the exact $\log|\det(I + J_g(x))|$ at
    it, values only (no gradient; for sampling).

    The solve is the iteration of :func:`newton_inverse` (fixed-point steps that turn into Newton
    and chord steps where they contract slowly), stopped per sample on
    $\|x + g(x) - y\|_\infty \le \mathrm{atol} + \mathrm{rtol}\|y\|_\infty$. The log-det is taken
    from the forward pass that checked the returned point, so it costs the $d$ Jacobian-vector
    products of $J_g(x)$ and no extra evaluation of $g$.

    Args:
        net: From :func:`solver_net`.
        y: Targets ``(N, d)``.
        context: For a conditional net: the context ``(N, context_dim)``.
        atol: Absolute residual tolerance (default from
            :func:`~pyro_iresnet.inverse.default_tolerances`).
        rtol: Tolerance relative to $\|y\|_\infty$ per sample.
        max_iter: Iteration cap.
        strict: Raise :class:`~pyro_iresnet.ConvergenceError` instead of warning.
        lipschitz: Returns a Lipschitz bound of $g$ (or None) for the non-convergence message.

    Returns:
        $x$ of shape ``(N, d)``, the log-dets of shape ``(N,)`` (meaningless where the iterate is
        not finite: such samples have a NaN/Inf residual and count as not converged) and a
        :class:`~pyro_iresnet.inverse.SolveInfo`.

    Raises:
        TypeError: If ``y`` or the context is not a floating tensor in the net's dtype.
        ValueError: If ``atol``/``rtol`` is NaN or negative, ``y`` is not ``(N, d)`` for the
            net's $d$, or a context is missing for a conditional net, given to an unconditional
            one, or not ``(N, context_dim)``.
        ConvergenceError: Instead of the warning, with ``strict=True``.

    Warns:
        ConvergenceWarning: A sample did not reach the tolerance in ``max_iter`` iterations.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import LipschitzMLP
        >>> from pyro_iresnet.fused import fused_mlp
        >>> from pyro_iresnet.logdet import exact_logdet
        >>> net = LipschitzMLP([2, 8, 2], coeff=0.9).eval()
        >>> y = torch.randn(4, 2)
        >>> with torch.no_grad():
        ...     x, logdet, info = newton_inverse_and_logdet(solver_net(fused_mlp(net)), y)
        >>> info.converged, torch.allclose(x + net(x), y, atol=1e-5)
        (True, True)
        >>> torch.allclose(logdet, exact_logdet(net, x)[1], atol=1e-5)
        True
    """
    check_positive_int("max_iter", max_iter)
    _check_newton_inputs(y, net.mlp.weights[0], context, net.mlp.context_weight)
    atol, rtol = _tolerances(y.dtype, atol, rtol)
    with torch.no_grad():
        x, logdet, info = _newton(
            net, y, _residual_tolerance(y, atol, rtol), max_iter, with_logdet=True, context=context
        )
    if not info.converged:
        report_nonconvergence(info, "Newton inverse", strict, lipschitz())
    return x, logdet, info
