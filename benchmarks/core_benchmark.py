"""Core benchmarks of :class:`pyro_iresnet.ResidualBlock` (issue 2).

(a) A stack of 8 blocks g = 2-128-128-2 (coeff 0.9), batch 512, normflows' default estimator
    (unbiased, geometric p=0.5, 2 exact terms, 1 Gaussian probe, Neumann gradient + gradients in the
    forward pass): one training step (NLL under a standard normal base, backward, Adam step; for
    normflows also ``update_lipschitz(model, 5)``) and the inverse of 512 points (ours to a 1e-6
    residual, theirs at its default), ours vs ``normflows.flows.Residual`` side by side in one
    process; median wall-clock and CPU time over repetitions, and the ratios.
(b) Scaling of one block g = d-128-128-d, batch 512, ``logdet="series"``: step time and peak memory
    vs d (5 terms) and vs the number of terms (d = 64), for the gradient modes plain / neumann_grad /
    neumann_grad + memory_efficient, each on the fused and on the generic path.

Peak memory: the peak of the bytes held by torch tensors allocated during one training step
(after a warm-up step), from ``torch.profiler`` with ``profile_memory=True`` (the running sum of
the recorded allocations and frees); tracemalloc does not see torch's allocations and RSS deltas
are dominated by allocator and library caches at these sizes.

Usage::

    python benchmarks/core_benchmark.py            # both parts
    python benchmarks/core_benchmark.py --quick    # fewer repetitions and configurations
"""

from __future__ import annotations

import argparse
import statistics
import time

import normflows as nf
import torch
from memory import peak_allocated_mib

from pyro_iresnet import LipschitzMLP, ResidualBlock
from pyro_iresnet.lipschitz import refresh_spectral_norm

MODES = {
    "plain": {"neumann_grad": False, "memory_efficient": False},
    "neumann": {"neumann_grad": True, "memory_efficient": False},
    "neumann+mem_eff": {"neumann_grad": True, "memory_efficient": True},
}


def _timed(fn, reps: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time of ``reps`` calls (CPU time is robust to other
    processes competing for the cores; everything here is single-threaded)."""
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _ours_stack(n_blocks: int, dims: list[int], **options) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(
        ResidualBlock(LipschitzMLP(dims, coeff=0.9), **options) for _ in range(n_blocks)
    )


def _ours_step(blocks: torch.nn.ModuleList, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    total = x.new_zeros(x.shape[0])
    for block in blocks:
        x, logdet = block.forward_and_logdet(x)
        total = total + logdet
    loss = (0.5 * x.pow(2).sum(1) - total).mean()
    loss.backward()
    opt.step()
    refresh_spectral_norm(blocks)  # timed in the step, as normflows' update_lipschitz (not in the next call)


def _ours_sample(blocks: torch.nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for block in reversed(blocks):
            z = block.inverse(z)
    return z


def _theirs_stack(n_blocks: int, dims: list[int]) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(
        nf.flows.Residual(
            nf.nets.LipschitzMLP(dims, lipschitz_const=0.9, init_zeros=False), reduce_memory=True
        )
        for _ in range(n_blocks)
    )


def _theirs_step(flows: torch.nn.ModuleList, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    total = x.new_zeros(x.shape[0])
    for flow in flows:
        x, logdet = flow.inverse(x)  # reverse=True: the explicit map is `inverse`
        total = total + logdet
    loss = (0.5 * x.pow(2).sum(1) - total).mean()
    loss.backward()
    opt.step()
    nf.utils.update_lipschitz(flows, 5)


def _theirs_sample(flows: torch.nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for flow in reversed(flows):
            z = flow.iresblock.inverse(z)
    return z


def part_a(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    dims = [2, 128, 128, 2]
    ours = _ours_stack(8, dims, logdet="unbiased", neumann_grad=True, memory_efficient=True)
    theirs = _theirs_stack(8, dims)
    opt_o = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    x, z = torch.randn(512, 2) * 1.5, torch.randn(512, 2)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in ("so", "st", "io", "it")}
    for rep in range(args.reps + 2):  # interleaved; the first two are warm-up
        times = {
            "so": _timed(lambda: _ours_step(ours, opt_o, x), 1),
            "st": _timed(lambda: _theirs_step(theirs, opt_t, x), 1),
            "io": _timed(lambda: _ours_sample(ours, z), 1),
            "it": _timed(lambda: _theirs_sample(theirs, z), 1),
        }
        if rep >= 2:
            for k, t in times.items():
                results[k].append(t)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in results.items()
    }
    print(
        "\n(a) 8 blocks 2-128-128-2, batch 512, normflows' default estimator "
        f"({args.reps} interleaved repetitions; ms as median wall-clock / median CPU time)\n"
    )
    print("| | ours | normflows | speed-up (wall / CPU) |")
    print("|---|---|---|---|")
    for name, o, t in (("train step", "so", "st"), ("inverse of 512 points (ours: fixed point)", "io", "it")):
        (ow, oc), (tw, tc) = med[o], med[t]
        print(
            f"| {name} | {ow * 1e3:.1f} / {oc * 1e3:.1f} | {tw * 1e3:.1f} / {tc * 1e3:.1f} | "
            f"{tw / ow:.2f}x / {tc / oc:.2f}x |"
        )
    iters = [b.last_diagnostics.inverse.iterations for b in ours]
    print(f"\nours inverse iterations per block: {iters}")


def scaling_config(config: dict) -> dict:
    """One scaling configuration: median CPU time of a training step and its peak allocation."""
    torch.manual_seed(0)
    d = config["d"]
    block = ResidualBlock(
        LipschitzMLP([d, 128, 128, d], coeff=0.9),
        logdet="series",
        n_terms=config["terms"],
        fused=config["fused"],
        **MODES[config["mode"]],
    )
    opt = torch.optim.Adam(block.parameters(), lr=1e-3)
    blocks = torch.nn.ModuleList([block])
    x = torch.randn(config["batch"], d)
    _ours_step(blocks, opt, x)  # warm-up (lazy initialisation, optimiser state)
    peak = peak_allocated_mib(lambda: _ours_step(blocks, opt, x))
    _, cpu = _timed(lambda: _ours_step(blocks, opt, x), config["reps"])
    return {"step_ms": cpu * 1e3, "peak_mib": peak}


def part_b(args: argparse.Namespace) -> None:
    dims = [2, 16, 64, 256] if args.quick else [2, 16, 64, 256, 1024]
    terms = [2, 5, 10, 20]
    base = {"batch": 512, "reps": max(args.reps // 2, 2)}
    for sweep, values, fixed in (("d", dims, {"terms": 5}), ("terms", terms, {"d": 64})):
        print(
            f"\n(b) one block {'d' if sweep == 'd' else '64'}-128-128-{'d' if sweep == 'd' else '64'}, "
            f"batch 512, series, {'5 terms' if sweep == 'd' else 'vs terms'}: step CPU ms / peak MiB\n"
        )
        header = " | ".join(f"{m} {'fused' if f else 'generic'}" for m in MODES for f in (True, False))
        print(f"| {sweep} | {header} |")
        print("|---" * (1 + 2 * len(MODES)) + "|")
        for value in values:
            cells = []
            for mode in MODES:
                for fused in (True, False):
                    r = scaling_config({**base, **fixed, sweep: value, "mode": mode, "fused": fused})
                    cells.append(f"{r['step_ms']:.1f} / {r['peak_mib']:.1f}")
            print(f"| {value} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repetitions, d up to 256")
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    args = parser.parse_args()
    if args.quick:
        args.reps = 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}")
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)


if __name__ == "__main__":
    main()
