r"""Fused fast path of :class:`~pyro_iresnet.ResidualBlock` for the library's own
:class:`~pyro_iresnet.LipschitzMLP` (and, through the normflows adapter, normflows' own
``LipschitzMLP``, whose activation before the first linear layer is an identity first layer here).

For a chain $g = \tilde W_L \circ \phi_{L-1} \circ \dots \circ \phi_1 \circ \tilde W_1$ (biases
omitted) the Jacobian is explicit, $J = \tilde W_L D_{L-1} \tilde W_{L-1} \cdots D_1 \tilde W_1$ with
$D_l = \operatorname{diag}(\phi_l'(z_l))$, so vector-Jacobian products ($J^\top w$), Jacobian-vector
products ($J b$) and the gradient of any bilinear form $a^\top J(x)\, b$ with respect to $x$, the
weights, the biases and the LipSwish $\beta$ have closed forms. Every estimator's gradient is such
a form, with $a, b$ held constant:

* Neumann gradient: $a = \sum_k k\,c_k (J^\top)^{k-1} v$, $b = v$.
* Plain series gradient: one pair per term, $a = (J^\top)^{k-1} v$, $b = \lambda_k$ with the adjoint
  $\lambda_k = c_k v + J \lambda_{k+1}$.
* Exact log-det: $\nabla \log\det(I + J) = \operatorname{tr}(M^\top \nabla J)$,
  $M = (I + J)^{-\top}$, i.e. pairs $a = M e_j$, $b = e_j$.

One ``torch.autograd.Function`` per block evaluates $g(x)$ and the log-det estimate without
building an autograd graph, keeps only the pre-activations, and computes all gradients in its
backward for the given upstream gradient (per-sample weights are exact); the spectral normalisation
$\tilde W = W / \max(1, u^\top W v / c)$ is differentiated in closed form there too, so no autograd
node is recorded per layer. Under ``no_grad`` (evaluation, sampling) the values are computed without
the Function and nothing is kept for a backward. The values and gradients
equal those of the generic autograd path for the same probes and roulette draws (the tests check
this to 1e-12 in float64); only the cost differs. For $d \le 2$ the exact log-det is computed in
closed form ($\det(I+J) = (1+J_{11})(1+J_{22}) - J_{12}J_{21}$). Temporaries that live within one
forward or backward come from a small per-thread scratch store reused across calls, so a training
step allocates almost no fresh $(N, h)$ memory; the backward is not differentiable again.

The fast path covers ``LipschitzMLP`` with LipSwish or ELU activations (and normflows' in the
normflows adapter), also as the conditional net
:class:`~pyro_iresnet.context.ConcatContextNet` (the context $c$ enters the first pre-activation,
$\tilde W_1 x + \tilde W_c c + b_1$, like a per-sample bias: $J$ is unchanged and the gradients of $c$
and $\tilde W_c$ follow from the first pre-activation's), without ``exact_trace``;
:class:`~pyro_iresnet.ResidualBlock` uses the generic path otherwise (its ``fused`` option).

References:
    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = ["FusedMLP", "fused_logdet", "fused_mlp", "supports_fused"]

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .context import ConcatContextNet
from .first_order import USE_THE_GENERIC_PATH, first_order_backward
from .lipschitz import LipschitzMLP, LipSwish, SpectralNormLinear
from .logdet import _upcast_half

_LIPSWISH_SCALE = 1.1


@dataclass
class _Normalization:
    r"""How a normalised weight $\tilde W = W / s$, $s = \max(1, \tilde\sigma / c)$,
    $\tilde\sigma = u^\top W v$, depends on the raw weight $W$ (``u``, ``v`` are constants)."""

    weight: Tensor  # the raw W (a gradient target)
    normalized: Tensor  # W / s, computed once (no autograd history)
    u: Tensor  # copies: later power-iteration steps do not change this call's operator
    v: Tensor
    ratio: Tensor  # sigma / c (0-d, no autograd history)
    coeff: float

    def weight_grad(self, grad_normalized: Tensor) -> Tensor:
        r"""$\partial\ell/\partial W$ from $G = \partial\ell/\partial\tilde W$:
        $G / s - [\tilde\sigma \ge c]\, \frac{\langle G, \tilde W\rangle}{s\,c}\, u v^\top$
        (the clamp passes its gradient where $\tilde\sigma / c \ge 1$, as ``torch.clamp`` does)."""
        scale = self.ratio.clamp(min=1.0)
        inner = torch.sum(grad_normalized * self.normalized) / (scale * self.coeff)
        coef = torch.where(self.ratio >= 1.0, inner, torch.zeros_like(inner))
        return torch.addr(grad_normalized / scale, self.u * coef, self.v, alpha=-1)


@dataclass
class FusedMLP:
    r"""The normalised parameters of a ``LipschitzMLP``, taken once per call.

    They define $g(x) = \tilde W_L \phi_{L-1}(\cdots \phi_1(\tilde W_1 x + b_1) \cdots) + b_L$. The
    normalised weights are constants; gradients are taken with respect to the raw weights $W_l$ in
    closed form (:meth:`raw_weight_grads`), which spares the autograd graph of the normalisation.

    Attributes:
        weights: Normalised weights $\tilde W_l$, shapes ``(h_l, h_{l-1})`` (no autograd history).
        biases: Biases $b_l$ (``None`` where a layer has none).
        kinds: Activation per hidden layer: ``"lipswish"`` or ``"elu"``.
        betas: LipSwish $\beta$ per hidden layer (``None`` for ELU).
        alphas: ELU $\alpha$ per hidden layer (``None`` for LipSwish).
        norms: How each $\tilde W_l$ depends on its raw weight (``None`` for a fixed weight: the
            identity that puts an activation before the first linear layer, as normflows'
            ``LipschitzMLP`` has it, $g(x) = \tilde W_L \phi(\cdots \tilde W_1 \phi_0(x))$).
        context_weight: For a :class:`~pyro_iresnet.context.ConcatContextNet`, the context columns
            $\tilde W_c$ of the first normalised weight $[\tilde W_1, \tilde W_c]$ (normalised as a
            whole: ``norms[0]`` is that of the whole raw weight), so that the first pre-activation
            is $\tilde W_1 x + \tilde W_c c + b_1$; ``None`` without a context.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), https://arxiv.org/abs/1906.02735

    Examples:
        >>> mlp = fused_mlp(LipschitzMLP([2, 8, 2]))
        >>> [tuple(w.shape) for w in mlp.weights], mlp.kinds, len(mlp.tensors())
        ([(8, 2), (2, 8)], ['lipswish'], 5)
    """

    weights: list[Tensor]
    biases: list[Tensor | None]
    kinds: list[str]
    betas: list[Tensor | None]
    alphas: list[float | None]
    norms: list[_Normalization | None]
    context_weight: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        r"""Every tensor the call depends on (gradient targets: raw weights, biases, $\beta$s), in a
        fixed order."""
        out = [n.weight for n in self.norms if n is not None] + [b for b in self.biases if b is not None]
        return out + [b for b in self.betas if b is not None]

    def raw_weight_grads(self, grads: list[Tensor]) -> list[Tensor]:
        r"""Map gradients w.r.t. ``[*weights, *biases, *betas]`` (normalised weights first) to
        gradients w.r.t. :meth:`tensors` (raw weights first)."""
        n_layers = len(self.norms)
        weight_grads = [n.weight_grad(g) for n, g in zip(self.norms, grads[:n_layers]) if n is not None]
        return weight_grads + list(grads[n_layers:])

    def detached(self) -> FusedMLP:
        return FusedMLP(
            self.weights,
            [None if b is None else b.detach() for b in self.biases],
            self.kinds,
            [None if b is None else b.detach() for b in self.betas],
            self.alphas,
            self.norms,
            self.context_weight,
        )


def fused_mlp(net: nn.Module) -> FusedMLP | None:
    r"""The parameters of ``net`` for the fast path, or ``None`` if ``net`` is not a supported
    ``LipschitzMLP`` (alternating ``SpectralNormLinear`` and LipSwish/ELU layers).

    Reads $\tilde W_l = W_l / \max(1, \tilde\sigma_l / c)$ from the current power-iteration buffers
    and runs no power iteration itself (the block refreshes them before the call). Gradients with
    respect to $W_l$ flow through $\tilde\sigma_l$ as in autograd, in closed form
    (:meth:`FusedMLP.raw_weight_grads`).

    For a :class:`~pyro_iresnet.context.ConcatContextNet` over such a net, the first weight's
    context columns become ``context_weight``.

    Args:
        net: The residual function $g$.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), https://arxiv.org/abs/1906.02735

    Examples:
        >>> fused_mlp(LipschitzMLP([2, 8, 8, 2], activation="elu")).kinds
        ['elu', 'elu']
        >>> fused_mlp(nn.Linear(2, 2)) is None
        True
        >>> from pyro_iresnet.context import ConcatContextNet
        >>> mlp = fused_mlp(ConcatContextNet(LipschitzMLP([2 + 3, 8, 2]), context_dim=3))
        >>> tuple(mlp.weights[0].shape), tuple(mlp.context_weight.shape)
        ((8, 2), (8, 3))
    """
    if not supports_fused(net):
        return None
    context_dim = net.context_dim if type(net) is ConcatContextNet else 0
    layers = list(net.net.layers if context_dim else net.layers)
    with torch.no_grad():
        norms = [_normalization(layer.weight, layer.sigma_estimate(), layer.u, layer.v, layer.coeff)
                 for layer in layers[0::2]]
    weights = [n.normalized for n in norms]
    biases = [layer.bias for layer in layers[0::2]]
    kinds, betas, alphas = [], [], []
    for act in layers[1::2]:
        if isinstance(act, LipSwish):
            kinds.append("lipswish")
            betas.append(act.beta)
            alphas.append(None)
        else:
            kinds.append("elu")
            betas.append(None)
            alphas.append(float(act.alpha))
    if not context_dim:
        return FusedMLP(weights, biases, kinds, betas, alphas, norms)
    split = weights[0].shape[1] - context_dim
    context_weight = weights[0][:, split:].contiguous()
    weights[0] = weights[0][:, :split].contiguous()
    return FusedMLP(weights, biases, kinds, betas, alphas, norms, context_weight)


def _normalization(weight: Tensor, sigma: Tensor, u: Tensor, v: Tensor, coeff: float) -> _Normalization:
    r"""$\tilde W = W / \max(1, \tilde\sigma / c)$ for the estimate $\tilde\sigma = u^\top W v$
    (given: layers compute it their own way), and how $\tilde W$ depends on $W$, for
    :class:`FusedMLP` (call under ``no_grad``; ``u`` and ``v`` are copied).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995
    """
    ratio = sigma / coeff
    return _Normalization(weight, weight / ratio.clamp(min=1.0), u.clone(), v.clone(), ratio, coeff)


def supports_fused(net: nn.Module) -> bool:
    r"""Whether ``net`` is a ``LipschitzMLP`` the fast path implements exactly.

    That is: exactly the library's ``LipschitzMLP`` (not a subclass), whose layers alternate
    ``SpectralNormLinear`` and ``LipSwish`` / non-inplace ``nn.ELU``, or a
    :class:`~pyro_iresnet.context.ConcatContextNet` over one.

    Args:
        net: The residual function $g$.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), https://arxiv.org/abs/1906.02735

    Examples:
        >>> supports_fused(LipschitzMLP([2, 8, 2]))
        True
        >>> supports_fused(nn.Sequential(SpectralNormLinear(2, 2)))
        False
    """
    if type(net) is ConcatContextNet:
        return supports_fused(net.net)
    if type(net) is not LipschitzMLP or not isinstance(net.layers, nn.Sequential):
        return False
    layers = list(net.layers)
    if len(layers) % 2 != 1:
        return False
    linear_ok = all(type(m) is SpectralNormLinear for m in layers[0::2])
    acts_ok = all(type(m) is LipSwish or (type(m) is nn.ELU and not m.inplace) for m in layers[1::2])
    return linear_ok and acts_ok


# -- scratch tensors ----------------------------------------------------------------------------
# Fresh (N, h) temporaries are expensive on CPU: each one faults in new pages, which cost more
# than the elementwise product that fills it. Temporaries that live only within one forward or one
# backward therefore come from a small per-thread store, reused across calls and blocks (blocks
# run one after another on a thread). Nothing from it is saved for backward or returned.
_SCRATCH = threading.local()
_SCRATCH_MAX_NUMEL = 1 << 18  # larger temporaries are allocated per call, not kept


def _scratch(tag: object, shape: Sequence[int], like: Tensor) -> Tensor:
    r"""An uninitialised tensor of ``shape`` (dtype and device of ``like``) for the temporary
    ``tag``; ``tag=None`` gives a fresh tensor."""
    if tag is None:
        return like.new_empty(shape)
    store = _SCRATCH.__dict__
    buf = store.get(tag)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_empty(shape)
        # not kept if made under inference_mode: an inference tensor cannot be written outside it
        if buf.numel() <= _SCRATCH_MAX_NUMEL and not buf.is_inference():
            store[tag] = buf
    return buf


# -- activations ------------------------------------------------------------------------------
# LipSwish: phi(z) = z s / 1.1 with s = sigmoid(beta z), t = s (1 - s), k = 2 + beta z (1 - 2 s):
#   phi' = (s + beta z t) / 1.1, phi'' = beta t k / 1.1,
#   d phi / d beta = z^2 t / 1.1, d phi' / d beta = z t k / 1.1.
# ELU: phi = z (z > 0) else alpha (e^z - 1); phi' = 1 or alpha e^z; phi'' = 0 or alpha e^z.
# Each (N, h) pass costs about as much as the arithmetic in it, so the LipSwish formulas are
# arranged for few passes: six in the forward (s is kept divided by 1.1), nine in the backward.
def _act(
    kind: str, z: Tensor, beta: Tensor | None, alpha: float | None, tag: object = None
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    r"""$\phi(z)$, $\phi'(z)$ and, for LipSwish, $(\beta z, s / 1.1, t)$ (``None`` for ELU); LipSwish
    outputs are scratch tensors of ``tag`` (fresh if ``None``)."""
    if kind == "lipswish":
        shape = z.shape
        bz = torch.mul(z, beta, out=_scratch(tag and (tag, "bz"), shape, z))
        s = torch.sigmoid(bz, out=_scratch(tag and (tag, "s"), shape, z))
        t = torch.addcmul(s, s, s, value=-1.0, out=_scratch(tag and (tag, "t"), shape, z))
        s_scaled = s.mul_(1 / _LIPSWISH_SCALE)
        a = torch.mul(z, s_scaled, out=_scratch(tag and (tag, "a"), shape, z))
        d = torch.addcmul(s_scaled, bz, t, value=1 / _LIPSWISH_SCALE, out=_scratch(tag and (tag, "d"), shape, z))
        return a, d, (bz, s_scaled, t)
    pos = z > 0
    e = torch.exp(torch.clamp(z, max=0.0))
    return torch.where(pos, z, alpha * (e - 1)), torch.where(pos, torch.ones_like(z), alpha * e), None


def _act_backward(
    kind: str, z: Tensor, d: Tensor, aux: tuple[Tensor, Tensor, Tensor] | None, beta: Tensor | None,
    da: Tensor | None, dd: Tensor | None, tag: object,
) -> tuple[Tensor, Tensor | None]:
    r"""Gradient w.r.t. $z$ (a scratch tensor of ``tag``) and $\beta$ of
    $\langle \bar a, \phi(z)\rangle + \langle \bar d, \phi'(z)\rangle$ (``aux`` from :func:`_act`)."""
    if kind != "lipswish":
        gz = None if da is None else torch.mul(da, d, out=_scratch((tag, "gz"), d.shape, d))
        if dd is not None:
            second = torch.where(z > 0, torch.zeros_like(d), d)
            gz = second.mul_(dd) if gz is None else gz.addcmul_(second, dd)
        return gz, None
    bz, s_scaled, t = aux
    # gz = da phi' + dd phi'';  d beta = sum z t (z da + k dd) / 1.1
    gz = None if da is None else torch.mul(da, d, out=_scratch((tag, "gz"), d.shape, d))
    h = None
    if dd is not None:
        kdd = torch.addcmul(bz, bz, s_scaled, value=-2.0 * _LIPSWISH_SCALE, out=_scratch((tag, "k"), d.shape, d))
        kdd.add_(2.0).mul_(dd)
        e = torch.mul(t, kdd, out=_scratch((tag, "e"), d.shape, d))
        beta_scaled = beta / _LIPSWISH_SCALE
        gz = e.mul_(beta_scaled) if gz is None else gz.addcmul_(e, beta_scaled)
        h = kdd if da is None else kdd.addcmul_(z, da)
    elif da is not None:
        h = torch.mul(da, z, out=_scratch((tag, "h"), d.shape, d))
    if h is None:
        return gz, None
    dbeta = torch.dot(h.mul_(z).reshape(-1), t.reshape(-1)).div_(_LIPSWISH_SCALE)
    return gz, dbeta


