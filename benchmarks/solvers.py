"""The inverse solvers (``inverse_method=``) on one hard block: iterations and time.

One block g = 2-128-128-2 at ``coeff=0.97`` (float32) whose Jacobian is close to its certified bound
(``tests.conftest.make_active_mlp``: aligned, normalised weights and biases at the activations'
steepest slope), 512 targets ``y = 3 z``. For each of ``fixed_point``, ``anderson`` and ``newton``:
the iterations of ``inverse(y)``, the worst residual, and the median wall-clock of ``inverse(y)``
and of ``inverse_and_logdet(y)`` (eval mode, ``no_grad``, exact log-det: what sampling does), the
methods interleaved. The 16-block two-moons model of issue 4 is in ``normflows_compare.py``.

Usage::

    python benchmarks/solvers.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest
from pyro_iresnet import ResidualBlock  # noqa: E402
from tests.conftest import make_active_mlp  # noqa: E402

METHODS = ("fixed_point", "anderson", "newton")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = make_active_mlp([2, 128, 128, 2], coeff=0.97, dtype=torch.float32)
    y = 3 * torch.randn(512, 2)
    blocks = {m: ResidualBlock(net, inverse_method=m).eval() for m in METHODS}
    times: dict[str, dict[str, list[float]]] = {m: {"inverse": [], "inverse_and_logdet": []} for m in METHODS}
    with torch.no_grad():
        for _ in range(args.reps):
            for method, block in blocks.items():
                for part, call in (("inverse", block.inverse), ("inverse_and_logdet", block.inverse_and_logdet)):
                    start = time.perf_counter()
                    call(y)
                    times[method][part].append(time.perf_counter() - start)
        print(f"torch {torch.__version__}, threads {args.threads}\n")
        print("| method | iterations | worst residual | inverse (ms) | inverse_and_logdet (ms) |")
        print("|---|---|---|---|---|")
        for method, block in blocks.items():
            x = block.inverse(y)
            info = block.last_diagnostics.inverse
            residual = float((x + net(x) - y).abs().max())
            cells = " | ".join(f"{statistics.median(times[method][p]) * 1e3:.1f}" for p in times[method])
            print(f"| {method} | {info.iterations} | {residual:.1e} | {cells} |")


if __name__ == "__main__":
    main()
