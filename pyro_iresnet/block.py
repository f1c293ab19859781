r"""The residual block $y = x + g(x)$: explicit map with log-det, and its inverse.

This is the single core behind the Pyro and normflows adapters. $g$ must be a contraction
($\mathrm{Lip}(g) < 1$, e.g. a :class:`~pyro_iresnet.LipschitzMLP`), so that

$$ \log p(x) = \log p(z) + \log\det(I + J_g(x)), \qquad z = x + g(x), $$

and $x$ is recovered from $z$ by the fixed point $x \leftarrow z - g(x)$.

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = ["Diagnostics", "ResidualBlock", "name_blocks"]

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .context import ConcatContextNet
from .errors import (
    ConvergenceError,
    NonFiniteError,
    _check_floating_tensor,
    all_finite,
    check_bool,
    check_choice,
    check_finite,
    check_positive_finite,
    check_positive_int,
    check_roulette_p,
    check_tolerance,
)
from .fused import FusedMLP, fused_logdet, fused_mlp, supports_fused
from .fused_inverse import SolverNet, newton_inverse, newton_inverse_and_logdet, solver_net
from .inverse import SolveInfo, fixed_point_inverse
from .lipschitz import (
    LipschitzMLP,
    _settings_changed,
    _spectral_norm_layers,
    frozen_spectral_norm,
    lipschitz_bound,
    refresh_spectral_norm,
)
from .logdet import (
    _roulette_weights,
    backward_in_forward,
    draw_probes,
    exact_logdet,
    hutchinson_logdet,
    jacobian_series_logdet,
    series_weights,
)

LOGDET_METHODS = ("unbiased", "series", "exact")
_CREATION_ORDER = itertools.count()
EVAL_LOGDET_METHODS = ("auto", *LOGDET_METHODS)


def _check_fused(fused: bool | str) -> bool | str:
    if isinstance(fused, str):
        if fused != "auto":
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        return fused
    try:  # numpy booleans too; not 0/1
        return check_bool("fused", fused)
    except TypeError:
        raise TypeError(f"fused must be True, False or 'auto', got {fused!r}") from None


#: The checks of the options a block keeps as attributes (the argument ``logdet`` is kept as
#: ``logdet_method``); :meth:`ResidualBlock.__setattr__` runs them on every assignment, at
#: construction and after.
_OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {
    "logdet_method": functools.partial(check_choice, "logdet_method", choices=LOGDET_METHODS),
    "n_terms": functools.partial(check_positive_int, "n_terms"),
    "n_exact_terms": functools.partial(check_positive_int, "n_exact_terms", minimum=0),
    "roulette": functools.partial(check_choice, "roulette", choices=("geometric", "poisson")),
    "p": functools.partial(check_roulette_p, "p"),
    "lam": functools.partial(check_positive_finite, "lam"),
    "n_roulette_draws": functools.partial(check_positive_int, "n_roulette_draws"),
    "n_probes": functools.partial(check_positive_int, "n_probes"),
    "probe": functools.partial(check_choice, "probe", choices=("gaussian", "rademacher")),
    "neumann_grad": functools.partial(check_bool, "neumann_grad"),
    "memory_efficient": functools.partial(check_bool, "memory_efficient"),
    "eval_logdet": functools.partial(check_choice, "eval_logdet", choices=EVAL_LOGDET_METHODS),
    "exact_max_dim": functools.partial(check_positive_int, "exact_max_dim"),
    "atol": functools.partial(check_tolerance, "atol"),
    "rtol": functools.partial(check_tolerance, "rtol"),
    "max_iter": functools.partial(check_positive_int, "max_iter"),
    "strict": functools.partial(check_bool, "strict"),
    "check_finite": lambda value: None if value is None else check_bool("check_finite", value),
    "event_dim": functools.partial(check_positive_int, "event_dim"),
    "fused": _check_fused,
    "exact_trace": functools.partial(check_bool, "exact_trace"),
    "inverse_method": functools.partial(check_choice, "inverse_method", choices=("fixed_point", "anderson", "newton")),
}
#: Options that must also fit the net and each other (:meth:`ResidualBlock._check_structure`).
_STRUCTURE_OPTIONS = ("event_dim", "fused", "exact_trace", "inverse_method")

_Method = TypeVar("_Method", bound=Callable[..., Any])
# torch.compiler.disable imports torch._dynamo when it decorates (about 1 s at import time); torch's
# own lazy variant imports it on the first call instead (the public one if a torch lacks it)
_disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; ``False`` for a device type without autocast
    (``meta``, ``lazy``), for which torch's query raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _eager_in_parameter_dtype(method: _Method) -> _Method:
    """A public method of a module holding a residual block (:class:`ResidualBlock`, the normflows
    layer): it runs eagerly and in the parameters' precision.

    * ``torch.compile``: the call is a graph break (tracing into the fused path or the series
      estimators' double backward is not supported). ``torch.jit.trace`` raises
      ``NotImplementedError``: a trace would freeze the random roulette length and the solver's
      data-dependent iteration counts.
    * Autocast: inside an autocast region for the inputs' device, autocast is off within the call
      and float16/bfloat16 tensor arguments (input, context) are cast to the parameters' dtype, as
      autocast does for its float32 operations: the inverse's tolerance, the power iteration and the
      log-det need that precision (other dtypes are left alone, and a mismatch still raises).
    """

    @functools.wraps(method)
    def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "residual blocks cannot be traced by torch.jit.trace (Pyro: JitTrace_ELBO): the trace would "
                "freeze the roulette length, the solver's iteration counts and the input checks as constants "
                "(a biased log-det); use Trace_ELBO, or torch.compile"
            )
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is None or not _autocast_enabled(first.device.type):
            return method(self, *args, **kwargs)
        device_type = first.device.type
        param = next(self.parameters(), None)

        def cast(a: Any) -> Any:
            low = isinstance(a, Tensor) and a.dtype in _LOW_PRECISION
            return a.to(param.dtype) if low and param is not None else a

        with torch.autocast(device_type, enabled=False):
            return method(self, *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return _disable_dynamo(call)


@dataclass
class Diagnostics:
    r"""What the last log-det or inverse call of a block did (a plain forward, which computes neither,
    leaves it as it was): which estimator of $\log|\det(I + J_g(x))|$ ran, with how many series
    terms, and how the last inverse solve of $x + g(x) = y$ went.

    Attributes:
        logdet_method: Estimator used (``"exact"``, ``"series"`` or ``"unbiased"``), or ``None``.
        n_terms: Series terms evaluated (``None`` for ``"exact"``).
        inverse: The last inverse solve's iterations and residuals, or ``None``.

    References:
        Residual Flows for Invertible Generative Modeling (Chen et al., 2019), https://arxiv.org/abs/1906.02735

    Examples:
        >>> from pyro_iresnet import LipschitzMLP, ResidualBlock
        >>> block = ResidualBlock(LipschitzMLP([2, 8, 2]), logdet="series", n_terms=5)
        >>> _ = block.forward_and_logdet(torch.randn(3, 2))
        >>> block.last_diagnostics
        Diagnostics(logdet_method='series', n_terms=5, inverse=None)
        >>> _ = block.inverse(torch.randn(3, 2))
        >>> block.last_diagnostics.inverse.converged
        True
    """

    logdet_method: str | None = None
    n_terms: int | None = None
    inverse: SolveInfo | None = None


class ResidualBlock(nn.Module):
    r"""Invertible residual block $y = x + g(x)$ with $\mathrm{Lip}(g) < 1$.

    The explicit direction is $x \mapsto y$; the inverse solves $x + g(x) = y$ by fixed-point
    iteration (or Anderson acceleration) with an implicit gradient. The log-det of the explicit
    map,

    $$ \log\Big|\det\frac{\partial y}{\partial x}\Big| = \log\det(I + J_g(x))
       = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \operatorname{tr}\big(J_g(x)^k\big), $$

    is estimated per sample by one of three estimators:

    * ``"exact"``: full Jacobian and ``slogdet``; intended up to a few dozen dimensions.
    * ``"series"``: first ``n_terms`` terms of $\sum_k (-1)^{k+1}\operatorname{tr}(J^k)/k$ with
      Hutchinson traces; biased by at most :func:`~pyro_iresnet.logdet_error_bound`.
    * ``"unbiased"``: Russian roulette over the series; its expectation is the exact log-det.

    In ``eval()`` mode the estimator is ``eval_logdet``: ``"auto"`` (default) means exact when the
    event has at most ``exact_max_dim`` entries, else the training estimator ``logdet``; any other
    value forces that estimator. Spectral normalisation runs one round of power iteration
    (``n_power_iterations`` steps, skipped while the weights are unchanged since the last round) at
    the start of every training-mode call (forward, log-det or inverse) and is frozen within the
    call and its backward.

    Under ``torch.compile`` each call of ``forward``, ``forward_and_logdet``, ``inverse`` and
    ``inverse_and_logdet`` is a graph break and runs eagerly, so a model containing blocks compiles
    (without ``fullgraph=True``) and gives the eager values and gradients. Inside ``torch.autocast``
    the calls switch autocast off and cast float16/bfloat16 inputs to the parameters' dtype. Second
    derivatives (``create_graph=True``) are exact on the generic path's explicit direction with
    ``logdet="exact"`` or ``neumann_grad=False`` (and ``memory_efficient=False``); through the other
    paths they raise a ``RuntimeError`` (:mod:`pyro_iresnet.first_order`).

    Args:
        net: The residual function $g$, mapping ``(N, *event)`` to ``(N, *event)`` sample-wise.
        event_dim: Number of trailing event dimensions (1 for vectors, 3 for images).
        logdet: Training-mode estimator: ``"unbiased"``, ``"series"`` or ``"exact"``.
        n_terms: Number of series terms for ``"series"``.
        n_exact_terms: Terms always computed by ``"unbiased"``.
        roulette: ``"geometric"`` (parameter ``p``) or ``"poisson"`` (parameter ``lam``).
        p: Success probability of the geometric roulette, in $(0, 1)$.
        lam: Rate of the Poisson roulette.
        n_roulette_draws: Roulette draws averaged into the term weights.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"`` or ``"rademacher"``.
        exact_trace: Series traces from the full Jacobian instead of Hutchinson probes.
        neumann_grad: Gradient through the Neumann series (memory flat in the number of terms).
        memory_efficient: Compute the log-det gradients in the forward pass (backward-in-forward);
            affects the generic path only (the fused path's backward is already memory-flat).
        eval_logdet: Estimator in ``eval()`` mode, see above.
        exact_max_dim: Largest event size for which ``eval_logdet="auto"`` is exact.
        atol: Inverse residual tolerance (default from :func:`~pyro_iresnet.inverse.default_tolerances`:
            1e-6 in float32, 1e-12 in float64).
        rtol: Inverse tolerance relative to $\|y\|_\infty$ (default 1e-6 in float32, 1e-13 in float64).
        max_iter: Iteration cap of the inverse and of its adjoint.
        inverse_method: ``"fixed_point"``, ``"anderson"``, or ``"newton"`` (fixed-point steps
            accelerated by safeguarded Newton and chord steps with the exact Jacobian, and an exactly
            solved adjoint, :func:`~pyro_iresnet.fused_inverse.newton_inverse`; needs the fused path: a
            supported ``LipschitzMLP``, also as a ``ConcatContextNet``; meant for small $d$). With ``"newton"``, an
            ``inverse_and_logdet`` call that needs no gradient and whose log-det is exact (sampling
            in ``eval()`` with ``eval_logdet`` exact, without ``exact_trace``) takes the log-det
            from the forward pass that checked the solution
            (:func:`~pyro_iresnet.fused_inverse.newton_inverse_and_logdet`).
        strict: Raise :class:`~pyro_iresnet.ConvergenceError` instead of warning.
        check_finite: Reject NaN/Inf inputs. ``None`` checks CPU tensors only, since the check
            reads the tensor (a host-device sync on accelerators).
        fused: Fast path of :mod:`pyro_iresnet.fused` (one autograd Function per block with
            closed-form gradients; same values and gradients as the generic path for the same
            draws). ``"auto"`` (default) uses it whenever ``net`` is a supported ``LipschitzMLP``
            (or a :class:`~pyro_iresnet.context.ConcatContextNet` over one) and
            ``exact_trace=False``; ``True`` requires a supported ``net`` and ``exact_trace=False``;
            ``False`` always uses the generic autograd path.

    Raises:
        TypeError: If ``net`` is not an ``nn.Module`` or an integer option is not an int.
        ValueError: If an option is out of range or not one of its choices, ``fused=True`` /
            ``inverse_method="newton"`` is asked for with an unsupported ``net``, or ``fused=True``
            with ``exact_trace=True``. A call with a context raises it too if ``net`` takes none
            (no ``context_dim`` and a ``forward`` with a single argument). The options are kept as
            attributes of the same names (``logdet`` as ``logdet_method``); assigning one later
            (``block.atol = 1e-8``) runs the same checks and, if they fail, leaves the block
            unchanged.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

        Residual Flows for Invertible Generative Modeling (Chen et al., 2019),
        https://arxiv.org/abs/1906.02735

    Examples:
        >>> from pyro_iresnet import LipschitzMLP, ResidualBlock
        >>> block = ResidualBlock(LipschitzMLP([2, 16, 2], coeff=0.9), logdet="exact")
        >>> x = torch.randn(5, 2)
        >>> y, logdet = block.forward_and_logdet(x)
        >>> torch.allclose(block.inverse(y), x, atol=1e-5), logdet.shape
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        event_dim: int = 1,
        logdet: str = "unbiased",
        n_terms: int = 10,
        n_exact_terms: int = 2,
        roulette: str = "geometric",
        p: float = 0.5,
        lam: float = 2.0,
        n_roulette_draws: int = 1,
        n_probes: int = 1,
        probe: str = "gaussian",
        exact_trace: bool = False,
        neumann_grad: bool = True,
        memory_efficient: bool = False,
        eval_logdet: str = "auto",
        exact_max_dim: int = 64,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = 1000,
        inverse_method: str = "fixed_point",
        strict: bool = False,
        check_finite: bool | None = None,
        fused: bool | str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        _check_residual_shape(net)
        self.net = net
        self.context_dim: int | None = getattr(net, "context_dim", None)
        # every option goes through __setattr__, which checks it as it would a later reassignment
        options = dict(
            event_dim=event_dim, logdet_method=check_choice("logdet", logdet, LOGDET_METHODS), n_terms=n_terms,
            n_exact_terms=n_exact_terms, roulette=roulette, p=p, lam=lam, n_roulette_draws=n_roulette_draws,
            n_probes=n_probes, probe=probe, exact_trace=exact_trace, neumann_grad=neumann_grad,
            memory_efficient=memory_efficient, eval_logdet=eval_logdet, exact_max_dim=exact_max_dim, atol=atol,
            rtol=rtol, max_iter=max_iter, inverse_method=inverse_method, strict=strict, check_finite=check_finite,
            fused=fused,
        )
        for name, value in options.items():
            setattr(self, name, value)
        self._check_structure(**{name: getattr(self, name) for name in _STRUCTURE_OPTIONS})
        self.event_shape: tuple[int, ...] | None = getattr(net, "event_shape", None)
        self._net_takes_context = self.context_dim is not None or _accepts_second_argument(net)
        self.last_diagnostics = Diagnostics()
        self.name = f"#{next(_CREATION_ORDER)}"  # see name_blocks

    def __setattr__(self, name: str, value: Any) -> None:
        """Options reassigned after construction (``block.atol = 1e-8``) are checked as the
        constructor checks them; a reassignment that fails leaves the block unchanged, one that
        succeeds is counted by :func:`~pyro_iresnet.lipschitz._settings_changed` (a Pyro
        transform's cached results are then dropped)."""
        check = _OPTION_CHECKS.get(name)
        if check is None:
            super().__setattr__(name, value)
            return
        value = check(value)
        if name in _STRUCTURE_OPTIONS and name in self.__dict__:  # after construction
            self._check_structure(**{key: self.__dict__[key] for key in _STRUCTURE_OPTIONS} | {name: value})
        super().__setattr__(name, value)
        _settings_changed()

    def _check_structure(self, *, event_dim: int, fused: bool | str, exact_trace: bool, inverse_method: str) -> None:
        """The options that must fit the net and each other (each one already checked alone)."""
        net_event_shape = getattr(self.net, "event_shape", None)
        if net_event_shape is not None and len(net_event_shape) != event_dim:
            raise ValueError(
                f"event_dim={event_dim} does not fit the net's event_shape {tuple(net_event_shape)} "
                f"({type(self.net).__name__} takes inputs (N, *event_shape): event_dim={len(net_event_shape)})"
            )
        if fused is True and not self._supports_fused(self.net):
            raise ValueError(
                f"fused=True needs a LipschitzMLP with LipSwish/ELU activations, got {type(self.net).__name__}; "
                "use fused='auto' or False"
            )
        if fused is True and event_dim != 1:
            raise ValueError(f"fused=True needs event_dim=1 (the fused path is for vectors), got {event_dim}")
        if fused is True and exact_trace:
            raise ValueError(
                "fused=True does not cover exact_trace=True (the fused path estimates traces with probes); "
                "use fused='auto' or exact_trace=False"
            )
        newton_ok = fused is not False and event_dim == 1 and self._supports_fused(self.net)
        if inverse_method == "newton" and not newton_ok:
            raise ValueError(
                f"inverse_method='newton' needs the fused path (a LipschitzMLP with "
                f"LipSwish/ELU, event_dim=1 and fused != False), got net {type(self.net).__name__}, "
                f"event_dim={event_dim} and fused={fused!r}"
            )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name in ("event_shape", "context_dim"):  # pickled by a version without these
            self.__dict__.setdefault(name, getattr(self.net, name, None))
        if "_net_takes_context" not in self.__dict__:
            self._net_takes_context = self.context_dim is not None or _accepts_second_argument(self.net)

    @property
    def residual_net(self) -> nn.Module:
        """The residual function $g$ (what :func:`~pyro_iresnet.lipschitz_bound` certifies)."""
        return self.net

    # -- helpers ---------------------------------------------------------------------------
    def g(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """$g(x)$ (or $g(x, c)$) on flattened inputs ``(N, *event)`` with power iteration frozen."""
        with frozen_spectral_norm(self.net):
            gx = self.net(x) if context is None else self.net(x, context)
        if gx.shape != x.shape:
            raise ValueError(
                f"the net of residual block {self.name} ({type(self.net).__name__}) maps inputs of shape "
                f"{tuple(x.shape)} to {tuple(gx.shape)}: a residual block x + g(x) needs g(x) shaped like x"
            )
        return gx

    @contextmanager
    def _diagnostics_kept_on_error(self) -> Iterator[None]:
        """A solve that raises :class:`~pyro_iresnet.ConvergenceError` (``strict=True``) still records
        its :class:`~pyro_iresnet.inverse.SolveInfo` in ``last_diagnostics``."""
        try:
            yield
        except ConvergenceError as error:
            self.last_diagnostics = Diagnostics(inverse=error.info)
            raise

    def _normalization_buffers(self) -> list[tuple[nn.Module, str]]:
        """The power-iteration buffers (module, name) that define the normalised weights $g$ applies."""
        return [(layer, name) for layer in _spectral_norm_layers(self.net) for name in ("u", "v")]

    def _g_for_backward(self) -> Callable[..., Tensor]:
        r""":meth:`g` as this call applies it, for the evaluations a backward pass runs later (the
        inverse's adjoint, the memory-saving estimator's re-run for weighted losses).

        Its power-iteration buffers are copies taken now, so a refresh before that backward (a call
        in ``eval()``, ``refresh_spectral_norm``, normflows' ``update_lipschitz``) does not change the
        $g$ differentiated. (A parameter of $g$ modified in place in between is refused by autograd:
        the Functions that evaluate $g$ at backward time save the parameters.)"""
        snapshot = [(module, name, module._buffers[name].clone()) for module, name in self._normalization_buffers()]

        def g(x: Tensor, context: Tensor | None = None) -> Tensor:
            with _swapped_buffers(snapshot):
                return self.g(x, context)

        return g

    def refresh_lipschitz(self) -> None:
        """Power iteration on $g$'s layers (see :func:`~pyro_iresnet.lipschitz.refresh_spectral_norm`),
        run by every call; a no-op while the weights are unchanged since the last refresh."""
        refresh_spectral_norm(self.net)

    @staticmethod
    def _supports_fused(net: nn.Module) -> bool:
        """Whether the fast path implements ``net`` (subclasses for other nets extend this and
        :meth:`_read_fused`)."""
        return supports_fused(net)

    def _read_fused(self) -> FusedMLP | None:
        """The fast-path parameters of ``net`` (``None`` if unsupported): reads the power-iteration
        buffers, runs no forward."""
        return fused_mlp(self.net)

    def _fused_net(self) -> FusedMLP | None:
        """The fast-path parameters (see ``fused``) for this call, or ``None`` for the generic path."""
        if self.fused is False or self.exact_trace or self.event_dim != 1:
            return None
        return self._read_fused()

    def _certified_lipschitz(self) -> float | None:
        """:func:`~pyro_iresnet.lipschitz_bound` of $g$ for non-convergence messages (None if $g$ has a
        layer it cannot certify)."""
        try:
            return lipschitz_bound(self.net)
        except TypeError:
            return None

    def _params(self) -> list[Tensor]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def _checks_values(self, x: Tensor) -> bool:
        return bool(self.check_finite or (self.check_finite is None and x.device.type == "cpu"))

    def _check_shape(self, shape: Sequence[int], what: str) -> None:
        """A ``ValueError`` naming ``what`` unless ``shape`` is ``(..., *event)`` for this block (its
        net's ``event_shape`` where it has one, else ``event_dim`` dimensions of any size)."""
        event_shape = tuple(shape[len(shape) - self.event_dim:]) if len(shape) >= self.event_dim else None
        if event_shape is None or (self.event_shape is not None and event_shape != tuple(self.event_shape)):
            expected = "(..., " + ", ".join(map(str, self.event_shape or ("*",) * self.event_dim)) + ")"
            raise ValueError(f"{what} must have shape {expected}, got {tuple(shape)}")

    def _describe(self, name: str) -> str:
        role = {"x": "input to the forward map", "y": "input to the inverse"}.get(name)
        return name if role is None else f"{name} ({role} of residual block {self.name})"

    def _check_tensor(self, x: Tensor, name: str) -> None:
        name = self._describe(name)
        _check_floating_tensor(name, x)
        param = next(self.net.parameters(), None)
        if param is not None and param.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the block's parameters are {param.dtype}; "
                f"convert one of them (e.g. block.to({x.dtype}))"
            )
        if self._checks_values(x):
            check_finite(name, x)

    def _check_logdet(self, logdet: Tensor) -> Tensor:
        """Raise :class:`~pyro_iresnet.NonFiniteError` naming this block if the log-det holds NaN/Inf."""
        if self._checks_values(logdet) and not all_finite(logdet):
            bad = int((~torch.isfinite(logdet)).sum())
            raise NonFiniteError(
                f"log-det of residual block {self.name} is not finite in {bad} of {logdet.numel()} samples "
                "(NaN/Inf weights or activations: lower the learning rate, check the loss of the previous "
                "step and lipschitz_bound of the block; blocks are numbered in creation order unless "
                "pyro_iresnet.name_blocks(model) named them by position)"
            )
        return logdet

    def _prepare(
        self, x: Tensor, name: str, context: Tensor | None
    ) -> tuple[Tensor, Tensor | None, torch.Size, torch.Size]:
        """Validate, broadcast with the context and flatten to ``(N, *event)``.

        Returns the flat input, the flat context (or None), the batch shape and the full shape.
        """
        self._check_tensor(x, name)
        self._check_shape(x.shape, self._describe(name))
        event_shape = x.shape[x.dim() - self.event_dim:]
        batch_shape = x.shape[: x.dim() - self.event_dim]
        if context is None:
            if self.context_dim is not None:
                raise ValueError(
                    f"residual block {self.name} is conditional (its net has context_dim={self.context_dim}): "
                    f"pass a context of shape (..., {self.context_dim})"
                )
            return x.reshape(-1, *event_shape), None, batch_shape, x.shape
        if not self._net_takes_context:
            raise ValueError(
                f"residual block {self.name} got a context, but its net ({type(self.net).__name__}) takes none: "
                "call it without a context, or use a conditional net such as ConcatContextNet (a net with a "
                "context_dim attribute is always given the context)"
            )
        self._check_tensor(context, "context")
        if context.dim() < 1 or (self.context_dim is not None and context.shape[-1] != self.context_dim):
            expected = "context_dim" if self.context_dim is None else self.context_dim
            raise ValueError(f"context must have shape (..., {expected}), got {tuple(context.shape)}")
        try:
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"{self._describe(name)} batch shape {tuple(batch_shape)} does not broadcast with context shape "
                f"{tuple(context.shape)}"
            ) from None
        full_shape = batch_shape + event_shape
        flat_x = x.expand(full_shape).reshape(-1, *event_shape)
        flat_context = context.expand(batch_shape + context.shape[-1:]).reshape(-1, context.shape[-1])
        return flat_x, flat_context, batch_shape, full_shape

    def _current_logdet_method(self, event_size: int) -> str:
        if self.training:
            return self.logdet_method
        if self.eval_logdet == "auto":
            return "exact" if event_size <= self.exact_max_dim else self.logdet_method
        return self.eval_logdet

    def _register_pyro_params(self, x: Tensor, context: Tensor | None) -> None:
        """A net converted to a Pyro ``PyroModule`` (``to_pyro_module_``, also a part of it) puts each parameter into
        Pyro's param store on its first use in a forward, which cannot happen inside ``torch.func``
        transforms (the exact Jacobian's ``vmap``): one row goes through the net first, outside them."""
        if any(getattr(module, "_pyro_context", None) is not None for module in self.net.modules()):
            self.g(x[:1], None if context is None else context[:1])

    def _logdet_flat(
        self, x: Tensor, context: Tensor | None, fast_no_grad: FusedMLP | None = None
    ) -> tuple[Tensor, Tensor]:
        """$g(x)$ and the log-det for flattened inputs; records diagnostics. ``fast_no_grad``: the
        fused parameters if already read under ``no_grad`` in this call (used when no gradient is
        needed)."""
        method = self._current_logdet_method(math.prod(x.shape[1:]))
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in self.net.parameters())
            or (context is not None and context.requires_grad)
        )
        if fast_no_grad is not None and not needs_grad:
            fast = fast_no_grad
        else:
            with torch.set_grad_enabled(needs_grad):
                fast = self._fused_net()
        if method == "exact":
            self.last_diagnostics = Diagnostics("exact", None, None)
            with torch.set_grad_enabled(needs_grad):
                if fast is not None:
                    return fused_logdet(fast, x, "exact", context=context)
                self._register_pyro_params(x, context)
                return exact_logdet(self.g, x, context)
        if method == "series":
            weights = series_weights(self.n_terms)
        else:
            param = self.p if self.roulette == "geometric" else self.lam
            weights = _roulette_weights(self.n_exact_terms, self.roulette, param, self.n_roulette_draws)
        self.last_diagnostics = Diagnostics(method, len(weights), None)
        if self.exact_trace:
            with torch.set_grad_enabled(needs_grad):
                self._register_pyro_params(x, context)
                return jacobian_series_logdet(self.g, x, weights, context)
        probes = draw_probes(x, self.n_probes, self.probe)
        if fast is not None:  # memory_efficient changes nothing here: the fused backward is flat
            with torch.set_grad_enabled(needs_grad):
                return fused_logdet(fast, x, "series", weights, probes, self.neumann_grad, context)

        if context is not None and torch.is_inference_mode_enabled():  # the VJPs refuse inference tensors
            with torch.inference_mode(False):
                context = context.clone()

        def g(z: Tensor) -> Tensor:
            return self.g(z, context)

        if needs_grad and self.memory_efficient:
            if context is not None and context.requires_grad:
                raise ValueError(
                    "memory_efficient=True does not propagate gradients to a context that requires "
                    "grad; use memory_efficient=False"
                )
            g_later = self._g_for_backward()  # the estimator runs again at backward time

            def estimator(x_leaf: Tensor) -> tuple[Tensor, Tensor]:
                return hutchinson_logdet(
                    lambda z: g_later(z, context), x_leaf, weights, probes, self.neumann_grad, True
                )

            return backward_in_forward(estimator, x, self._params())
        inputs = [t for t in (*self._params(), context) if t is not None and t.requires_grad]
        return hutchinson_logdet(g, x, weights, probes, self.neumann_grad, needs_grad, params=inputs)

    # -- public API ------------------------------------------------------------------------
    @_eager_in_parameter_dtype
    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The explicit map $y = x + g(x)$, for ``x`` of shape ``(..., *event)``.

        Args:
            x: Inputs of shape ``(..., *event)``.
            context: For a conditional $g(x, c)$: context of shape ``(..., context_dim)``,
                broadcast against the batch shape of ``x``.

        Returns:
            $y$ of the broadcast shape ``(..., *event)``.

        Raises:
            TypeError: If ``x`` is not a floating tensor of the parameters' dtype.
            ValueError: If a shape is wrong, or ``x`` holds NaN/Inf (see ``check_finite``).
        """
        x_flat, context, _, shape = self._prepare(x, "x", context)
        self.refresh_lipschitz()
        return (x_flat + self.g(x_flat, context)).reshape(shape)

    @_eager_in_parameter_dtype
    def forward_and_logdet(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""$y = x + g(x)$ and $\log|\det \partial y/\partial x|$ of the batch shape.

        The log-det is $\log\det(I + J_g(x))$, estimated by the estimator of the current mode
        (``logdet`` in training, ``eval_logdet`` in ``eval()``); :attr:`last_diagnostics` records
        which one ran and how many terms.

        Args:
            x: Inputs of shape ``(..., *event)``.
            context: For a conditional $g(x, c)$: context of shape ``(..., context_dim)``,
                broadcast against the batch shape of ``x``.

        Returns:
            $y$ of shape ``(..., *event)`` and the log-det of the batch shape ``(...)``.
        """
        x_flat, context, batch_shape, shape = self._prepare(x, "x", context)
        self.refresh_lipschitz()
        gx, logdet = self._logdet_flat(x_flat, context)
        return (x_flat + gx).reshape(shape), self._check_logdet(logdet).reshape(batch_shape)

    def logdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""$\log|\det(I + J_g(x))|$ of the batch shape (the second output of
        :meth:`forward_and_logdet`; the same arguments)."""
        return self.forward_and_logdet(x, context)[1]

    @_eager_in_parameter_dtype
    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        r"""$x$ with $x + g(x) = y$, differentiable in $y$, the context and $g$'s parameters
        (implicit gradient).

        Solved by ``inverse_method`` until $\|x + g(x) - y\|_\infty \le \mathrm{atol} +
        \mathrm{rtol}\,\|y\|_\infty$ per sample; the backward solves the adjoint equation
        $u = \bar x - J_g^\top u$ instead of differentiating through the iterations.
        :attr:`last_diagnostics` ``.inverse`` holds the iterations and residuals.

        Args:
            y: Outputs of shape ``(..., *event)``.
            context: For a conditional $g(x, c)$: context of shape ``(..., context_dim)``.

        Returns:
            $x$ of shape ``(..., *event)``.

        Warns:
            ConvergenceWarning: A sample did not reach the tolerance in ``max_iter`` iterations.

        Raises:
            ConvergenceError: The same, with ``strict=True``.
            ValueError: If ``y`` or ``context`` has the wrong shape, or a context is given to a net that
                takes none.
        """
        y_flat, context, _, shape = self._prepare(y, "y", context)
        return self._inverse_flat(y_flat, context)[0].reshape(shape)

    def _inverse_flat(self, y_flat: Tensor, context: Tensor | None) -> tuple[Tensor, FusedMLP | None]:
        """The inverse for flattened, checked inputs; also the fused parameters it read under
        ``no_grad`` (``None`` if none), for a log-det at the solution."""
        self.refresh_lipschitz()
        params = self._params() if torch.is_grad_enabled() else []
        if self.inverse_method == "newton":
            with torch.set_grad_enabled(bool(params)):
                fast = self._read_fused()  # whatever exact_trace says: that option is the log-det's
            with self._diagnostics_kept_on_error():
                x, info = newton_inverse(
                    fast, y_flat, context, atol=self.atol, rtol=self.rtol, max_iter=self.max_iter, strict=self.strict,
                    lipschitz=self._certified_lipschitz,
                )
            self.last_diagnostics = Diagnostics(inverse=info)
            return x, None
        with torch.no_grad():
            fast = self._fused_net()
        # solver iterations (no_grad) run the fused net where there is one; the adjoint, which a
        # backward pass runs only if this call records a graph, evaluates g as this call applies it
        g_solver = self.g if fast is None else solver_net(fast)
        g_later = self._g_for_backward() if torch.is_grad_enabled() else g_solver

        def g(x: Tensor, context: Tensor | None = None) -> Tensor:
            return g_later(x, context) if torch.is_grad_enabled() else g_solver(x, context)

        with self._diagnostics_kept_on_error():
            x, info = fixed_point_inverse(
                g, y_flat, params, context=context,
                atol=self.atol, rtol=self.rtol, max_iter=self.max_iter, method=self.inverse_method,
                strict=self.strict, lipschitz=self._certified_lipschitz,
            )
        self.last_diagnostics = Diagnostics(inverse=info)
        return x, fast

    @_eager_in_parameter_dtype
    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""$x = $ ``inverse(y)`` and the log-det of the *explicit* map at $x$ (negate it for the
        inverse map's log-det).

        Args:
            y: Outputs of shape ``(..., *event)``.
            context: For a conditional $g(x, c)$: context of shape ``(..., context_dim)``.

        Returns:
            $x$ of shape ``(..., *event)`` and $\log\det(I + J_g(x))$ of the batch shape.
        """
        y_flat, context, batch_shape, shape = self._prepare(y, "y", context)
        solver = self._value_only_newton(y_flat, context)
        if solver is not None:
            with self._diagnostics_kept_on_error():
                x_flat, logdet, info = newton_inverse_and_logdet(
                    solver, y_flat, context, atol=self.atol, rtol=self.rtol, max_iter=self.max_iter, strict=self.strict,
                    lipschitz=self._certified_lipschitz,
                )
            self.last_diagnostics = Diagnostics("exact", None, info)
            return x_flat.reshape(shape), self._check_logdet(logdet).reshape(batch_shape)
        x_flat, fast = self._inverse_flat(y_flat, context)
        info = self.last_diagnostics.inverse
        _, logdet = self._logdet_flat(x_flat, context, fast)
        self.last_diagnostics.inverse = info
        return x_flat.reshape(shape), self._check_logdet(logdet).reshape(batch_shape)

    def _value_only_newton(self, y_flat: Tensor, context: Tensor | None) -> SolverNet | None:
        """The fused net for :func:`~pyro_iresnet.fused_inverse.newton_inverse_and_logdet` when it applies
        to this ``inverse_and_logdet`` call (``None`` otherwise): ``inverse_method="newton"``, no
        gradient needed and the exact log-det."""
        if (
            self.inverse_method != "newton"
            or torch.is_grad_enabled() and (
                y_flat.requires_grad or context is not None and context.requires_grad or bool(self._params())
            )
            or self._current_logdet_method(math.prod(y_flat.shape[1:])) != "exact"
        ):
            return None
        self.refresh_lipschitz()
        with torch.no_grad():
            fast = self._fused_net()
        return None if fast is None else solver_net(fast)

    def extra_repr(self) -> str:
        return (
            f"logdet={self.logdet_method!r}, eval_logdet={self.eval_logdet!r}, "
            f"neumann_grad={self.neumann_grad}, memory_efficient={self.memory_efficient}, "
            f"inverse_method={self.inverse_method!r}"
        )