@dataclass
class _Cache:
    x: Tensor
    zs: list[Tensor]  # pre-activations of the hidden layers
    acts: list[Tensor]  # activations (inputs of layers 2..L)
    ds: list[Tensor]  # phi'(z)
    aux: list[tuple[Tensor, Tensor, Tensor] | None]  # LipSwish (beta z, sigmoid, t)
    context: Tensor | None = None  # the context c of a ConcatContextNet (``mlp.context_weight``)


def _forward(
    mlp: FusedMLP, x: Tensor, scratch: bool = False, context: Tensor | None = None
) -> tuple[Tensor, _Cache]:
    r"""$g(x)$ (given ``context`` $c$ if ``mlp.context_weight`` is set) and the cache; with
    ``scratch`` the cached activations and slopes are scratch tensors (valid until the next scratch
    use; the pre-activations and $g(x)$ are fresh)."""
    cache = _Cache(x, [], [], [], [], context)
    h = x
    n_layers = len(mlp.weights)
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
        if i == 0 and mlp.context_weight is not None:
            z.addmm_(context, mlp.context_weight.t())
        if i == n_layers - 1:
            return z, cache
        a, d, aux = _act(mlp.kinds[i], z, mlp.betas[i], mlp.alphas[i], ("act", i) if scratch else None)
        cache.zs.append(z)
        cache.acts.append(a)
        cache.ds.append(d)
        cache.aux.append(aux)
        h = a
    raise AssertionError("unreachable")


