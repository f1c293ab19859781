r"""Two versions of pyro_iresnet side by side in one process: train step and ``sample(512)`` of the
normflows residual-flow model of ``normflows_compare.py`` (16 x [Residual(2-128-128-2, coeff 0.9),
ActNorm], batch 512, normflows' default estimator).

On a shared VM the same code's timings move by 10-60% between runs, more than most changes gain;
interleaving the two versions' calls in one process, in alternating order, and taking the median
of the per-pair ratios resolves differences of a few per cent. The other version is copied from a
checkout (e.g. ``git worktree add /tmp/old <commit>`` or ``git archive <commit> | tar -x -C
/tmp/old``) into a temporary folder and imported as ``pyro_iresnet_other``; its relative imports
keep it separate from the working tree's ``pyro_iresnet``.

    python benchmarks/ab_versions.py /tmp/old --steps 40 --samples 15
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import normflows as nf
import torch

# the working tree's pyro_iresnet, not an installed copy: before anything imports it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normflows_compare import two_moons  # noqa: E402

import pyro_iresnet  # noqa: E402


def build(package: object) -> nf.NormalizingFlow:
    """The benchmark model built from ``package`` (its ``LipschitzMLP`` and normflows ``Residual``)."""
    torch.manual_seed(0)
    residual = importlib.import_module(package.__name__ + ".normflows").Residual
    flows = []
    for _ in range(16):
        net = package.LipschitzMLP([2, 128, 128, 2], coeff=0.9)
        with torch.no_grad():
            net.layers[-1].weight.div_(1000)  # as normflows' init_zeros
        flows += [residual(net, reduce_memory=True), nf.flows.ActNorm(2)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)


def compare(calls: dict[str, Callable[[], None]], n: int) -> str:
    """Run the calls interleaved ``n`` times, alternating their order; report medians and the
    median per-pair ratio other / this."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(n):
        for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["other"], times["this"])]
    medians = ", ".join(f"{k} {1e3 * statistics.median(v):.1f} ms" for k, v in times.items())
    return f"{medians}; other / this per pair: median {statistics.median(ratios):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="checkout of the other version (holding pyro_iresnet/)")
    parser.add_argument("--steps", type=int, default=40, help="interleaved train steps per version")
    parser.add_argument("--samples", type=int, default=15, help="interleaved sample(512) calls per version")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:  # kept while the other version may import lazily
        shutil.copytree(args.other / "pyro_iresnet", Path(folder) / "pyro_iresnet_other")
        sys.path.insert(0, folder)
        run({"this": build(pyro_iresnet), "other": build(importlib.import_module("pyro_iresnet_other"))}, args)


def run(models: dict[str, nf.NormalizingFlow], args: argparse.Namespace) -> None:
    """Print the interleaved train-step and sampling comparisons of the two models."""
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-5) for k, m in models.items()}
    data = torch.Generator().manual_seed(7)
    batch = two_moons(512, data)  # one batch for every timed step, the same for both versions

    def step(name: str) -> None:
        model, optimizer = models[name], optimizers[name]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model.forward_kld(batch).backward()
        optimizer.step()

    for _ in range(5):  # warm-up, and ActNorm's data-dependent initialisation
        for name in models:
            step(name)
    print(f"torch {torch.__version__}, threads {args.threads}")
    print("train step: " + compare({k: (lambda k=k: step(k)) for k in models}, args.steps))

    def sample(name: str) -> None:
        with torch.no_grad():
            models[name].eval().sample(512)

    for name in models:  # the eval() settle of the power iteration, outside the timing
        sample(name)
    print("sample(512): " + compare({k: (lambda k=k: sample(k)) for k in models}, args.samples))

if __name__ == "__main__":
    main()
