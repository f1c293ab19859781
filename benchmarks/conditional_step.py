r"""Conditional flows: the fused path of ``conditional_iresnet`` against the generic autograd path.

A conditional density estimator $p(x \mid c)$ on two moons ($x \in \mathbb{R}^2$, the context $c$
the one-hot moon label): ``--blocks`` blocks ``conditional_iresnet(2, 2, hidden_dims=[h, h])``
(default 8 × 2-128-128-2 with the context on the first layer), base $N(0, I)$, density direction
``[t.inv for t in reversed(blocks)]`` (``docs/pyro.md``), Adam, batch 512, the default unbiased
estimator. The same model runs with ``fused="auto"`` (the fused path) and ``fused=False`` (the
generic path, how every conditional block ran before), from identical weights, interleaved in one
process:

* the median time of a training step (``-log_prob(x | c).mean()``, backward, Adam);
* the median time of ``sample((512,))`` at a context (eval mode: fixed-point solves to 1e-6 and
  no log-det) and of ``log_prob`` at a batch of contexts in eval mode (exact log-det);
* the peak memory held by torch tensors during a step;
* the largest difference of the two paths' exact log-densities from the identical initial weights.

As an anchor, Pyro's ``conditional_spline`` (same number of blocks, ``count_bins=8``) is timed
beside them. Its step time is context only: it is a different model, and is not a target.

    python benchmarks/conditional_step.py --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from memory import peak_allocated_mib
from normflows_compare import labelled_two_moons

from pyro_iresnet import conditional_iresnet


def build(kind: str, blocks: int, hidden: int) -> tuple[torch.nn.ModuleList, dist.ConditionalTransformedDistribution]:
    """The conditional flow of ``kind``: ``"fused"``, ``"generic"`` (ours) or ``"spline"`` (Pyro's)."""
    torch.manual_seed(0)  # identical weights for both of ours
    if kind == "spline":
        transforms = [T.conditional_spline(2, context_dim=2, count_bins=8) for _ in range(blocks)]
        modules = torch.nn.ModuleList(transforms)
        base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        return modules, dist.ConditionalTransformedDistribution(base, transforms)
    fused = "auto" if kind == "fused" else False
    transforms = [conditional_iresnet(2, 2, hidden_dims=[hidden, hidden], fused=fused) for _ in range(blocks)]
    modules = torch.nn.ModuleList(transforms)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    inverses = [t.inv for t in reversed(transforms)]  # density direction: log_prob runs the explicit maps
    return modules, dist.ConditionalTransformedDistribution(base, inverses)


def labelled_moons(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-moons points and the one-hot label of their moon (the context)."""
    x, upper = labelled_two_moons(n, generator)
    return x, torch.nn.functional.one_hot(upper.long(), 2).to(x.dtype)


def median_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall-clock ms of each function, interleaved (one call of each per round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--reps", type=int, default=7, help="timed sample/log_prob calls per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    x, context = labelled_moons(args.batch, generator)
    kinds = ("fused", "generic", "spline")
    models = {kind: build(kind, args.blocks, args.hidden) for kind in kinds}
    optimizers = {kind: torch.optim.Adam(m.parameters(), lr=1e-3) for kind, (m, _) in models.items()}
    with torch.no_grad():  # identical weights: the exact log-densities must agree
        for modules, _ in models.values():
            modules.eval()
        gap = float((models["fused"][1].condition(context).log_prob(x)
                     - models["generic"][1].condition(context).log_prob(x)).abs().max())

    def step(kind: str) -> Callable[[], None]:
        modules, flow = models[kind]

        def run() -> None:
            modules.train()
            optimizers[kind].zero_grad(set_to_none=True)
            loss = -flow.condition(context).log_prob(x).mean()
            loss.backward()
            optimizers[kind].step()

        return run

    for kind in kinds:  # warm-up (and the first steps' one-off work)
        for _ in range(3):
            step(kind)()
    train = median_ms({kind: step(kind) for kind in kinds}, args.steps)
    memory = {kind: peak_allocated_mib(step(kind)) for kind in kinds}
    for modules, _ in models.values():
        modules.eval()
    one_context = torch.tensor([1.0, 0.0])

    def sample(kind: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                models[kind][1].condition(one_context).sample((args.batch,))
        return run

    def log_prob(kind: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                models[kind][1].condition(context).log_prob(x)
        return run

    sampling = median_ms({kind: sample(kind) for kind in kinds}, args.reps)
    density = median_ms({kind: log_prob(kind) for kind in kinds}, args.reps)
    print(f"torch {torch.__version__}, threads 1, {args.blocks} blocks 2-{args.hidden}-{args.hidden}-2 "
          f"(context 2), batch {args.batch}\n")
    print("| | fused | generic | generic / fused | Pyro conditional_spline (anchor) |")
    print("|---|---|---|---|---|")
    rows = [("train step (ms)", train), (f"sample({args.batch}) (ms)", sampling),
            ("log_prob, eval (ms)", density), ("peak memory of a step (MiB)", memory)]
    for label, values in rows:
        print(f"| {label} | {values['fused']:.1f} | {values['generic']:.1f} | "
              f"{values['generic'] / values['fused']:.2f}x | {values['spline']:.1f} |")
    print(f"\nlargest |log_prob difference| fused vs generic from identical weights (eval, exact): {gap:.1e}")


if __name__ == "__main__":
    main()