def _recompute(mlp: FusedMLP, x: Tensor, zs: list[Tensor], context: Tensor | None) -> _Cache:
    """The cache of :func:`_forward` from its pre-activations (in scratch tensors)."""
    cache = _Cache(x, zs, [], [], [], context)
    for i, z in enumerate(zs):
        a, d, aux = _act(mlp.kinds[i], z, mlp.betas[i], mlp.alphas[i], ("act", i))
        cache.acts.append(a)
        cache.ds.append(d)
        cache.aux.append(aux)
    return cache


def _vjp(mlp: FusedMLP, cache: _Cache, w: Tensor) -> Tensor:
    r"""$J^\top w$ per sample (``w`` of shape ``(..., N, d)``; fresh result, scratch inside)."""
    n_layers = len(mlp.weights)
    t = _mm(w, mlp.weights[-1], ("vjp", n_layers - 1) if n_layers > 1 else None)
    for layer in range(n_layers - 2, -1, -1):
        w_layer = _colmajor(mlp.weights[layer]) if layer == 0 else mlp.weights[layer]
        t = _mm(t.mul_(cache.ds[layer]), w_layer, None if layer == 0 else ("vjp", layer))
    return t


def _jvp(mlp: FusedMLP, cache: _Cache, b: Tensor) -> Tensor:
    r"""$J b$ per sample (``b`` of shape ``(..., N, d)``; fresh result, scratch inside)."""
    n_layers = len(mlp.weights)
    p = _mm(b, mlp.weights[0].t(), ("jvp", 0) if n_layers > 1 else None)
    for layer in range(1, n_layers):
        p = _mm(p.mul_(cache.ds[layer - 1]), mlp.weights[layer].t(),
                None if layer == n_layers - 1 else ("jvp", layer))
    return p


