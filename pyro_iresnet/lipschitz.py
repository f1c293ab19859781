r"""Lipschitz-constrained networks: spectral normalisation, LipSwish and certificates.

A residual block $y = x + g(x)$ is invertible when $\mathrm{Lip}(g) < 1$. For a chain
$g = W_L \circ \phi \circ \dots \circ \phi \circ W_1$ with 1-Lipschitz activations $\phi$,
$\mathrm{Lip}(g) \le \prod_i \|W_i\|_2$, so each weight is rescaled as in i-ResNet:

$$ \tilde W = \begin{cases} c\, W / \tilde\sigma & \text{if } \tilde\sigma > c \\ W & \text{otherwise}\end{cases} $$

where $\tilde\sigma = u^\top W v \le \|W\|_2$ comes from power iteration on buffers $u, v$.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = [
    "LipSwish",
    "LipschitzMLP",
    "SpectralNormLinear",
    "frozen_spectral_norm",
    "lipschitz_bound",
    "refresh_spectral_norm",
    "register_lipschitz_rule",
]

import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import TransformedDistribution
from torch.distributions.transforms import ComposeTransform, _InverseTransform
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import (
    LipschitzWarning,
    NonFiniteError,
    all_finite,
    check_bool,
    check_choice,
    check_positive_int,
    check_unit_interval,
)
from .logdet import _upcast_half

_MAX_INIT_ITERATIONS = 10_000
_CURRENT = "current"  # a refresh marker in a pickled state: it matched the layer as pickled

# Optimisers that write parameters through ``.data`` (Pyro's ClippedAdam, for one) do not advance
# the parameters' version counters, so the optimiser steps each tensor took part in are counted as
# well (the tensors of the optimiser's parameter groups; a frozen flow outside it is not touched).
# Keyed by id: an entry is dropped when its tensor is freed, before the id can be reused.
_optimizer_steps: dict[int, int] = {}


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    steps = _optimizer_steps
    for group in optimizer.param_groups:
        for param in group["params"]:
            key = id(param)
            count = steps.get(key)
            if count is None:
                weakref.finalize(param, steps.pop, key, None)
                count = 0
            steps[key] = count + 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _tensor_state(tensor: Tensor) -> tuple[int, int | None, int]:
    """A key that changes whenever ``tensor`` may have changed: its storage, its version counter
    (in-place updates, ``load_state_dict``) and the number of optimiser steps it took part in
    (updates through ``.data``, which the version counter does not see)."""
    return tensor.data_ptr(), _version(tensor), _optimizer_steps.get(id(tensor), 0)


_settings_epoch = 0


def _settings_changed() -> None:
    """Count an assignment of a setting that defines what a layer or a block computes (a layer's
    ``coeff`` or ``n_power_iterations``, a block's options): results cached by a Pyro transform are
    kept only while :func:`_settings_state` stays the same."""
    global _settings_epoch
    _settings_epoch += 1


def _settings_state() -> int:
    """The number of such assignments so far, in this process."""
    return _settings_epoch


def _version(tensor: Tensor) -> int | None:
    """The version counter of ``tensor``; ``None`` for an inference tensor (made under
    ``torch.inference_mode()``, e.g. by ``.to()`` there), which has none."""
    return None if tensor.is_inference() else tensor._version


def _normalize_(x: Tensor) -> Tensor:
    """``x / ||x||`` in place (``x`` is a fresh vector at every call site)."""
    return x.div_(torch.linalg.vector_norm(x).clamp_min_(torch.finfo(x.dtype).tiny))


def _store_normalized(buffer: Tensor, x: Tensor) -> None:
    """``buffer <- x / ||x||`` (``x`` is overwritten), or ``buffer`` kept if ``x`` holds NaN/Inf or is
    zero, decided on the device without a host sync: a power step with a non-finite or zero weight
    leaves the power iteration as it was, so repairing the weight repairs the layer."""
    norm = torch.linalg.vector_norm(x)
    # norm / norm is exactly 1 unless the norm is 0 (a zero weight: x would stay zero for good), Inf
    # or NaN; x / norm is then not used
    torch.where(norm / norm == 1, x.div_(norm), buffer, out=buffer)


def _restart_vector(like: Tensor) -> Tensor:
    """A fixed pseudo-random unit vector shaped, typed and placed like ``like`` (from its own seeded
    generator: torch's global RNG is not drawn from). Generic, unlike a constant vector, which can lie
    in an invariant subspace that misses the top singular vector (a channel-symmetric kernel)."""
    generator = torch.Generator().manual_seed(0)  # a CPU generator: draw on the CPU, whatever the default device
    x = torch.randn(like.shape, generator=generator, dtype=torch.float64, device="cpu")
    return _normalize_(x).to(like)


# the layer settings checked on every assignment (see _SpectralNorm.__setattr__)
_LAYER_SETTING_CHECKS = {"coeff": check_unit_interval, "n_power_iterations": check_positive_int}


class _SpectralNorm(nn.Module):
    r"""Shared machinery of spectrally normalised layers.

    Subclasses provide the operator ``_apply_op(w, x)`` (the map whose norm is controlled), its
    adjoint ``_apply_adjoint(w, y)`` and the raw ``weight``. The buffers ``u`` (output side) and ``v``
    (input side) are saved in ``state_dict`` and follow ``.to()``.
    """

    u: Tensor
    v: Tensor
    _buffers_written: tuple[int, int | None, int, int | None] | None = None  # u, v as the layer left them

    def __setattr__(self, name: str, value: Any) -> None:
        """``coeff`` and ``n_power_iterations`` are checked on every assignment, also after
        construction (``layer.coeff = 1.5`` would lift the normalisation), and counted by
        :func:`_settings_changed` (a Pyro transform's cached results are then dropped)."""
        check = _LAYER_SETTING_CHECKS.get(name)
        if check is None:
            super().__setattr__(name, value)
            return
        super().__setattr__(name, check(name, value))
        _settings_changed()

    def __getstate__(self) -> dict[str, Any]:
        """The state with the refresh markers that match the weight (or buffers) as pickled replaced
        by :data:`_CURRENT`: they hold storage addresses and version counters, which a copy
        (``copy.deepcopy``, ``torch.save``) does not keep, and a copy that no longer recognised its
        weight would run power steps its original does not."""
        state = super().__getstate__()
        version = _tensor_state(self.weight)
        for name in ("_refreshed_for", "_settled_for"):
            if state.get(name) == version:
                state[name] = _CURRENT
        if state.get("_buffers_written") == self._buffers_state():
            state["_buffers_written"] = _CURRENT
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name in ("_refreshed_for", "_settled_for"):
            if self.__dict__.get(name) == _CURRENT:
                setattr(self, name, _tensor_state(self.weight))
        if self.__dict__.get("_buffers_written") == _CURRENT:
            self._buffers_written = self._buffers_state()

    def _init_spectral_norm(
        self,
        template: nn.Module,
        u_shape: Sequence[int],
        v_shape: Sequence[int],
        coeff: float,
        n_power_iterations: int,
    ) -> None:
        """Take the weight and bias of a freshly initialised torch layer ``template``, register the
        power-iteration buffers and converge them to within 1% of the exact norm."""
        self.weight = nn.Parameter(template.weight.detach().clone())
        self.bias = None if template.bias is None else nn.Parameter(template.bias.detach().clone())
        self.register_buffer("u", torch.empty(*u_shape))
        self.register_buffer("v", torch.empty(*v_shape))
        self.coeff = coeff  # both checked by __setattr__
        self.n_power_iterations = n_power_iterations
        self._frozen = False
        self._refreshed_for: tuple[int, int, int] | None = None
        self._settled_for: tuple[int, int, int] | None = None
        self._buffers_match = (self.weight,)  # the Parameter object u and v were computed for
        with torch.no_grad():
            self.u.copy_(_normalize_(torch.randn_like(self.u)))
            self.v.copy_(_normalize_(torch.randn_like(self.v)))
            self._converge_power_iteration(rtol=1e-2)
        self._buffers_written = self._buffers_state()

    def _buffers_state(self) -> tuple[int, int | None, int, int | None]:
        """A key that changes when ``u`` or ``v`` is replaced or written in place (not through
        ``.data``, nor in place as inference tensors: neither is counted)."""
        return self.u.data_ptr(), _version(self.u), self.v.data_ptr(), _version(self.v)

    def _restart_degenerate_buffers(self) -> bool:
        """Restart ``u`` or ``v`` from :func:`_restart_vector` where it is zero or holds NaN/Inf:
        power steps cannot leave such a buffer (0 is a fixed point of the step, and a step keeps
        the buffer when its result is not usable). One host sync; returns whether one restarted."""
        norms = torch.stack([torch.linalg.vector_norm(self.u), torch.linalg.vector_norm(self.v)])
        usable = (norms / norms == 1).tolist()  # false for 0, Inf and NaN
        for buffer, ok in zip((self.u, self.v), usable):
            if not ok:
                buffer.copy_(_restart_vector(buffer))
        return not all(usable)

    @torch.no_grad()
    def _converge_power_iteration(self, rtol: float) -> None:
        """Bring the estimate within ``rtol`` of the exact norm: set ``u``, ``v`` to the top singular
        pair where the layer has it in closed form (:meth:`_top_singular`), else iterate (from a
        restart where a buffer is zero or non-finite).

        Raises:
            NonFiniteError: If the weight holds NaN/Inf (its norm is undefined).

        Warns:
            LipschitzWarning: If the iteration runs out of its 10,000 steps short of ``rtol``
                (``stacklevel`` 3: past the ``no_grad`` wrapper, at this method's caller)."""
        self._require_finite_weight()
        self._restart_degenerate_buffers()
        top = self._top_singular()
        if top is not None:
            if self.sigma_estimate() < (1.0 - rtol) * top[2]:
                self.u.copy_(top[0])
                self.v.copy_(top[1])
            return
        exact = self.exact_operator_norm()
        for _ in range(_MAX_INIT_ITERATIONS):
            if self.sigma_estimate() >= (1.0 - rtol) * exact:
                return
            self._power_step()
        estimate = float(self.sigma_estimate())
        if estimate >= (1.0 - rtol) * exact:  # the last step got there
            return
        warnings.warn(
            f"power iteration of {type(self).__name__}({self.extra_repr()}) stopped at {estimate:.6g} after "
            f"{_MAX_INIT_ITERATIONS} steps, short of the exact norm {exact:.6g}: the normalisation is weaker "
            "than coeff asks; lipschitz_bound certifies what the layer applies",
            LipschitzWarning,
            stacklevel=3,
        )

    def _power_step(self) -> None:
        r"""$v \leftarrow W^\top u / \|W^\top u\|$, $u \leftarrow W v / \|W v\|$ (call under ``no_grad``)."""
        w = self.weight.detach()
        _store_normalized(self.v, self._apply_adjoint(w, self.u))
        _store_normalized(self.u, self._apply_op(w, self.v))

    def _settle_rtol(self) -> float:
        return max(1e-6, 100 * torch.finfo(self.weight.dtype).eps)

    @torch.no_grad()
    def refresh(self) -> None:
        r"""Bring the power iteration up to date with the weight, once per change of the weight.

        In training mode: ``n_power_iterations`` steps (cheap; the estimate may lag behind fast-moving
        weights). In ``eval()``: unless $\tilde\sigma$ is already within a relative
        $\max(10^{-6}, 100\,\varepsilon)$ of the exact norm ($\varepsilon$ the weight dtype's machine
        epsilon: about 1.2e-5 in float32, 1e-6 in float64), a linear layer sets $u, v$ to the exact
        top singular vectors (one SVD; $\tilde\sigma$ is then the exact norm up to rounding) and a
        convolution iterates to that tolerance, so that a model evaluated or sampled after training
        applies $\|\tilde W\| \le c$ up to it. Repeated calls with unchanged weights (e.g. a
        forward and then an inverse) leave the operator as it is, so round trips are exact.

        Buffers replaced or written in place since the last refresh (``load_state_dict``, ``.to()``,
        by hand; writes through ``.data`` are not seen) are checked once (one host sync): a zero or
        non-finite ``u`` or ``v``, from which power steps cannot recover, restarts from a fixed
        pseudo-random vector and converges as in ``eval()``.

        Warns:
            LipschitzWarning: If a convolution's iteration to the tolerance runs out of its
                10,000 steps (the layer is then normalised less than ``coeff`` asks).
        """
        self._match_buffers()
        if self._buffers_state() != self._buffers_written and self._restart_degenerate_buffers():
            self._converge_power_iteration(rtol=self._settle_rtol())
        version = _tensor_state(self.weight)
        if not self.training:
            if version != self._settled_for:
                self._converge_power_iteration(rtol=self._settle_rtol())
                self._settled_for = version
        elif version != self._refreshed_for:
            for _ in range(self.n_power_iterations):
                self._power_step()
            self._refreshed_for = version
        self._buffers_written = self._buffers_state()

    def _match_buffers(self) -> None:
        r"""Re-converge ``u`` and ``v`` when the weight Parameter was replaced by another object.

        ``load_state_dict``, ``.to()`` and pickling keep the Parameter object (or restore both it and
        the buffers); ``pyro.module(..., update_module_params=True)`` after loading Pyro's param store
        swaps in new Parameters but not the buffers, which would leave $\tilde\sigma$ stale and
        $\|\tilde W\|$ above $c$. Then, unless the new weight equals the old one, the buffers are
        brought to within a relative $\max(10^{-6}, 100\,\varepsilon)$ of the exact norm (about
        1.2e-5 in float32, 1e-6 in float64) as in :meth:`refresh` in ``eval()``."""
        previous = self._buffers_match[0]
        if previous is self.weight:
            return
        self._buffers_match = (self.weight,)
        same_values = previous.shape == self.weight.shape and previous.device == self.weight.device and bool(
            torch.equal(previous.detach(), self.weight.detach()))
        if not same_values:
            self._converge_power_iteration(rtol=self._settle_rtol())
            self._refreshed_for = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "u" in state_dict and prefix + "v" in state_dict:  # loaded buffers fit the weight as it is
            self._buffers_match = (self.weight,)

    def sigma_estimate(self) -> Tensor:
        r"""$\tilde\sigma = u^\top W v$, differentiable in $W$ (the buffers are constants; a recorded
        graph holds copies of them, so a later power step cannot invalidate it)."""
        self._match_buffers()
        if not torch.is_grad_enabled():
            return torch.sum(self.u * self._apply_op(self.weight, self.v))
        return torch.sum(self.u.clone() * self._apply_op(self.weight, self.v.clone()))

    def normalized_weight(self) -> Tensor:
        r"""$\tilde W = W / \max(1, \tilde\sigma / c)$."""
        scale = torch.clamp(self.sigma_estimate() / self.coeff, min=1.0)
        return self.weight / scale

    def _require_finite_weight(self) -> None:
        if not all_finite(self.weight.detach()):
            raise NonFiniteError(
                f"the weight of {type(self).__name__}({self.extra_repr()}) holds NaN/Inf, so its spectral "
                "norm is undefined; restore the weight (e.g. from a checkpoint) or lower the learning rate"
            )

    def _operator_norm(self, weight: Tensor) -> float:
        """Exact norm of the operator the layer would apply with ``weight`` (any float dtype)."""
        raise NotImplementedError

    def exact_operator_norm(self) -> float:
        """Exact spectral norm of the raw operator."""
        return self._operator_norm(self.weight)

    def _top_singular(self) -> tuple[Tensor, Tensor, float] | None:
        """The raw operator's top left and right singular vectors (shaped as ``u`` and ``v``) and its
        norm, if the layer computes them directly (``None``: power iteration converges the buffers)."""
        return None

    def lipschitz_constant(self) -> float:
        r"""Certified Lipschitz constant of the layer: the exact norm of the normalised operator as the
        layer applies it, $\tilde W = W / \max(1, \tilde\sigma / c)$ rounded in the weight's dtype (in
        float16/bfloat16 that rounding can lift $\|\tilde W\|$ above $\|W\| / \max(1, \tilde\sigma / c)$
        by a few parts in $10^3$).

        Raises:
            NonFiniteError: If the weight holds NaN/Inf (no norm to certify)."""
        with torch.no_grad():
            self._require_finite_weight()
            return self._operator_norm(self.normalized_weight())

    def _maybe_refresh(self) -> None:
        """A layer called on its own refreshes in training mode only; residual blocks also settle it
        in ``eval()`` (see :meth:`refresh`)."""
        if self.training and not self._frozen:
            self.refresh()


class SpectralNormLinear(_SpectralNorm):
    r"""Linear layer $x \mapsto \tilde W x + b$ with $\|\tilde W\|_2 \lesssim c$ (i-ResNet normalisation).

    $$ \tilde W = \frac{W}{\max(1, \tilde\sigma / c)}, \qquad \tilde\sigma = u^\top W v \le \|W\|_2, $$

    with $u, v$ power-iteration vectors (buffers, saved in ``state_dict``). Since $\tilde\sigma$
    may underestimate $\|W\|_2$ slightly, $\|\tilde W\|_2$ may exceed $c$ slightly;
    :meth:`lipschitz_constant` (used by :func:`lipschitz_bound`) is the exact, certified value.

    Power iteration runs automatically: ``n_power_iterations`` steps in the first training-mode
    forward after each change of the weight (e.g. each optimiser step; not while frozen by
    :func:`frozen_spectral_norm`), none when the layer is called on its own in ``eval()``; a
    residual block in ``eval()`` settles it instead, once per change of the weight: unless
    $\tilde\sigma$ is already within a relative $\max(10^{-6}, 100\,\varepsilon)$ of the exact
    norm (about 1.2e-5 in float32, 1e-6 in float64), $u$ and $v$ are set to the exact top singular
    vectors of $W$ (one SVD). At construction the same happens unless the random start is within 1%
    of the exact norm. Gradients flow through $\tilde\sigma$.

    Args:
        in_features: Input size $d_\text{in}$; inputs have shape ``(..., in_features)``.
        out_features: Output size $d_\text{out}$; outputs have shape ``(..., out_features)``.
        coeff: Lipschitz target $c \in (0, 1)$.
        n_power_iterations: Power-iteration steps per change of the weight (run by the next
            training-mode forward).
        bias: Whether to learn an additive bias.

    Raises:
        TypeError: If a size or ``n_power_iterations`` is not an int, or ``coeff`` not a float.
        ValueError: If a size or ``n_power_iterations`` is below 1, or ``coeff`` not in $(0, 1)$.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> layer = SpectralNormLinear(3, 5, coeff=0.9)
        >>> layer(torch.randn(10, 3)).shape
        torch.Size([10, 5])
        >>> layer.lipschitz_constant() <= 0.9 / 0.99  # sigma within 1% of the norm at construction
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.97,
        n_power_iterations: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        linear = nn.Linear(in_features, out_features, bias=check_bool("bias", bias))
        self._init_spectral_norm(linear, (out_features,), (in_features,), coeff, n_power_iterations)

    @staticmethod
    def _apply_op(w: Tensor, x: Tensor) -> Tensor:
        return w @ x

    @staticmethod
    def _apply_adjoint(w: Tensor, y: Tensor) -> Tensor:
        return w.t() @ y

    def _operator_norm(self, weight: Tensor) -> float:
        r"""Exact spectral norm $\|W\|_2$ (``torch.linalg.matrix_norm(ord=2)`` in float64, so that
        a certificate is not short of it by the float32 SVD's rounding)."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(weight.double(), ord=2))

    def _top_singular(self) -> tuple[Tensor, Tensor, float]:
        r"""$u_1$, $v_1$ and $\sigma_1$ of $W = \sum_i \sigma_i u_i v_i^\top$ from one SVD (then
        $u_1^\top W v_1 = \sigma_1$ up to rounding; power iteration needs many steps where
        $\sigma_2 \approx \sigma_1$)."""
        u, sigma, vh = torch.linalg.svd(_upcast_half(self.weight.detach()), full_matrices=False)
        return u[:, 0].to(self.u.dtype), vh[0].to(self.v.dtype), float(sigma[0])

    def forward(self, x: Tensor) -> Tensor:
        r"""$\tilde W x + b$ for ``x`` of shape ``(..., in_features)`` (power iteration first, in
        training mode, if the weight changed)."""
        self._maybe_refresh()
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"
        )


class LipSwish(nn.Module):
    r"""$\phi(x) = x\,\mathrm{sigmoid}(\beta x) / 1.1$ with $\beta = \mathrm{softplus}(b)$ learnable.

    $\sup_x |\tfrac{d}{dx} x\,\mathrm{sigmoid}(\beta x)| \approx 1.0998$ for every $\beta$, so
    $\mathrm{Lip}(\phi) \le 1$. Elementwise: inputs of any shape. $b$ starts at 0.5.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> phi = LipSwish()
        >>> x = torch.linspace(-10, 10, 2001, requires_grad=True)
        >>> (slope,) = torch.autograd.grad(phi(x).sum(), x)
        >>> bool(slope.abs().max() <= 1), phi.lipschitz_constant()
        (True, 1.0)
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    @property
    def beta(self) -> Tensor:
        r"""$\beta = \mathrm{softplus}(b) > 0$ (a scalar tensor, differentiable in $b$)."""
        return F.softplus(self.raw_beta)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x) / 1.1

    def lipschitz_constant(self) -> float:
        r"""Certified Lipschitz constant: 1, for every $\beta$."""
        return 1.0


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"lipswish": LipSwish, "elu": nn.ELU}


class LipschitzMLP(nn.Module):
    r"""Fully connected net $g = \tilde W_L \circ \phi \circ \dots \circ \phi \circ \tilde W_1$ with
    $\mathrm{Lip}(g) \lesssim c^L$.

    Each $\tilde W_i$ is a :class:`SpectralNormLinear` and $\phi$ is 1-Lipschitz, so

    $$ \mathrm{Lip}(g) \le \prod_{i=1}^{L} \|\tilde W_i\|_2 \approx c^L; $$

    :func:`lipschitz_bound` returns the certified product of the exact norms.

    Args:
        dims: Layer sizes ``[d_in, h_1, ..., d_out]`` (at least two entries); the net maps
            ``(..., d_in)`` to ``(..., d_out)``.
        coeff: Lipschitz target of every linear layer, in $(0, 1)$.
        activation: ``"lipswish"`` or ``"elu"`` (both 1-Lipschitz).
        n_power_iterations: Power-iteration steps per change of the weights (run by the next
            training-mode forward).

    Raises:
        ValueError: If ``dims`` has fewer than two entries or ``activation`` is unknown.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> g = LipschitzMLP([2, 32, 32, 2], coeff=0.9)
        >>> g(torch.randn(4, 2)).shape
        torch.Size([4, 2])
        >>> lipschitz_bound(g) < 1
        True
    """

    def __init__(
        self,
        dims: Sequence[int],
        coeff: float = 0.97,
        activation: str = "lipswish",
        n_power_iterations: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
            raise TypeError(f"dims must be a sequence of layer sizes, e.g. [2, 64, 2], got {type(dims).__name__}")
        dims = list(dims)
        if len(dims) < 2:
            raise ValueError(f"dims must have at least 2 entries (input and output), got {dims}")
        check_choice("activation", activation, tuple(_ACTIVATIONS))
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(SpectralNormLinear(d_in, d_out, coeff, n_power_iterations))
        self.layers = nn.Sequential(*layers)
        self.dims = dims
        self.event_shape = (dims[0],)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _spectral_norm_layers(module: nn.Module) -> Iterator[_SpectralNorm]:
    return (m for m in module.modules() if isinstance(m, _SpectralNorm))


@contextmanager
def frozen_spectral_norm(module: nn.Module) -> Iterator[None]:
    r"""Within the context, training-mode forwards of ``module`` do not run power iteration.

    Used by the block so that one forward (explicit map, log-det, inverse solve) sees one operator
    $\tilde W = W / \max(1, \tilde\sigma / c)$: the buffers $u, v$ (hence $\tilde\sigma$) stay fixed.
    The previous state of every layer is restored on exit.

    Args:
        module: Any module; its :class:`SpectralNormLinear` / ``SpectralNormConv2d`` layers freeze.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> layer = SpectralNormLinear(3, 3)
        >>> u = layer.u.clone()
        >>> with frozen_spectral_norm(layer):
        ...     _ = layer(torch.randn(4, 3))
        >>> torch.equal(layer.u, u)
        True
        >>> _ = layer(torch.randn(4, 3))  # training mode, not frozen: one power-iteration step
        >>> torch.equal(layer.u, u)
        False
    """
    layers = list(_spectral_norm_layers(module))
    previous = [layer._frozen for layer in layers]
    for layer in layers:
        layer._frozen = True
    try:
        yield
    finally:
        for layer, was_frozen in zip(layers, previous):
            layer._frozen = was_frozen


def refresh_spectral_norm(module: nn.Module) -> None:
    r"""Bring the power iteration of every spectrally normalised layer of ``module`` up to date.

    A power-iteration step is $v \leftarrow W^\top u / \|W^\top u\|$, $u \leftarrow W v / \|W v\|$.
    A layer in training mode runs ``n_power_iterations`` steps; a layer in ``eval()`` brings
    $\tilde\sigma$ within a relative $\max(10^{-6}, 100\,\varepsilon)$ of its exact norm (about
    1.2e-5 in float32, 1e-6 in float64): a linear layer by taking its exact top singular vectors
    from one SVD, a convolution by iterating. Either is skipped while the weight is unchanged
    since the layer's last refresh in that mode. Every forward and inverse already does this; call
    it e.g. after ``optimizer.step()`` and before :func:`lipschitz_bound`, so that the certificate
    describes the operator the next call applies (``model.eval()`` first for the settled one).

    Args:
        module: Any module; its :class:`SpectralNormLinear` / ``SpectralNormConv2d`` layers refresh.

    Warns:
        LipschitzWarning: If a convolution's iteration to its tolerance runs out of its 10,000
            steps (see :meth:`SpectralNormLinear.refresh`).

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> net = LipschitzMLP([2, 8, 2], n_power_iterations=5)
        >>> refresh_spectral_norm(net)
        >>> layer = net.layers[0]
        >>> bool(layer.sigma_estimate() <= layer.exact_operator_norm() * (1 + 1e-6))  # u^T W v <= |W|
        True
    """
    for layer in _spectral_norm_layers(module):
        layer.refresh()


_LIPSCHITZ_RULES: dict[type, Callable[[nn.Module], float]] = {
    nn.ELU: lambda m: max(1.0, abs(m.alpha)),  # slope alpha e^z below 0: |alpha| also for alpha < 0
    nn.ReLU: lambda m: 1.0,
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.Tanh: lambda m: 1.0,
    nn.Identity: lambda m: 1.0,
    nn.Dropout: lambda m: 1.0 / (1.0 - m.p) if m.training and m.p < 1 else 1.0,
}


def register_lipschitz_rule(cls: type, rule: Callable[[nn.Module], float]) -> None:
    r"""Teach :func:`lipschitz_bound` the certified Lipschitz constant of modules of type ``cls``.

    Rules are looked up along the class's MRO and take precedence over a module's own
    ``lipschitz_constant()``; the bound of an ``nn.Sequential`` is the product of its parts',

    $$ \mathrm{Lip}(f_L \circ \dots \circ f_1) \le \prod_{l} \mathrm{Lip}(f_l). $$

    Args:
        cls: Module type.
        rule: Maps a module of type ``cls`` to an upper bound of its Lipschitz constant.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), https://arxiv.org/abs/1906.02735

    Examples:
        >>> class Halve(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x / 2
        >>> register_lipschitz_rule(Halve, lambda module: 0.5)
        >>> lipschitz_bound(torch.nn.Sequential(SpectralNormLinear(2, 2, coeff=0.9), Halve())) < 0.5
        True
    """
    _LIPSCHITZ_RULES[cls] = rule


def _chain_bound(net: nn.Module) -> float:
    for cls in type(net).__mro__:
        if cls in _LIPSCHITZ_RULES:
            return _LIPSCHITZ_RULES[cls](net)
    if hasattr(net, "lipschitz_constant"):
        return float(net.lipschitz_constant())
    if isinstance(net, nn.Sequential):
        return math.prod(_chain_bound(m) for m in net)
    if isinstance(net, LipschitzMLP):
        return _chain_bound(net.layers)
    raise TypeError(
        f"lipschitz_bound cannot certify a {type(net).__name__}: use the library's Lipschitz nets, "
        "an nn.Sequential of certified layers, or register_lipschitz_rule"
    )


def _residual_nets(obj: object) -> list[nn.Module] | None:
    """The residual nets ``g`` inside a block, a transform, a composition or a model (or None)."""
    if hasattr(obj, "residual_net"):
        return [obj.residual_net]
    if isinstance(obj, ComposeTransform):
        found = [_residual_nets(part) for part in obj.parts]
        return [net for nets in found if nets for net in nets]
    if isinstance(obj, _InverseTransform):
        return _residual_nets(obj._inv)
    if isinstance(obj, TransformedDistribution):
        return _residual_nets(ComposeTransform(obj.transforms))
    if isinstance(obj, nn.Module):
        nets = [m.residual_net for m in obj.modules() if hasattr(m, "residual_net")]
        return nets or None
    return None


def lipschitz_bound(module: object) -> float:
    r"""Certified upper bound of $\mathrm{Lip}(g)$.

    For a network: the product over layers of the exact spectral norm of each *normalised* weight
    (``torch.linalg.matrix_norm(ord=2)``, or the exact operator norm for convolutions) times the
    activations' Lipschitz constants. For a block or a Pyro/normflows transform: the bound of its
    ``g``; for a composition or a model: the maximum over its residual blocks.

    $$ \mathrm{Lip}(g) \le \prod_i \|\tilde W_i\|_2 \prod_j \mathrm{Lip}(\phi_j), $$

    where $\|\tilde W_i\|_2$ is computed exactly (not the power-iteration estimate), so the result
    certifies invertibility of $y = x + g(x)$ when it is below 1.

    Args:
        module: A Lipschitz network, a ``ResidualBlock``, a transform, a composition of them or a
            ``TransformedDistribution``.

    Returns:
        The bound (a float).

    Raises:
        TypeError: If a layer's Lipschitz constant cannot be certified.
        ValueError: If a composition holds no residual block.

    Warns:
        LipschitzWarning: If ``module`` holds residual blocks and the bound is not below 1.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import iresnet
        >>> lipschitz_bound(iresnet(2, coeff=0.9)) < 1
        True
        >>> lipschitz_bound(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
            ...
        TypeError: lipschitz_bound cannot certify a Linear: ...
    """
    nets = _residual_nets(module)
    if nets is None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"lipschitz_bound expects a module or transform, got {type(module).__name__}")
        return _chain_bound(module)
    if not nets:
        raise ValueError(f"lipschitz_bound found no residual block in {type(module).__name__}")
    bound = max(_chain_bound(net) for net in nets)
    if bound >= 1.0:
        warnings.warn(
            f"certified Lip(g) = {bound:.4f} >= 1: a residual block may not be invertible; raise "
            "n_power_iterations or lower coeff",
            LipschitzWarning,
            stacklevel=2,
        )
    return bound

