r"""Where ``model.sample(512)`` spends its time, ours vs ``normflows.flows.Residual`` (issue 4).

The models of ``normflows_compare.py`` (16 x [Residual(2-128-128-2, coeff 0.9), ActNorm]), fresh
(after 22 training steps, as the fresh state there) and, with ``--load``, at a trained state saved by
``normflows_compare.py --save``. Each residual block's two parts are timed separately, in eval mode
under ``no_grad``:

- the inverse solve: ours ``ResidualBlock._inverse_flat`` (to a 1e-6 residual, or ``--atol``),
  theirs ``iResBlock._inverse_fixed_point`` (its squared-step stop, a residual of about 3e-3);
- the exact log-det at the solution: ours ``ResidualBlock._logdet_flat`` (the Jacobian of the fused
  MLP), theirs ``iResBlock._logdetgrad`` (autograd's Jacobian, as normflows does in eval mode);

and "rest" is everything else in ``sample`` (base samples, ActNorm, checks). Median of ``--reps``
calls per state, interleaved. Also printed, per side: the largest residual
$\|x + g(x) - y\|_\infty$ any block's solve left in the last call (computed after the timing).

    python benchmarks/sampling_breakdown.py --load /tmp/bench6/state.pt
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import normflows as nf
import torch
from normflows_compare import Trainer, build, set_inverse_method, two_moons

from pyro_iresnet import ResidualBlock

PARTS = ("solve", "log-det", "rest", "total")


def timed_parts(model: nf.NormalizingFlow, which: str, solves: list) -> dict[str, float]:
    """Wrap each block's solve and log-det (instance attributes) to add their wall-clock seconds to
    the returned dict, which is reset by the caller before each ``sample``; each solve also appends
    ``(g, y, x)`` to ``solves``."""
    spent = {"solve": 0.0, "log-det": 0.0}

    def wrap(obj: object, name: str, part: str, g: Callable | None = None) -> None:
        method: Callable = getattr(obj, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start

        def timed_solve(y: torch.Tensor, *args: object) -> object:
            out = timed(y, *args)
            solves.append((g, y, out[0] if isinstance(out, tuple) else out))
            return out

        setattr(obj, name, timed if g is None else timed_solve)

    for m in model.modules():
        if which == "ours" and isinstance(m, ResidualBlock):
            wrap(m, "_inverse_flat", "solve", m.g)
            wrap(m, "_logdet_flat", "log-det")
        elif which == "theirs" and isinstance(m, nf.flows.residual.iResBlock):
            wrap(m, "_inverse_fixed_point", "solve", m.nnet)
            wrap(m, "_logdetgrad", "log-det")
    return spent


def worst_residual(solves: list) -> float:
    r"""The largest $\|x + g(x) - y\|_\infty$ over the samples and blocks of ``solves``."""
    with torch.no_grad():
        return max(float((x + g(x) - y).abs().max()) for g, y, x in solves)


def breakdown(
    models: dict[str, nf.NormalizingFlow], spent: dict[str, dict[str, float]], solves: dict[str, list], reps: int
) -> dict[str, dict[str, float]]:
    """Median seconds per part, and the worst residual of the last call; ``spent`` and ``solves``
    from :func:`timed_parts` of each model."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for _ in range(reps):
        for k, model in models.items():
            model.eval()
            for part in spent[k]:
                spent[k][part] = 0.0
            solves[k].clear()
            with torch.no_grad():
                start = time.perf_counter()
                model.sample(512)
                total = time.perf_counter() - start
            runs[k].append({**spent[k], "rest": total - sum(spent[k].values()), "total": total})
    times = {k: {p: statistics.median(r[p] for r in v) for p in PARTS} for k, v in runs.items()}
    for k in models:
        times[k]["residual"] = worst_residual(solves[k])
    return times


def report(label: str, times: dict[str, dict[str, float]]) -> None:
    print(f"\n{label}: median ms per sample(512)\n\n| part | ours | normflows | normflows / ours |\n|---|---|---|---|")
    for part in PARTS:
        o, t = times["ours"][part], times["theirs"][part]
        print(f"| {part} | {o * 1e3:.1f} | {t * 1e3:.1f} | {t / o:.2f}x |")
    print(f"| worst residual of a solve | {times['ours']['residual']:.1e} | {times['theirs']['residual']:.1e} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default=None, help="a --save file of normflows_compare.py (trained state)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--atol", type=float, default=None, help="ours: absolute residual tolerance (rtol=0)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}")
    models = {}
    for which in ("ours", "theirs"):
        torch.manual_seed(0)
        models[which] = build(which, 16, 128)
    trainers = {k: Trainer(k, m, 1e-3) for k, m in models.items()}
    data = torch.Generator().manual_seed(7)
    for _ in range(22):  # the fresh state of normflows_compare.py: warm-up and timed steps
        x = two_moons(512, data)
        for trainer in trainers.values():
            trainer.step(x)
    set_inverse_method(models["ours"], "fixed_point", args.atol)
    solves: dict[str, list] = {k: [] for k in models}
    spent = {k: timed_parts(m, k, solves[k]) for k, m in models.items()}
    report("fresh (22 training steps)", breakdown(models, spent, solves, args.reps))
    if args.load:
        state = torch.load(args.load)
        for k, m in models.items():
            m.load_state_dict(state[k])
        report(f"trained ({args.load})", breakdown(models, spent, solves, args.reps))


if __name__ == "__main__":
    main()