def _mm(t: Tensor, w: Tensor, tag: object = None) -> Tensor:
    """``t @ w`` for ``t`` of shape ``(..., k)``, as one 2-D matmul (no batched copies of ``w``),
    into a scratch tensor of ``tag`` (fresh if ``None``)."""
    out = _scratch(tag, (*t.shape[:-1], w.shape[-1]), t)
    torch.mm(t.reshape(-1, t.shape[-1]), w, out=out.view(-1, w.shape[-1]))
    return out


def _colmajor(w: Tensor) -> Tensor:
    """``w`` stored column-major (same values): BLAS multiplies ``(N, k) @ (k, 2)`` much faster so."""
    return w.t().contiguous().t()


def _outer(r: Tensor, below: Tensor) -> Tensor:
    """$r^\\top b$ summed over rows, with the narrow side first (faster for ``(N, 2)`` factors)."""
    if below.shape[-1] < r.shape[-1]:
        return (below.t() @ r).t()
    return r.t() @ below


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _backward(
    mlp: FusedMLP, cache: _Cache, grad_gx: Tensor | None, a: Tensor | None, b: Tensor | None,
    p_hidden: dict[int, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    r"""Gradients of $\sum_n \langle \bar g_n, g(x_n)\rangle + \sum_{p,n} a_{pn}^\top J(x_n) b_{pn}$
    with respect to $x$, ``[*weights, *biases, *betas]`` of ``mlp`` (normalised weights; see
    :meth:`FusedMLP.raw_weight_grads`) and the context ``cache.context`` (``None`` without one); ``a``,
    ``b`` of shape ``(P, N, d)`` or ``None``. With a context the first weight's gradient is that of the
    whole $[\tilde W_1, \tilde W_c]$: $J$ does not involve $\tilde W_c$, which enters only through
    the first pre-activation, like the bias.
    ``p_hidden`` maps weight indices ``l`` (``0 < l < L - 1``) to the products of ``b`` through
    ``mlp.weights[l]``, $\tilde W_{l+1} D_l \cdots D_1 \tilde W_1 b$, already known (``(P, N, h)``,
    not modified; see :func:`_probe_products`); the others are computed.
    The returned gradients are fresh tensors; the temporaries are scratch."""
    n_layers = len(mlp.weights)
    grad_w: list[Tensor | None] = [None] * n_layers
    grad_d: list[Tensor | None] = [None] * (n_layers - 1)
    if a is not None:
        ps = [_mm(b, mlp.weights[0].t(), ("p", 0))]  # p_1 = W_1 b, then p_{l+1} = W_{l+1} D_l p_l
        qs = []
        for layer in range(1, n_layers):
            qs.append(torch.mul(ps[-1], cache.ds[layer - 1], out=_scratch(("q", layer), ps[-1].shape, b)))
            if p_hidden is not None and layer in p_hidden:
                ps.append(p_hidden[layer])
            elif layer < n_layers - 1:
                ps.append(_mm(qs[-1], mlp.weights[layer].t(), ("p", layer)))
        r = a
        for layer in range(n_layers - 1, -1, -1):
            below = b if layer == 0 else qs[layer - 1]
            grad_w[layer] = _outer(_flat(r), _flat(below))
            if layer == 0:
                break
            dq = _mm(r, mlp.weights[layer], ("dq", layer))
            prod = torch.mul(ps[layer - 1], dq, out=_scratch(("prod", layer), dq.shape, dq))
            grad_d[layer - 1] = prod[0] if prod.shape[0] == 1 else prod.sum(0)
            r = dq.mul_(cache.ds[layer - 1])
    grad_b: list[Tensor | None] = [None] * n_layers
    grad_beta: list[Tensor | None] = [None] * (n_layers - 1)
    gz = grad_gx
    for layer in range(n_layers - 1, -1, -1):
        below = cache.x if layer == 0 else cache.acts[layer - 1]
        if gz is not None:
            outer = _outer(gz, below)
            grad_w[layer] = outer if grad_w[layer] is None else grad_w[layer].add_(outer)
            grad_b[layer] = gz.sum(0)
        if layer == 0:
            grad_x = _mm(gz, _colmajor(mlp.weights[0])) if gz is not None else torch.zeros_like(cache.x)
            grad_context = None
            if mlp.context_weight is not None:
                context, weight_c = cache.context, mlp.context_weight
                grad_context = torch.mm(gz, weight_c) if gz is not None else torch.zeros_like(context)
                grad_c = _outer(gz, context) if gz is not None else torch.zeros_like(weight_c)
                grad_x_cols = torch.zeros_like(mlp.weights[0]) if grad_w[0] is None else grad_w[0]
                grad_w[0] = torch.cat([grad_x_cols, grad_c], 1)
            break
        i = layer - 1
        da = _mm(gz, mlp.weights[layer], ("da", layer)) if gz is not None else None
        gz, dbeta = _act_backward(mlp.kinds[i], cache.zs[i], cache.ds[i], cache.aux[i], mlp.betas[i],
                                  da, grad_d[i], ("act_backward", i))
        grad_beta[i] = dbeta
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grad_w, mlp.weights)]
    grads += [torch.zeros_like(bias) if g is None else g
              for g, bias in zip(grad_b, mlp.biases) if bias is not None]
    grads += [torch.zeros_like(beta) if g is None else g.reshape(beta.shape)
              for g, beta in zip(grad_beta, mlp.betas) if beta is not None]
    return grad_x, grads, grad_context


