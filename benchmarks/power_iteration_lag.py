"""How far the certified Lipschitz bound of the operator used in training exceeds 1, by
``n_power_iterations``.

Trains the soak model (4 x ``iresnet(2)``, defaults otherwise: coeff 0.97, unbiased log-det) on two
moons with Adam and, every 10 steps after a warm-up, certifies the operator the training forward
just applied (after its power-iteration refresh): ``max`` over blocks of ``lipschitz_bound``.
Prints, per ``n_power_iterations``, the share of checks with a bound >= 1, the largest bound and
the training time.

    python benchmarks/power_iteration_lag.py --num-steps 2000 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch

from pyro_iresnet import LipschitzWarning, iresnet, lipschitz_bound

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from two_moons import two_moons  # noqa: E402  (the main demo's data)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500, help="steps before the first check")
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4], help="n_power_iterations values")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def run(n_power_iterations: int, args: argparse.Namespace) -> tuple[torch.Tensor, float, float]:
    """The bounds at the checks, the training seconds and the last loss."""
    torch.manual_seed(0)
    blocks = [iresnet(2, n_power_iterations=n_power_iterations) for _ in range(4)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, [T.ComposeTransform(blocks).inv])
    optimizer = torch.optim.Adam(torch.nn.ModuleList(blocks).parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(1)
    bounds, checking = [], 0.0
    start = time.perf_counter()
    for step in range(args.num_steps):
        optimizer.zero_grad()
        loss = -flow.log_prob(two_moons(args.batch_size, generator=data)).mean()
        loss.backward()
        if step >= args.warmup and step % 10 == 0:
            tic = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LipschitzWarning)
                bounds.append(max(lipschitz_bound(block) for block in blocks))
            checking += time.perf_counter() - tic
        optimizer.step()
    return torch.tensor(bounds), time.perf_counter() - start - checking, loss.item()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.num_steps} steps, checks every 10 steps after {args.warmup}, torch {torch.__version__}")
    print("| n_power_iterations | checks with bound >= 1 | largest bound | training s | last loss |")
    print("|---|---|---|---|---|")
    for n in args.iterations:
        bounds, seconds, loss = run(n, args)
        share = float((bounds >= 1).float().mean())
        print(f"| {n} | {share:.0%} | {float(bounds.max()):.3f} | {seconds:.1f} | {loss:.3f} |", flush=True)


if __name__ == "__main__":
    main()
