r"""Inverse of $y = x + g(x)$ by fixed-point iteration, with an implicit gradient.

For $\mathrm{Lip}(g) = L < 1$ the map $x \mapsto y - g(x)$ is a contraction (Banach), so
$x_{n+1} = y - g(x_n)$ converges with the a-priori bound

$$ \|x^* - x_n\| \le \frac{L^n}{1 - L} \|x_1 - x_0\|. $$

Iteration stops per sample on the residual $\|x + g(x) - y\|_\infty \le
\mathrm{atol} + \mathrm{rtol}\,\|y\|_\infty$, runs without recording a graph, and is differentiated
implicitly: with $v = \partial \ell / \partial x^*$, the adjoint $u$ solves $u = v - J_g^\top u$
(again a contraction) and $\partial\ell/\partial y = u$, $\partial\ell/\partial\theta = -u^\top
\partial g/\partial\theta$. The adjoint is linear in $v$, so its tolerance is in units of each
sample's $v_n$: $\|u_n + J_g^\top u_n - v_n\|_\infty \le (\mathrm{atol} + \mathrm{rtol})\,\|v_n\|_\infty$ (the
forward's tolerance at $\|y\|_\infty = 1$), and scaling the loss does not change the gradient's
relative accuracy.

References:
    Invertible Residual Networks (Behrmann et al., 2019), Algorithm 1,
    https://arxiv.org/abs/1811.00995

    Anderson Acceleration for Fixed-Point Iterations (Walker & Ni, 2011),
    https://doi.org/10.1137/10078356X
"""

from __future__ import annotations

__all__ = ["SolveInfo", "default_tolerances", "fixed_point_inverse"]

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import (
    ConvergenceError,
    ConvergenceWarning,
    _check_floating_tensor,
    check_choice,
    check_positive_int,
    check_tolerance,
)
from .first_order import USE_THE_GENERIC_PATH, first_order_backward
from .logdet import _upcast_half

Net = Callable[[Tensor], Tensor]