# -- estimators -------------------------------------------------------------------------------
@dataclass
class _Spec:
    mlp: FusedMLP
    method: str  # "exact" or "series"
    coeffs: list[float]
    probes: Sequence[Tensor]
    neumann_grad: bool


def _inverse(jac: Tensor) -> Tensor:
    r"""$(I + J)^{-1}$ per sample, shape ``(N, d, d)``; closed form for $d \le 2$."""
    d = jac.shape[-1]
    if d == 1:
        return 1 / (1 + jac)
    if d == 2:
        a, b, c, e = 1 + jac[:, 0, 0], jac[:, 0, 1], jac[:, 1, 0], 1 + jac[:, 1, 1]
        adj = torch.stack([torch.stack([e, -b], -1), torch.stack([-c, a], -1)], -2)
        return adj / (a * e - b * c)[:, None, None]
    mat = _upcast_half(torch.eye(d, dtype=jac.dtype, device=jac.device) + jac)
    # inv_ex: no host sync for its error check (a singular I + J, possible only with Lip(g) >= 1,
    # gives non-finite entries, hence a non-finite gradient or Newton step, not an exception)
    return torch.linalg.inv_ex(mat).inverse.to(jac.dtype)


def _logabsdet(jac: Tensor, for_backward: bool) -> tuple[Tensor, Tensor | None]:
    r"""$\log|\det(I + J)|$ per sample from ``jac`` ``(N, d, d)`` (closed form for $d \le 2$) and,
    ``for_backward``, $M = (I + J)^{-\top}$ (else ``None``)."""
    d = jac.shape[-1]
    if d == 1:
        logdet = torch.log((1 + jac[:, 0, 0]).abs())
    elif d == 2:
        logdet = torch.log(((1 + jac[:, 0, 0]) * (1 + jac[:, 1, 1]) - jac[:, 0, 1] * jac[:, 1, 0]).abs())
    else:
        mat = _upcast_half(torch.eye(d, dtype=jac.dtype, device=jac.device) + jac)
        logdet = torch.linalg.slogdet(mat).logabsdet.to(jac.dtype)
    return logdet, _inverse(jac).mT if for_backward else None