@contextmanager
def _swapped_buffers(snapshot: list[tuple[nn.Module, str, Tensor]]) -> Iterator[None]:
    """Within the context each ``module._buffers[name]`` is the given tensor (the objects are swapped,
    the buffers themselves are not written)."""
    current = [(module, name, module._buffers[name]) for module, name, _ in snapshot]
    for module, name, tensor in snapshot:
        module._buffers[name] = tensor
    try:
        yield
    finally:
        for module, name, tensor in current:
            module._buffers[name] = tensor


def _check_residual_shape(net: nn.Module) -> None:
    """For a ``LipschitzMLP`` (or a ``ConcatContextNet`` over one), whose sizes are known: the
    output size must be the input size (less the context's), as $x + g(x)$ needs."""
    mlp, context_dim = (net.net, net.context_dim) if type(net) is ConcatContextNet else (net, 0)
    if type(mlp) is not LipschitzMLP:
        return
    first, last = mlp.layers[0], mlp.layers[-1]
    if not (hasattr(first, "in_features") and hasattr(last, "out_features")):  # layers edited by hand
        return
    d_in, d_out = first.in_features - context_dim, last.out_features
    if d_in != d_out:
        what = f"input size {d_in}" + (f" ({d_in + context_dim} less context_dim {context_dim})" if context_dim else "")
        raise ValueError(f"a residual block needs g(x) shaped like x, but the LipschitzMLP maps {what} to {d_out}")


