"""Where the time goes in ours on the normflows architecture of ``normflows_compare.py``.

Profiles one model of ``normflows_compare.build("ours", ...)`` (fresh, or a trained state saved by
``normflows_compare.py --save``): ``torch.profiler`` over ``model.sample(512)`` in eval mode, and
``cProfile`` over training steps (forward_kld + backward + Adam). Prints the top entries of each,
per call of ``sample`` and per training step.

    python benchmarks/profile_normflows.py --load /tmp/bench5/state.pt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from normflows_compare import Trainer, build, two_moons
from torch.profiler import ProfilerActivity, profile

from pyro_iresnet import SpectralNormLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default=None, help="a --save file of normflows_compare.py (default: fresh)")
    parser.add_argument("--steps", type=int, default=20, help="profiled training steps")
    parser.add_argument("--samples", type=int, default=3, help="profiled sample(512) calls")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("ours", 16, 128)
    if args.load:
        model.load_state_dict(torch.load(args.load)["ours"])
    trainer = Trainer("ours", model, 1e-3)
    data = torch.Generator().manual_seed(1)
    for _ in range(3):  # warm-up (ActNorm initialisation, optimiser state, scratch buffers)
        trainer.step(two_moons(512, data))

    model.eval()
    with torch.no_grad():
        model.sample(512)  # settles the power iteration once
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.samples):
                model.sample(512)
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.samples
    print(f"sample(512): {total_ms:.1f} ms of profiled CPU time per call; top entries (ms per call):")
    for event in sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[: args.rows]:
        print(f"  {event.key:40s} total {event.cpu_time_total / 1e3 / args.samples:7.2f}  "
              f"self {event.self_cpu_time_total / 1e3 / args.samples:7.2f}  calls {event.count // args.samples}")

    layers = [m for m in model.modules() if isinstance(m, SpectralNormLinear)]
    start = time.perf_counter()
    for _ in range(100):
        for layer in layers:
            layer._power_step()
    per_refresh = (time.perf_counter() - start) / 100
    print(f"\none power-iteration step on each of the {len(layers)} spectrally normalised layers: "
          f"{per_refresh * 1e3:.2f} ms (the cost of each extra n_power_iterations per training step)")

    batches = [two_moons(512, data) for _ in range(args.steps)]
    profiler = cProfile.Profile()
    profiler.enable()
    for x in batches:
        trainer.step(x)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    print(f"\ntraining step: {stats.total_tt / args.steps * 1e3:.1f} ms per step under cProfile; "
          f"top entries by own time (ms per step):")
    entries = sorted(stats.stats.items(), key=lambda item: -item[1][2])[: args.rows]
    for (filename, line, name), (_, calls, tottime, cumtime, _) in entries:
        where = name if filename == "~" else f"{filename.split('/')[-1]}:{line}({name})"
        print(f"  {where:60s} own {tottime / args.steps * 1e3:6.2f}  cum {cumtime / args.steps * 1e3:6.2f}  "
              f"calls {calls // args.steps}")


if __name__ == "__main__":
    main()