def _exact_value(mlp: FusedMLP, cache: _Cache) -> tuple[Tensor, tuple]:
    r"""Per-sample log-det and what the backward needs: $M = (I + J)^{-\top}$ and, for the first
    layer of :func:`_reused_layers`, the products of its pairs $b = e_j$ (see :func:`_jacobian`)."""
    jac, hidden = _jacobian(mlp, cache, scratch=True)
    logdet, inv_t = _logabsdet(jac, for_backward=True)
    # the pairs are d per sample: keeping every layer's (d, N, h) products would grow memory with
    # the depth, so only the first reused layer's are kept
    kept = _reused_layers(mlp)[:1]
    return logdet, (inv_t, {layer: hidden[layer - 1].clone() for layer in kept})


def _series_value(
    spec: _Spec, cache: _Cache, for_backward: bool = True
) -> tuple[Tensor, list[list[Tensor]], dict[int, Tensor] | None]:
    r"""Series estimate, and per probe what the gradient needs: the Neumann vector
    $\sum_k k\,c_k (J^\top)^{k-1} v / n_{\text{probes}}$ (``neumann_grad``: memory flat in the number
    of terms), else the powers $(J^\top)^k v$, $k = 0..n-1$.

    When the dimension $d$ is at most the number of products (terms times probes), the
    per-sample Jacobian is formed first ($d$ Jacobian-vector products through the net, as many
    matmul rows as the VJPs it replaces or fewer) and each product is a $d \times d$ one per sample;
    otherwise each product is a VJP through the net. With the Jacobian and ``for_backward`` and the
    Neumann gradient, the backward's hidden-layer products of the probes are formed here from the
    Jacobian's (see :func:`_probe_products`) and returned (else ``None``)."""
    x = cache.x
    total = x.new_zeros(x.shape[0])
    scale = 1.0 / len(spec.probes)
    saved = []
    jac = p_hidden = None
    if x.shape[1] <= len(spec.coeffs) * len(spec.probes):
        jac, hidden = _jacobian(spec.mlp, cache, scratch=True)
        if for_backward and spec.neumann_grad:
            p_hidden = _probe_products(spec.mlp, hidden, spec.probes)
    for v in spec.probes:
        w, powers, neumann = v, [], torch.zeros_like(v)
        series = torch.zeros_like(v)  # sum_k c_k (J^T)^k v, dotted with v once at the end
        for k, c in enumerate(spec.coeffs, start=1):
            if spec.neumann_grad:
                neumann.add_(w, alpha=k * c * scale)
            else:
                powers.append(w)
            w = _vjp(spec.mlp, cache, w) if jac is None else torch.bmm(w.unsqueeze(1), jac).squeeze(1)
            series.add_(w, alpha=c)
        total.add_(series.mul_(v).sum(1))
        saved.append([neumann] if spec.neumann_grad else powers)
    return total.mul_(scale), saved, p_hidden


