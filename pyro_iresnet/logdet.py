r"""Estimators of $\log|\det(I + J_g(x))|$, per sample.

For $\mathrm{Lip}(g) < 1$ the log-det has the convergent power series

$$ \log\det(I + J_g) = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \operatorname{tr}(J_g^k), \qquad
   \operatorname{tr}(A) = \mathbb{E}_v[v^\top A v]\ (\text{Hutchinson}). $$

* ``exact_logdet``: the full Jacobian (``torch.func``) and ``slogdet``.
* ``series_weights``: the first ``n`` terms (biased; see :func:`logdet_error_bound`).
* ``roulette_weights``: Russian roulette, term $k$ reweighted by $1/P(N \ge k - n_0)$, whose
  expectation is the exact log-det.
* ``hutchinson_logdet``: evaluates a weighted series with vector-Jacobian products; with
  ``neumann_grad`` its gradient comes from one differentiable VJP of the Neumann series
  $\sum_m (-1)^m w_{m+1} v^\top J^m$ (memory flat in the number of terms) while the value stays the
  series estimate.
* ``backward_in_forward``: computes the log-det's gradients during the forward pass and frees its
  graph; the backward is exact for any upstream gradient.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = [
    "backward_in_forward",
    "draw_probes",
    "exact_logdet",
    "hutchinson_logdet",
    "jacobian_series_logdet",
    "logdet_error_bound",
    "roulette_weights",
    "series_weights",
]

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import _check_real, check_choice, check_positive_finite, check_positive_int, check_roulette_p
from .first_order import USE_THE_GENERIC_PATH, first_order_backward

Net = Callable[[Tensor], Tensor]
Estimator = Callable[[Tensor], tuple[Tensor, Tensor]]


def logdet_error_bound(lip: float, n_terms: int, dim: int) -> float:
    r"""i-ResNet bound on the truncation error of the first ``n_terms`` terms of the series.

    $$ \Big|\log\det(I+J_g) - \sum_{k=1}^{n} \tfrac{(-1)^{k+1}}{k}\operatorname{tr}(J_g^k)\Big|
       \le -d\Big(\ln(1-L) + \sum_{k=1}^{n} \tfrac{L^k}{k}\Big) $$

    The right-hand side equals $d \sum_{k > n} L^k / k$, which is how it is evaluated (no
    cancellation when the tail is small).

    Args:
        lip: A bound $L \in [0, 1)$ on $\mathrm{Lip}(g)$, e.g. from :func:`~pyro_iresnet.lipschitz_bound`.
        n_terms: Number of terms $n \ge 1$ kept.
        dim: Dimension $d$ of the input.

    Returns:
        The bound (a float, per sample).

    Raises:
        TypeError: If ``lip`` is not a real number (a ``bool`` or a tensor: pass ``float(lip)``).
        ValueError: If ``lip`` is outside $[0, 1)$ or ``n_terms``/``dim`` is below 1.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), Theorem 3,
        https://arxiv.org/abs/1811.00995

    Examples:
        >>> f"{logdet_error_bound(0.5, n_terms=10, dim=2):.3e}"
        '1.646e-04'
        >>> logdet_error_bound(0.9, n_terms=10, dim=2) > logdet_error_bound(0.9, n_terms=20, dim=2)
        True
    """
    lip = _check_real("lip", lip, lambda v: 0.0 <= v < 1.0, "a float in [0, 1)", "in [0, 1)")  # not a tensor
    check_positive_int("n_terms", n_terms)
    check_positive_int("dim", dim)
    # The tail sum_{k>n} L^k/k, summed directly (-ln(1-L) minus the partial sum cancels
    # catastrophically when the tail is small); the closed form is used if the sum is slow.
    tail, power = 0.0, lip ** (n_terms + 1)
    for k in range(n_terms + 1, n_terms + 100_001):
        term = power / k
        if term <= 1e-17 * tail:
            return dim * tail
        tail += term
        power *= lip
    tail = -math.log1p(-lip) - sum(lip**k / k for k in range(1, n_terms + 1))
    return dim * tail


def exact_logdet(g: Callable[..., Tensor], x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""$g(x)$ and the exact $\log|\det(I + J_g(x))|$ from the per-sample Jacobian.

    $$ \log|\det(I + J_g(x_n))| = \texttt{slogdet}\big(I_D + J_g(x_n)\big), \qquad
       J_g(x_n) \in \mathbb{R}^{D \times D}, \ D = \textstyle\prod \text{event}, $$

    with the Jacobians from ``torch.func.vmap(torch.func.jacrev(g))``: $O(N D^2)$ memory, meant
    for $D$ up to a few dozen.

    Args:
        g: Maps ``(N, *event)`` to ``(N, *event)``, sample-wise.
        x: Inputs of shape ``(N, *event)``.
        context: Optional per-sample context ``(N, c)``; then $g$ is called as ``g(x, context)``.

    Returns:
        ``g(x)`` of shape ``(N, *event)`` and the log-dets of shape ``(N,)``; both differentiable.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> a = torch.tensor([[0.5, 0.0], [0.0, -0.25]])
        >>> gx, logdet = exact_logdet(lambda x: x @ a.T, torch.randn(3, 2))
        >>> logdet.shape, torch.allclose(logdet, torch.full((3,), math.log(1.5 * 0.75)))
        (torch.Size([3]), True)
    """

    gx, jac = _batch_jacobian(g, x, context)
    eye = torch.eye(jac.shape[-1], dtype=x.dtype, device=x.device)
    return gx, torch.linalg.slogdet(_upcast_half(eye + jac)).logabsdet.to(x.dtype)