def _accepts_second_argument(net: nn.Module) -> bool:
    """Whether ``net(x, context)`` fits ``net.forward``'s signature (True if it cannot be read, or
    if a forward pre-hook may turn the two inputs into one)."""
    if net._forward_pre_hooks:
        return True
    try:  # the callable that runs: a decorator's wrapper, not the function it wraps
        parameters = inspect.signature(net.forward, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def name_blocks(model: object, prefix: str = "") -> list[str]:
    """Name every :class:`ResidualBlock` inside ``model`` by its position, for error messages.

    A block's ``name`` appears in the errors it raises (non-finite inputs, a non-finite log-det).
    By default it is the block's creation index in this process; after ``name_blocks(model)`` it is
    ``"k of n (path)"``, with ``k`` the block's index among the model's residual blocks in module
    order and ``path`` its qualified module name.

    Args:
        model: An ``nn.Module`` (a flow, a ``normflows.NormalizingFlow``, a Pyro
            ``TransformModule``), a Pyro ``ComposeTransform`` or its ``.inv``, a
            ``TransformedDistribution``, or a sequence of them.
        prefix: Prepended to every path.

    Returns:
        The names given, in order.

    Raises:
        TypeError: If ``model`` is none of these.

    References:
        Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Examples:
        >>> from pyro_iresnet import iresnet, name_blocks
        >>> flow = torch.nn.ModuleList([iresnet(2) for _ in range(3)])
        >>> name_blocks(flow, prefix="flow")
        ['0 of 3 (flow.0.block)', '1 of 3 (flow.1.block)', '2 of 3 (flow.2.block)']
    """
    found: list[tuple[str, ResidualBlock]] = []

    def visit(obj: object, path: str) -> bool:
        """Collect the blocks of ``obj``; whether it is something that can hold blocks."""
        if isinstance(obj, nn.Module):
            found.extend(
                (".".join(filter(None, (path, sub))), m)
                for sub, m in obj.named_modules()
                if isinstance(m, ResidualBlock)
            )
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                item_path = ".".join(filter(None, (path, str(i))))
                if not visit(item, item_path):
                    raise TypeError(f"the item at {item_path}: {kinds}, got {type(item).__name__}")
        elif isinstance(getattr(obj, "block", None), ResidualBlock):  # a conditioned transform
            found.append((path, obj.block))
        elif hasattr(obj, "parts"):  # ComposeTransform
            visit(list(obj.parts), path)
        elif hasattr(obj, "transforms"):  # (Conditional)TransformedDistribution
            visit(list(obj.transforms), ".".join(filter(None, (path, "transforms"))))
        elif hasattr(obj, "_inv") and obj._inv is not None:  # a transform's .inv
            visit(obj._inv, path)
        elif callable(getattr(obj, "condition", None)) and hasattr(obj, "transform"):  # ConstantConditionalTransform
            visit(obj.transform, ".".join(filter(None, (path, "transform"))))
        else:  # a transform or distribution without blocks, or a Pyro ConditionalTransform
            return isinstance(obj, (torch.distributions.Transform, torch.distributions.Distribution)) or callable(
                getattr(obj, "condition", None)
            )
        return True

    kinds = "expected an nn.Module, a transform, a (conditional) transformed distribution or a list/tuple of them"
    if not visit(model, prefix):
        raise TypeError(f"model: {kinds}, got {type(model).__name__}")
    unique = list({id(block): (path, block) for path, block in found}.values())
    for k, (path, block) in enumerate(unique):
        block.name = f"{k} of {len(unique)} ({path})"
    return [block.name for _, block in unique]