def _reused_layers(mlp: FusedMLP) -> list[int]:
    r"""The weight indices ``l`` (``0 < l < L - 1``) whose products of ``b`` through
    ``mlp.weights[l]`` the backward takes from the Jacobian's instead of a matmul: those with more
    than $d$ inputs, where the $d$ elementwise passes of :func:`_probe_products` cost less than
    the matmul (the products of each probe, ``(P, N, h)``, stay in memory until the backward)."""
    d = mlp.weights[0].shape[1]
    return [layer for layer in range(1, len(mlp.weights) - 1) if mlp.weights[layer].shape[1] > d]


def _probe_products(mlp: FusedMLP, hidden: list[Tensor], probes: Sequence[Tensor]) -> dict[int, Tensor]:
    r"""The products of each probe $v$ through ``mlp.weights[l]`` for the ``l`` of
    :func:`_reused_layers` (``(P, N, h)`` each), as $\sum_j v_j\,(\tilde W_{l+1} D_l \cdots \tilde W_1 e_j)$
    from the Jacobian's products ``hidden`` (:func:`_jacobian`): $d$ elementwise passes per layer
    and probe instead of a matmul."""
    out = {}
    for layer in _reused_layers(mlp):
        products = hidden[layer - 1]  # (d, N, h_l)
        combined = products.new_empty(len(probes), *products.shape[1:])
        for row, v in zip(combined, probes):
            torch.mul(products[0], v[:, :1], out=row)
            for j in range(1, products.shape[0]):
                row.addcmul_(products[j], v[:, j:j + 1])
        out[layer] = combined
    return out


