"""Training step of the normflows benchmark model, eager against ``torch.compile``.

The model of ``normflows_compare.py`` (16 x [Residual(2-128-128-2, coeff 0.9), ActNorm], batch
512, Adam). Each block call is a graph break (it runs eagerly), so compiling can only speed up
what lies between the blocks; this prints the median step time of each, interleaved, after a
warm-up that includes the compilation.

    python benchmarks/compile_step.py --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from normflows_compare import build, two_moons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("ours", 16, 128)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = {"eager": model.forward_kld, "compiled": torch.compile(model.forward_kld, backend=args.backend)}
    data = torch.Generator().manual_seed(1)

    def step(loss_fn) -> float:
        x = two_moons(512, data)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        optimizer.step()
        return time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(3):
        for loss_fn in losses.values():
            step(loss_fn)
    print(f"torch {torch.__version__}, backend {args.backend}; warm-up with compilation: "
          f"{time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(args.steps):
        for name, loss_fn in losses.items():
            times[name].append(step(loss_fn))
    for name, values in times.items():
        print(f"{name:8s} median {statistics.median(values) * 1e3:6.1f} ms per training step")


if __name__ == "__main__":
    main()