_ANDERSON_MEMORY = 5  # iterates kept at least: the dimension + 2, between this and _ANDERSON_MAX_MEMORY
_ANDERSON_MAX_MEMORY = 32
_PROGRESS_WINDOW = 50  # plain iterations between progress checks
_PROGRESS_FACTOR = 0.5  # the worst residual must at least halve per window, else Anderson takes over
_COMPACT_FRACTION = 8  # finished samples leave the batch once they are 1/8 of it
_ANDERSON_RIDGE = 1e-10


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    r"""``(atol, rtol)`` reachable in ``dtype``: ``(1e-12, 1e-13)`` in float64, ``(1e-6, 1e-6)`` in
    float32, ``(1e-2, 1e-2)`` in bfloat16 (whose rounding, $\varepsilon \approx 7.8 \times 10^{-3}$,
    leaves 1e-3 out of reach) and ``(1e-3, 1e-3)`` in float16.

    A sample has converged when $\|x + g(x) - y\|_\infty \le \mathrm{atol} + \mathrm{rtol}\,\|y\|_\infty$.

    Args:
        dtype: Floating dtype of the solve.

    Raises:
        TypeError: If ``dtype`` is not a real floating ``torch.dtype``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> default_tolerances(torch.float32)
        (1e-06, 1e-06)
        >>> default_tolerances(torch.float64)
        (1e-12, 1e-13)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"dtype must be a real floating torch.dtype, got {dtype!r}")
    if dtype == torch.float64:
        return 1e-12, 1e-13
    if dtype == torch.float32:
        return 1e-6, 1e-6
    if dtype == torch.bfloat16:
        return 1e-2, 1e-2
    return 1e-3, 1e-3


@dataclass
class SolveInfo:
    r"""What one solve did.

    Attributes:
        iterations: Iterations of the forward solve.
        residual: Per-sample residual $\|x + g(x) - y\|_\infty$ at the last check, shape ``(N,)``
            (NaN/Inf for a sample that diverged).
        converged: Whether every sample met its tolerance.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> x, info = fixed_point_inverse(lambda x: 0.5 * torch.tanh(x), torch.randn(4, 3))
        >>> info.converged, info.residual.shape, info.iterations < 100
        (True, torch.Size([4]), True)
    """

    iterations: int = 0
    residual: Tensor | None = None
    converged: bool = True


def _check_targets(y: Tensor, context: Tensor | None = None) -> None:
    """The targets ``y`` of a solve: a floating tensor ``(N, *event)``; a context with ``N`` rows."""
    _check_floating_tensor("y", y)
    if y.dim() < 2:
        raise ValueError(f"y must have shape (N, *event), got {tuple(y.shape)}")
    if context is not None and not isinstance(context, Tensor):
        raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context is not None and (context.dim() < 1 or len(context) != len(y)):
        raise ValueError(f"context must have one row per sample of y ({len(y)}), got shape {tuple(context.shape)}")


def _tolerances(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """``atol``, ``rtol``, each :func:`default_tolerances` of ``dtype`` where ``None``; a NaN or
    negative one raises a ``ValueError``."""
    atol, rtol = check_tolerance("atol", atol), check_tolerance("rtol", rtol)
    default_atol, default_rtol = default_tolerances(dtype)
    return default_atol if atol is None else atol, default_rtol if rtol is None else rtol


def _residual_tolerance(y: Tensor, atol: float, rtol: float) -> Tensor:
    """``atol + rtol * max|y|`` per sample; Inf for a NaN target (whose NaN residual ends it at once)."""
    return (atol + rtol * y.flatten(1).abs().amax(1)).nan_to_num(nan=math.inf)


def _finished(residual: Tensor, tol: Tensor) -> Tensor:
    """Samples whose residual is within ``tol`` or NaN/Inf (a diverged iterate cannot recover);
    ``tol`` from :func:`_residual_tolerance` (never NaN)."""
    return residual.nan_to_num(nan=0.0, posinf=0.0) <= tol


def _max_abs(x: Tensor) -> Tensor:
    return x.flatten(1).abs().amax(1)


RowNet = Callable[[Tensor, Tensor], Tensor]


def _plain_fixed_point(g: RowNet, y: Tensor, tol: Tensor, max_iter: int) -> tuple[Tensor, SolveInfo]:
    """$x \\leftarrow y - g(x)$; converged samples leave the batch (per-sample early exit), and so do
    diverged ones (a NaN/Inf iterate cannot recover; they are reported as not converged).

    Every ``_PROGRESS_WINDOW`` iterations the worst residual of the remaining samples must have
    halved; if not (a contraction factor near 1, or float32 rounding, which the plain iteration
    amplifies by about $1/(1 - L)$), Anderson acceleration finishes those samples within the
    remaining iteration budget.

    ``g(x_rows, rows)`` evaluates $g$ on the rows ``rows`` of the batch. The iterates of the
    samples still running are kept compact (no gather from the full batch per iteration); finished
    rows are written back and dropped once they make up an eighth of the rows still iterating (or
    all of them, or at a progress check). A finished sample returns the iterate whose residual was
    checked, not the step computed from it, so ``SolveInfo.residual`` is the residual of the
    returned point."""
    x = y.clone()
    window_worst = None
    residual = torch.full_like(tol, float("inf"))
    active = torch.arange(y.shape[0], device=y.device)
    x_active, y_active, tol_active = y, y, tol
    for iteration in range(1, max_iter + 1):
        x_next = y_active - g(x_active, active)
        step_residual = _max_abs(x_next - x_active)  # = residual of x_active, exactly
        done = _finished(step_residual, tol_active)
        n_done = int(done.sum())
        if n_done == done.shape[0] or iteration == max_iter:  # return the iterates whose residual was checked
            x[active], residual[active] = x_active, step_residual
            converged = n_done == done.shape[0] and bool(torch.isfinite(residual).all())
            return x, SolveInfo(iteration, residual, converged)
        # Finished samples leave the batch once they are an eighth of it (until then iterating them
        # further costs less than compacting the batch, and keeps them converged), and before each
        # progress check, so that only unfinished samples are judged or handed to Anderson.
        check_progress = iteration % _PROGRESS_WINDOW == 0
        if n_done and (n_done * _COMPACT_FRACTION >= done.shape[0] or check_progress):
            finished, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            rows = active.index_select(0, finished)
            x[rows], residual[rows] = x_active.index_select(0, finished), step_residual.index_select(0, finished)
            active, y_active, tol_active = active.index_select(0, keep), y_active.index_select(0, keep), \
                tol_active.index_select(0, keep)
            x_next, step_residual = x_next.index_select(0, keep), step_residual.index_select(0, keep)
        x_active = x_next
        if check_progress:
            worst = step_residual.max()
            if window_worst is not None and bool(worst > _PROGRESS_FACTOR * window_worst):
                x[active], residual[active] = x_active, step_residual
                return _finish_with_anderson(g, y, x, residual, tol, active, iteration, max_iter)
            window_worst = worst
    raise AssertionError("unreachable: the last iteration returns")


def _finish_with_anderson(
    g: RowNet, y: Tensor, x: Tensor, residual: Tensor, tol: Tensor, active: Tensor, iteration: int, max_iter: int
) -> tuple[Tensor, SolveInfo]:
    """Anderson acceleration on the ``active`` rows, from their current iterates; the other rows
    have finished (met the tolerance, or diverged to NaN/Inf, which counts as not converged)."""
    x_rows, info = _anderson(
        lambda z, rows: g(z, active[rows]), y[active], tol[active], max_iter - iteration, x0=x[active]
    )
    x[active] = x_rows
    residual[active] = info.residual
    converged = info.converged and bool(torch.isfinite(residual).all())
    return x, SolveInfo(iteration + info.iterations, residual, converged)


def _anderson(
    g: RowNet, y: Tensor, tol: Tensor, max_iter: int, x0: Tensor | None = None
) -> tuple[Tensor, SolveInfo]:
    r"""Anderson acceleration of $G(x) = y - g(x)$ (type II, undamped), from ``x0`` (default $y$),
    with per-sample early exit.

    The memory is $D + 2$ iterates for samples of size $D$, at least 5 and at most 32: on a linear
    map Anderson acts like restarted GMRES, which can stall with fewer than $D$ iterates (e.g. for
    $g(x) = 0.995\,Qx$, $Q$ orthogonal, in 8 dimensions, memory 5 does not reach 1e-12 in 2,000
    iterations and memory 10 does in about 20). The cap bounds the histories, which take memory
    $\times$ batch $\times$ $D$, for large samples (images). Finished samples (residual within ``tol``, or
    NaN/Inf, which counts as not converged) leave the batch with their histories once they are an
    eighth of it, as in the plain iteration; each returns the iterate whose residual was checked."""
    n = y.shape[0]
    if n == 0:
        return y.clone(), SolveInfo(0, y.new_zeros(0), True)
    flat_y = y.reshape(n, -1)
    size = flat_y.shape[1]
    m = min(max(_ANDERSON_MEMORY, size + 2), _ANDERSON_MAX_MEMORY)
    finfo = torch.finfo(y.dtype)
    x = flat_y if x0 is None else x0.reshape(n, -1)  # never written in place
    x_out, residual = x.clone(), torch.full_like(tol, float("inf"))
    active = torch.arange(n, device=y.device)
    y_active, tol_active = flat_y, tol
    fs = flat_y.new_zeros(n, m, size)  # the last m residuals G(x) - x and images G(x), per sample
    gs = torch.zeros_like(fs)
    ones = _upcast_half(flat_y.new_ones(n, m, 1))
    ridge = max(_ANDERSON_RIDGE, 100 * finfo.eps)
    for iteration in range(1, max_iter + 1):
        gx = y_active - g(x.view(-1, *y.shape[1:]), active).reshape(x.shape)
        f = gx - x
        step_residual = f.abs().amax(1)
        done = _finished(step_residual, tol_active)
        n_done = int(done.sum())
        if n_done == done.shape[0]:
            x_out[active], residual[active] = x, step_residual
            return x_out.view_as(y), SolveInfo(iteration, residual, bool((residual <= tol).all()))
        if n_done and n_done * _COMPACT_FRACTION >= done.shape[0]:
            finished, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            rows = active.index_select(0, finished)
            x_out[rows], residual[rows] = x.index_select(0, finished), step_residual.index_select(0, finished)
            active, x, gx, f, y_active, tol_active, fs, gs = (
                t.index_select(0, keep) for t in (active, x, gx, f, y_active, tol_active, fs, gs))
        slot = (iteration - 1) % m
        fs[:, slot], gs[:, slot] = f, gx
        k = min(iteration, m)
        gram = fs[:, :k] @ fs[:, :k].transpose(1, 2)
        diagonal = gram.diagonal(dim1=1, dim2=2)  # ridge relative to the largest squared residual
        diagonal.add_(diagonal.amax(1, keepdim=True).clamp_min_(finfo.tiny).mul_(ridge))
        alpha, status = torch.linalg.solve_ex(_upcast_half(gram), ones[: gram.shape[0], :k])
        alpha = (alpha / alpha.sum(1, keepdim=True)).to(y.dtype)
        # Where the least-squares system is singular or ill-posed (status, or weights that are not
        # finite: their sum, 1 otherwise, is not), take the plain fixed-point step.
        usable = (status == 0) & (alpha.sum((1, 2)) * 0 == 0)
        x = torch.where(usable[:, None], (alpha.transpose(1, 2) @ gs[:, :k]).squeeze(1), gx)
    gx = y_active - g(x.view(-1, *y.shape[1:]), active).reshape(x.shape)
    x_out[active], residual[active] = x, (gx - x).abs().amax(1)  # the last step's point, checked
    return x_out.view_as(y), SolveInfo(max_iter, residual, bool((residual <= tol).all()))


def _report(info: SolveInfo, what: str, strict: bool, lipschitz: float | None) -> None:
    lip = "unknown" if lipschitz is None else f"{lipschitz:.4f}"
    n_diverged = int((~torch.isfinite(info.residual)).sum())
    if n_diverged:
        outcome = (f"diverged to NaN/Inf in {n_diverged} of {info.residual.numel()} samples after "
                   f"{info.iterations} iterations")
    else:
        outcome = f"did not converge in {info.iterations} iterations: worst residual {float(info.residual.max()):.3e}"
    message = (
        f"{what} {outcome} (Lipschitz bound of g: {lip}; a bound >= 1 means the block may not be "
        "invertible); raise max_iter, loosen atol/rtol or lower coeff"
    )
    if strict:
        error = ConvergenceError(message)
        error.info = info
        raise error
    warnings.warn(message, ConvergenceWarning, stacklevel=4)


@dataclass
class _Config:
    atol: float
    rtol: float
    max_iter: int
    method: str
    strict: bool
    lipschitz: Callable[[], float | None]
    info: SolveInfo


def _solve(config: _Config, g: Net, y: Tensor, context: Tensor | None) -> Tensor:
    """The forward solve (no graph); fills ``config.info`` and reports non-convergence."""
    tol = _residual_tolerance(y, config.atol, config.rtol)
    solver = _anderson if config.method == "anderson" else _plain_fixed_point

    def g_rows(x: Tensor, rows: Tensor) -> Tensor:
        return g(x) if context is None else g(x, context[rows])

    with torch.no_grad():
        x, info = solver(g_rows, y.detach(), tol, config.max_iter)
    config.info.__dict__.update(vars(info))
    if not info.converged:
        _report(info, "fixed-point inverse", config.strict, config.lipschitz())
    return x


_INVERSE_INSTEAD = (
    "Second derivatives through the inverse are not supported: put the explicit maps on the density "
    "direction (Pyro: ComposeTransform(blocks).inv; normflows: Residual(reverse=True)). "
    + USE_THE_GENERIC_PATH
)


class _ImplicitInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config: _Config, g: Net, y: Tensor, context: Tensor | None, *params: Tensor) -> Tensor:
        x = _solve(config, g, y, context)
        ctx.config, ctx.g, ctx.has_context = config, g, context is not None
        ctx.save_for_backward(x, *(() if context is None else (context,)), *params)
        return x

    @staticmethod
    @first_order_backward(
        "The fixed-point inverse's implicit gradient", _INVERSE_INSTEAD, lambda ctx: ctx.saved_tensors
    )
    def backward(ctx, grad_x: Tensor) -> tuple[Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        context = params.pop(0) if ctx.has_context else None
        config, g = ctx.config, ctx.g
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            gx = g(x_leaf) if context is None else g(x_leaf, context)
            n = grad_x.shape[0]

            def jtu_rows(u_rows: Tensor, rows: Tensor) -> Tensor:
                """$J_g^\\top u$ on the rows still iterating (one VJP through the whole batch)."""
                u_full = u_rows if rows.numel() == n else torch.zeros_like(grad_x).index_copy_(0, rows, u_rows)
                (jtu,) = torch.autograd.grad(gx, x_leaf, u_full, retain_graph=True)
                return jtu if rows.numel() == n else jtu[rows]

            # the plain fixed point (whatever the forward's method): u <- v - J^T u, per-sample exit,
            # Anderson if it stalls
            # (atol + rtol) |v_n| per sample: the adjoint is linear in v, so an absolute tolerance in the
            # units of y would stop it early (a wrong gradient, silently) whenever the upstream
            # gradient is small, and a batch-wide scale would tie each sample's accuracy to the others'
            tol = _residual_tolerance(grad_x, 0.0, config.atol + config.rtol)
            u, info = _plain_fixed_point(jtu_rows, grad_x, tol, config.max_iter)
            if not info.converged:
                _report(info, "adjoint of the inverse", config.strict, config.lipschitz())
            inputs = ([] if context is None else [context]) + params
            needs = [t for t in inputs if t.requires_grad]
            grads = torch.autograd.grad(gx, needs, -u, allow_unused=True) if needs else ()
        grads_iter = iter(grads)
        grad_inputs = [next(grads_iter) if t.requires_grad else None for t in inputs]
        grad_context = grad_inputs.pop(0) if ctx.has_context else None
        return (None, None, u, grad_context, *grad_inputs)


def fixed_point_inverse(
    g: Net,
    y: Tensor,
    params: Sequence[Tensor] = (),
    *,
    context: Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 1000,
    method: str = "fixed_point",
    strict: bool = False,
    lipschitz: Callable[[], float | None] = lambda: None,
) -> tuple[Tensor, SolveInfo]:
    r"""Solve $x + g(x) = y$ for $x$, differentiably in $y$ and ``params`` (implicit gradient; first
    derivatives only: differentiating them again raises, see :mod:`pyro_iresnet.first_order`).

    Args:
        g: Contraction, maps ``(N, *event)`` to ``(N, *event)`` sample-wise.
        y: Targets of shape ``(N, *event)``.
        params: The tensors $g$ depends on that should receive gradients.
        context: Optional per-sample context ``(N, c)``; then $g$ is called as ``g(x, context)``.
        atol: Absolute residual tolerance (default from :func:`default_tolerances`); the adjoint
            solve stops at $(\mathrm{atol} + \mathrm{rtol})\,\|v_n\|_\infty$, relative to each sample's
            upstream gradient $v_n$.
        rtol: Tolerance relative to $\|y\|_\infty$ per sample.
        max_iter: Iteration cap of the solve and of the adjoint solve.
        method: ``"fixed_point"`` (Banach iteration with per-sample early exit) or
            ``"anderson"`` (Anderson acceleration).
        strict: Raise :class:`ConvergenceError` instead of warning when not converged.
        lipschitz: Returns a Lipschitz bound of $g$ (or None) for the non-convergence message.

    Returns:
        $x$ of shape ``(N, *event)`` and a :class:`SolveInfo`.

    Raises:
        TypeError: If ``y`` is not a floating tensor.
        ValueError: If ``method`` is unknown, ``max_iter`` is below 1, ``atol``/``rtol`` is
            NaN or negative, ``y`` has fewer than 2 dimensions or ``context`` not one row per sample.
        ConvergenceError: Instead of the warning, with ``strict=True``.

    Warns:
        ConvergenceWarning: A sample's residual is above tolerance after ``max_iter`` iterations
            (in the solve or in the adjoint solve of the backward pass).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), Algorithm 1,
        https://arxiv.org/abs/1811.00995

    Examples:
        The gradient of the inverse of $y = x + \tfrac12\tanh(x)$ (elementwise) is
        $1 / (1 + \tfrac12\operatorname{sech}^2 x)$:

        >>> g = lambda x: 0.5 * torch.tanh(x)
        >>> y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        >>> x, info = fixed_point_inverse(g, y)
        >>> info.converged, torch.allclose(x + g(x), y)
        (True, True)
        >>> x.sum().backward()
        >>> torch.allclose(y.grad, 1 / (1 + 0.5 / torch.cosh(x.detach()) ** 2))
        True
    """
    check_choice("inverse_method", method, ("fixed_point", "anderson"))
    check_positive_int("max_iter", max_iter)
    _check_targets(y, context)
    info = SolveInfo()
    config = _Config(*_tolerances(y.dtype, atol, rtol), max_iter, method, strict, lipschitz, info)
    inputs = (y, *params) if context is None else (y, context, *params)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _ImplicitInverse.apply(config, g, y, context, *params), info
    return _solve(config, g, y, context), info  # nothing to differentiate: no autograd Function