def _upcast_half(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16 or bfloat16, which ``torch.linalg``'s factorisations and
    norms do not take; otherwise ``t`` itself (cast results back with ``.to(dtype)``)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _batch_jacobian(
    g: Callable[..., Tensor], x: Tensor, context: Tensor | None
) -> tuple[Tensor, Tensor]:
    """$g(x)$ ``(N, *event)`` and the per-sample Jacobian flattened to ``(N, D, D)``."""

    def single(xi: Tensor, ci: Tensor | None) -> tuple[Tensor, Tensor]:
        out = (g(xi.unsqueeze(0)) if ci is None else g(xi.unsqueeze(0), ci.unsqueeze(0))).squeeze(0)
        return out, out

    dim = math.prod(x.shape[1:])
    if x.shape[0] == 0:  # vmap cannot batch some ops (convolutions) over an empty batch
        gx = g(x) if context is None else g(x, context)
        return gx, x.new_zeros(0, dim, dim)
    in_dims = (0, None if context is None else 0)
    jac, gx = torch.func.vmap(torch.func.jacrev(single, has_aux=True), in_dims=in_dims)(x, context)
    return gx, jac.reshape(x.shape[0], dim, dim)


def jacobian_series_logdet(
    g: Callable[..., Tensor], x: Tensor, weights: Sequence[float], context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""$g(x)$ and $\sum_k \frac{(-1)^{k+1}}{k} w_k \operatorname{tr}(J^k)$ with exact traces
    (the full Jacobian; normflows' ``exact_trace``). Differentiable.

    $$ \widehat{\log\det}(I + J_g(x_n)) = \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}\, w_k\,
       \operatorname{tr}\big(J_g(x_n)^k\big). $$

    Args:
        g: Maps ``(N, *event)`` to ``(N, *event)``, sample-wise.
        x: Inputs of shape ``(N, *event)``.
        weights: $w_1..w_n$ from :func:`series_weights` or :func:`roulette_weights`.
        context: Optional per-sample context ``(N, c)``; then $g$ is called as ``g(x, context)``.

    Returns:
        ``g(x)`` of shape ``(N, *event)`` and the estimates of shape ``(N,)``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> a = torch.tensor([[0.2, 0.3], [-0.1, 0.4]])
        >>> gx, logdet = jacobian_series_logdet(lambda x: x @ a.T, torch.randn(3, 2), series_weights(40))
        >>> torch.allclose(logdet, torch.linalg.slogdet(torch.eye(2) + a).logabsdet.expand(3))
        True
    """
    gx, jac = _batch_jacobian(g, x, context)
    total, power = x.new_zeros(x.shape[0]), jac
    for k, w in enumerate(weights, start=1):
        if k > 1:
            power = power @ jac
        total = total + ((-1) ** (k + 1) * w / k) * power.diagonal(dim1=1, dim2=2).sum(1)
    return gx, total


def series_weights(n_terms: int) -> list[float]:
    r"""Term weights $w_k = 1$, $k = 1..n$ (the truncated series).

    With them the estimators compute $\sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}\operatorname{tr}(J^k)$,
    biased by at most :func:`logdet_error_bound`.

    Args:
        n_terms: Number of terms $n \ge 1$.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> series_weights(3)
        [1.0, 1.0, 1.0]
    """
    return [1.0] * check_positive_int("n_terms", n_terms)


def _survival(roulette: str, param: float, m: int) -> float:
    """$P(N \\ge m)$ for the roulette distribution."""
    if roulette == "geometric":  # N >= 1 trials until first success
        return (1.0 - param) ** max(m - 1, 0)
    # Poisson: P(N >= m) = regularised lower incomplete gamma P(m, lam)
    return float(torch.special.gammainc(torch.tensor(float(m), dtype=torch.float64, device="cpu"),
                                        torch.tensor(param, dtype=torch.float64, device="cpu")))


def roulette_weights(
    n_exact_terms: int, roulette: str, param: float, n_draws: int = 1
) -> list[float]:
    r"""Russian-roulette weights $w_1, \dots, w_n$ of an unbiased series estimate.

    Draws $N_1, \dots, N_s$ (``n_draws``) from torch's CPU generator (seeded by
    ``torch.manual_seed``; no device sync), sets $n = n_0 + \max_i N_i$ and

    $$ w_k = 1 \ (k \le n_0), \qquad
       w_k = \frac{\tfrac1s \#\{i : N_i \ge k - n_0\}}{P(N \ge k - n_0)} \ (k > n_0), $$

    so that $\mathbb{E}[w_k] = 1$ for every $k$.

    Args:
        n_exact_terms: $n_0 \ge 0$ terms always kept.
        roulette: ``"geometric"`` ($N \ge 1$, success probability ``param``) or ``"poisson"``
            ($N \ge 0$, rate ``param``).
        param: ``p`` in ``(0, 1)`` or ``lam > 0``.
        n_draws: Number of draws averaged in the weights.

    Returns:
        The weights $[w_1, \dots, w_n]$ (at least one), as floats.

    Raises:
        ValueError: If ``n_exact_terms`` is negative, ``n_draws`` below 1, ``roulette`` unknown, or
            ``param`` out of its range.
        TypeError: If an argument has the wrong type.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), Eq. (6),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> w = roulette_weights(2, "geometric", 0.5)
        >>> w[:2], len(w) >= 3  # n_0 = 2 exact terms, then N >= 1 more
        ([1.0, 1.0], True)
        >>> w = roulette_weights(0, "geometric", 0.5, n_draws=10_000)
        >>> [round(wk, 1) for wk in w[:3]]  # E[w_k] = 1
        [1.0, 1.0, 1.0]
    """
    check_positive_int("n_exact_terms", n_exact_terms, minimum=0)
    check_positive_int("n_draws", n_draws)
    check_choice("roulette", roulette, ("geometric", "poisson"))
    if roulette == "geometric":
        check_roulette_p("p", param)
    else:
        check_positive_finite("lam", param)
    return _roulette_weights(n_exact_terms, roulette, param, n_draws)


def _roulette_weights(n_exact_terms: int, roulette: str, param: float, n_draws: int) -> list[float]:
    """:func:`roulette_weights` for arguments already checked (a block checks its own once, at
    construction, not at every training step)."""
    if roulette == "geometric":
        draws = torch.empty(n_draws, dtype=torch.float64, device="cpu").geometric_(param)
    else:
        draws = torch.poisson(torch.full((n_draws,), float(param), dtype=torch.float64, device="cpu"))
    counts = [int(d) for d in draws.tolist()]  # CPU tensor: no device sync
    n_terms = max(n_exact_terms + max(counts), 1)
    weights = []
    for k in range(1, n_terms + 1):
        m = k - n_exact_terms
        if m <= 0:
            weights.append(1.0)
        else:
            weights.append(sum(c >= m for c in counts) / n_draws / _survival(roulette, param, m))
    return weights


def draw_probes(x: Tensor, n_probes: int, probe: str) -> list[Tensor]:
    r"""Hutchinson probes like ``x``: standard normal or Rademacher (from torch's RNG).

    Both have $\mathbb{E}[v v^\top] = I$, hence $\mathbb{E}[v^\top A v] = \operatorname{tr}(A)$.

    Args:
        x: Tensor whose shape, dtype and device the probes take, ``(N, *event)``.
        n_probes: Number of probes.
        probe: ``"gaussian"`` or ``"rademacher"`` (entries $\pm 1$).

    Returns:
        A list of ``n_probes`` tensors shaped like ``x``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> probes = draw_probes(torch.zeros(4, 3), n_probes=2, probe="rademacher")
        >>> len(probes), probes[0].shape, bool((probes[0].abs() == 1).all())
        (2, torch.Size([4, 3]), True)
    """
    check_positive_int("n_probes", n_probes)
    check_choice("probe", probe, ("gaussian", "rademacher"))
    if probe == "gaussian":
        return [torch.randn_like(x) for _ in range(n_probes)]
    return [torch.empty_like(x).bernoulli_(0.5).mul_(2).sub_(1) for _ in range(n_probes)]


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


def hutchinson_logdet(
    g: Net,
    x: Tensor,
    weights: Sequence[float],
    probes: Sequence[Tensor],
    neumann_grad: bool,
    create_graph: bool,
    params: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""$g(x)$ and $\sum_k \frac{(-1)^{k+1}}{k} w_k\, v^\top J^k v$ averaged over the probes $v$.

    Args:
        g: Maps ``(N, *event)`` to ``(N, *event)``, sample-wise.
        x: Inputs ``(N, *event)``; a detached leaf is used unless it requires grad with gradients enabled.
        weights: $w_1..w_n$ from :func:`series_weights` or :func:`roulette_weights`.
        probes: Probe tensors shaped like ``x``.
        neumann_grad: Differentiate through the Neumann series with one VJP (memory flat in $n$)
            instead of through the $n$ VJPs. The value is the same series estimate either way.
        create_graph: Whether the returned log-det must be differentiable.
        params: With ``neumann_grad`` and ``create_graph``: the tensors other than ``x`` that $g$
            depends on and that need gradients (its parameters, a context; possibly none). The
            Neumann gradient is exact only to first order: given a sequence, a second derivative
            with respect to ``x`` or these tensors raises. ``None`` (default) leaves the plain
            surrogate, whose second derivatives are not the estimator's.

    Returns:
        ``g(x)`` and the log-det estimates of shape ``(N,)``.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        For a diagonal $J$ a Rademacher probe gives the traces exactly:

        >>> a = torch.diag(torch.tensor([0.5, -0.25]))
        >>> x = torch.randn(3, 2)
        >>> probes = draw_probes(x, 1, "rademacher")
        >>> gx, logdet = hutchinson_logdet(lambda z: z @ a.T, x, series_weights(40), probes,
        ...                                neumann_grad=False, create_graph=False)
        >>> torch.allclose(logdet, torch.full((3,), math.log(1.5 * 0.75)))
        True
    """
    if not probes:
        raise ValueError("probes must hold at least one probe tensor (draw_probes(x, n_probes >= 1, ...))")
    if torch.is_inference_mode_enabled():  # autograd's VJPs refuse inference tensors: copies outside that mode
        with torch.inference_mode(False):
            return hutchinson_logdet(g, x.clone(), weights, [v.clone() for v in probes], neumann_grad, False)
    if not (x.requires_grad and torch.is_grad_enabled()):  # e.g. an input that requires grad, under no_grad
        x = x.detach().requires_grad_()
    with torch.enable_grad():
        gx = g(x)
        coeffs = [(-1) ** (k + 1) * w / k for k, w in enumerate(weights, start=1)]
        total = x.new_zeros(x.shape[0])
        for v in probes:
            if neumann_grad:
                total = total + _neumann_term(gx, x, v, coeffs, create_graph, params)
            else:
                vk = v
                for c in coeffs:
                    (vk,) = torch.autograd.grad(gx, x, vk, create_graph=create_graph, retain_graph=True)
                    total = total + c * _per_sample_dot(vk, v)
        logdet = total / len(probes)
    if not create_graph:
        gx, logdet = gx.detach(), logdet.detach()
    return gx, logdet


def _neumann_term(
    gx: Tensor, x: Tensor, v: Tensor, coeffs: list[float], create_graph: bool, params: Sequence[Tensor] | None = None
) -> Tensor:
    r"""Series value for one probe, with gradient $\nabla (u^\top J v)$, $u = \sum_k k c_k (J^\top)^{k-1} v$
    (second derivatives raise when ``params`` is a sequence, see :func:`hutchinson_logdet`)."""
    with torch.no_grad():
        vk, value, neumann = v, 0.0, torch.zeros_like(v)
        for k, c in enumerate(coeffs, start=1):
            neumann.add_(vk, alpha=k * c)
            (vk,) = torch.autograd.grad(gx, x, vk, retain_graph=True)
            value = value + c * _per_sample_dot(vk, v)
    if not create_graph:
        return value
    (jtu,) = torch.autograd.grad(gx, x, neumann, create_graph=True, retain_graph=True)
    surrogate = _per_sample_dot(jtu, v)
    estimate = value + (surrogate - surrogate.detach())
    if params is not None:
        return _NeumannGradient.apply(estimate, x, *params)
    return estimate


class _NeumannGradient(torch.autograd.Function):
    """Identity on the series estimate (its value plus the zero-valued surrogate term whose gradient is
    the Neumann gradient); it only makes a second derivative through the surrogate raise."""

    generate_vmap_rule = True  # a clone: torch.func's transforms (jacrev) batch it themselves

    @staticmethod
    def forward(estimate: Tensor, *inputs: Tensor) -> Tensor:
        return estimate.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    @first_order_backward(
        "The Neumann-series gradient (neumann_grad=True)",
        USE_THE_GENERIC_PATH,
        lambda ctx: ctx.saved_tensors,
    )
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (grad, *(None for _ in ctx.saved_tensors))


class _BackwardInForward(torch.autograd.Function):
    """Log-det gradients computed in the forward pass; exact for any upstream gradient."""

    @staticmethod
    def forward(ctx, estimator: Estimator, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            gx, logdet = estimator(x_leaf)
            grads = torch.autograd.grad(logdet.sum(), (x_leaf, *params), retain_graph=True, allow_unused=True)
        ctx.estimator, ctx.x_leaf, ctx.gx = estimator, x_leaf, gx
        ctx.logdet_grads = grads
        # the parameters are saved so that autograd refuses a backward after an in-place change of
        # them (an optimiser step in between): the backward evaluates g with them again
        ctx.save_for_backward(x, *params)
        return gx.detach(), logdet.detach()

    @staticmethod
    @first_order_backward(
        "The memory-saving backward (memory_efficient=True; normflows: reduce_memory=True)",
        USE_THE_GENERIC_PATH,
        lambda ctx: ctx.saved_tensors,
    )
    def backward(ctx, grad_gx: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.gx is None:  # freed by the first backward, to keep the memory saving
            raise RuntimeError(
                "Trying to backward through the memory-saving log-det (memory_efficient=True; normflows: "
                "reduce_memory=True) a second time: its first backward frees what it kept, whatever "
                "retain_graph says. To differentiate twice, use memory_efficient=False (normflows: "
                "reduce_memory=False)."
            )
        x_leaf, params = ctx.x_leaf, ctx.saved_tensors[1:]
        grad_x_logdet, *grad_params_logdet = ctx.logdet_grads
        with torch.enable_grad():
            grad_x, *grad_params = torch.autograd.grad(ctx.gx, (x_leaf, *params), grad_gx, allow_unused=True)
        weights = grad_logdet.reshape((-1,) + (1,) * (x_leaf.dim() - 1))
        if grad_x_logdet is not None:  # samples are independent: per-sample scaling is exact
            grad_x = _add(grad_x, grad_x_logdet * weights)
        if params and grad_logdet.numel():
            if bool((grad_logdet == grad_logdet[0]).all()):  # the usual batch mean: reuse
                extra = [None if g is None else g * grad_logdet[0] for g in grad_params_logdet]
            else:  # unequal weights: recompute this block's estimator with the same draws
                with torch.enable_grad():
                    _, logdet = ctx.estimator(x_leaf.detach().requires_grad_())
                    # detached: under create_graph its graph leads back into this node (freed above)
                    extra = torch.autograd.grad((logdet * grad_logdet.detach()).sum(), params, allow_unused=True)
            grad_params = [_add(a, b) for a, b in zip(grad_params, extra)]
        ctx.gx = ctx.x_leaf = ctx.logdet_grads = ctx.estimator = None
        return (None, grad_x, *grad_params)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def backward_in_forward(estimator: Estimator, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    r"""Run ``estimator`` (deterministic: its probes and weights fixed) and compute its gradients
    with respect to ``x`` and ``params`` now, freeing the log-det's graph. First derivatives only:
    differentiating them again raises (:mod:`pyro_iresnet.first_order`).

    The backward combines the stored gradients with the upstream gradient: per sample for ``x``;
    for parameters directly when all samples carry the same upstream weight (a batch mean), else
    by re-running the estimator with the same draws. Residual Flows' version scales every sample
    by the first sample's weight; this one does not.

    With $\bar\ell_n$ the upstream gradient of sample $n$'s log-det,

    $$ \frac{\partial}{\partial \theta} \sum_n \bar\ell_n \widehat{\log\det}_n
       = \bar\ell_1 \frac{\partial}{\partial\theta} \sum_n \widehat{\log\det}_n
       \quad\text{if all } \bar\ell_n \text{ are equal.} $$

    Args:
        estimator: Maps a leaf ``x`` ``(N, *event)`` to ``(g(x), logdet)`` with a differentiable
            log-det of shape ``(N,)``; must be deterministic (fixed probes and weights).
        x: Inputs ``(N, *event)``.
        params: The parameters of $g$ that receive gradients.

    Returns:
        ``g(x)`` and the log-dets ``(N,)``, whose values are the estimator's values.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> net = torch.nn.Linear(2, 2)
        >>> x = torch.randn(4, 2)
        >>> weights, probes = series_weights(3), draw_probes(x, 1, "gaussian")
        >>> def estimator(x_leaf):
        ...     return hutchinson_logdet(net, x_leaf, weights, probes, False, True)
        >>> gx, logdet = backward_in_forward(estimator, x, list(net.parameters()))
        >>> torch.allclose(logdet, estimator(x)[1])
        True
        >>> logdet.mean().backward()
        >>> net.weight.grad.shape
        torch.Size([2, 2])
    """
    return _BackwardInForward.apply(estimator, x, *params)