def _series_pairs(spec: _Spec, cache: _Cache, saved: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    r"""The bilinear pairs $(a, b)$ whose gradient is the estimator's gradient (unweighted)."""
    if spec.neumann_grad:
        return torch.stack([s[0] for s in saved]), torch.stack(list(spec.probes))
    scale = 1.0 / len(spec.probes)
    a_list, b_list = [], []
    for v, powers in zip(spec.probes, saved):  # lambda_k = c_k v + J lambda_{k+1}
        lam = None
        for k in range(len(spec.coeffs), 0, -1):
            lam = (spec.coeffs[k - 1] * scale) * v if lam is None else \
                (spec.coeffs[k - 1] * scale) * v + _jvp(spec.mlp, cache, lam)
            a_list.append(powers[k - 1])
            b_list.append(lam)
    return torch.stack(a_list), torch.stack(b_list)


class _FusedLogdet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, x: Tensor, context: Tensor | None, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an output the loss does not use costs its backward nothing
        spec = _Spec(spec.mlp.detached(), spec.method, spec.coeffs, spec.probes, spec.neumann_grad)
        gx, cache = _forward(spec.mlp, x.detach(), True, None if context is None else context.detach())
        if spec.method == "exact":
            logdet, (extra, p_hidden) = _exact_value(spec.mlp, cache)
        else:
            logdet, extra, p_hidden = _series_value(spec, cache)
        # keep the pre-activations (the backward recomputes the activations and slopes from them,
        # the same values) and, where the Jacobian gave them for free, hidden-layer products
        ctx.spec, ctx.x, ctx.context, ctx.zs = spec, cache.x, cache.context, cache.zs
        ctx.extra, ctx.p_hidden = extra, p_hidden
        ctx.save_for_backward(x, context, *tensors)  # only for the second-derivative error
        return gx, logdet

    @staticmethod
    @first_order_backward(
        "The fused log-det of a LipschitzMLP block",
        USE_THE_GENERIC_PATH,
        lambda ctx: ctx.saved_tensors,
    )
    def backward(ctx, grad_gx: Tensor | None, grad_logdet: Tensor | None) -> tuple[Tensor | None, ...]:
        spec = ctx.spec
        cache = _recompute(spec.mlp, ctx.x, ctx.zs, ctx.context)
        a = b = None
        if grad_logdet is not None:
            if spec.method == "exact":
                m = ctx.extra  # (N, d, d)
                d = m.shape[-1]
                a = m.permute(2, 0, 1) * grad_logdet[:, None]
                b = torch.eye(d, dtype=m.dtype, device=m.device).unsqueeze(1).expand(d, m.shape[0], d)
            else:
                a, b = _series_pairs(spec, cache, ctx.extra)
                a = a * grad_logdet[:, None]
        grad_x, grads, grad_context = _backward(spec.mlp, cache, grad_gx, a, b, None if a is None else ctx.p_hidden)
        return (None, grad_x, grad_context, *spec.mlp.raw_weight_grads(grads))


def fused_logdet(
    mlp: FusedMLP,
    x: Tensor,
    method: str,
    weights: Sequence[float] = (),
    probes: Sequence[Tensor] = (),
    neumann_grad: bool = True,
    context: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""$g(x)$ and the per-sample log-det estimate, differentiable in ``x``, ``context`` and ``mlp.tensors()``
    (first derivatives only: differentiating them again raises, see :mod:`pyro_iresnet.first_order`).

    The estimate is $\log\det(I + J_g(x_n))$ (``"exact"``) or, with probes $v_1..v_P$,

    $$ \frac1P \sum_{p=1}^{P} \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}\, w_k\, v_p^\top J_g(x_n)^k v_p
       \quad (\texttt{"series"}). $$

    Args:
        mlp: From :func:`fused_mlp`.
        x: Inputs ``(N, d)``.
        method: ``"exact"`` or ``"series"`` (the latter with roulette or truncation ``weights``).
        weights: Term weights $w_1..w_n$ (``"series"``).
        probes: Hutchinson probes ``(N, d)`` (``"series"``).
        neumann_grad: Gradient through the Neumann series (else through the $n$ products).
        context: The context ``(N, context_dim)`` of a ``mlp`` with ``context_weight`` (else ``None``);
            the log-det is that of $x \mapsto x + g(x, c)$.

    Returns:
        ``g(x)`` of shape ``(N, d)`` and the log-dets of shape ``(N,)``.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> from pyro_iresnet.logdet import exact_logdet
        >>> net = LipschitzMLP([3, 8, 3], coeff=0.9).eval()
        >>> x = torch.randn(4, 3)
        >>> gx, logdet = fused_logdet(fused_mlp(net), x, "exact")
        >>> gx_ref, logdet_ref = exact_logdet(net, x)
        >>> torch.allclose(gx, gx_ref, atol=1e-6), torch.allclose(logdet, logdet_ref, atol=1e-6)
        (True, True)
    """
    coeffs = [(-1) ** (k + 1) * w / k for k, w in enumerate(weights, start=1)]
    spec = _Spec(mlp, method, coeffs, list(probes), bool(neumann_grad))
    if (mlp.context_weight is None) != (context is None):
        raise ValueError("fused_logdet: pass a context exactly when the net is conditional (mlp.context_weight)")
    tensors = mlp.tensors()
    inputs = (x, *tensors) if context is None else (x, context, *tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedLogdet.apply(spec, x, context, *tensors)
    # value only (evaluation, sampling): no autograd Function, nothing kept for a backward
    gx, cache = _forward(mlp, x, True, context)
    if method == "exact":
        return gx, _logabsdet(_jacobian(mlp, cache, scratch=True)[0], for_backward=False)[0]
    return gx, _series_value(spec, cache, for_backward=False)[0]


# -- Jacobian -----------------------------------------------------------------------------------
def _jacobian(mlp: FusedMLP, cache: _Cache, scratch: bool = False) -> tuple[Tensor, list[Tensor]]:
    r"""Per-sample Jacobian ``(N, d, d)``, by :func:`_jacobian_product` with $D_l$ from ``cache``.

    Also returns the products of $e_j$ through ``mlp.weights[l]`` for ``0 < l < L - 1``,
    $\tilde W_{l+1} D_l \cdots D_1 \tilde W_1 e_j$, shapes ``(d, N, h)`` (scratch tensors with
    ``scratch``), from which the backward's products of any $b$ follow without a matmul."""
    return _jacobian_product([w.t() for w in mlp.weights], cache.ds, cache.x.shape[0], scratch)


def _jacobian_product(
    weights_t: Sequence[Tensor], slopes: Sequence[Tensor], n: int, scratch: bool
) -> tuple[Tensor, list[Tensor]]:
    r"""$J = W_L D_{L-1} W_{L-1} \cdots D_1 W_1$ per sample, shape ``(n, d, d)``, from the transposed
    weights $W_l^\top$ and the slopes ``(n, h_l)`` on the diagonals of $D_l$: column $j$ is
    $J e_j$, whose first product $W_1 e_j$ is a column of $W_1$ (no matmul). With ``scratch`` the
    hidden-layer temporaries are scratch tensors (the result is fresh, or a view of $W_1^\top$ for a
    single linear layer; do not modify it). Also returns the products of $e_j$ through the hidden
    layers' weights, $W_{l+1} D_l \cdots D_1 W_1 e_j$ for $0 < l < L - 1$, shapes ``(d, n, h)``."""
    p = weights_t[0].unsqueeze(1)  # (d, 1, h_1)
    n_layers = len(weights_t)
    hidden = []
    for layer in range(1, n_layers):
        d = slopes[layer - 1]
        q = torch.mul(p, d, out=_scratch(("jac_q", layer) if scratch else None, (p.shape[0], *d.shape), d))
        p = _mm(q, weights_t[layer], ("jac_p", layer) if scratch and layer < n_layers - 1 else None)
        if layer < n_layers - 1:
            hidden.append(p)
    if p.shape[1] == 1:  # a single linear layer: the same J for every sample
        p = p.expand(-1, n, -1)
    return p.permute(1, 2, 0), hidden
