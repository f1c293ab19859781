"""Soak test: a long two-moons training run that watches memory, convergence and the certificate.

    python benchmarks/soak.py --num-steps 5000 --threads 1

The model is the README's: ``--num-blocks`` (4) blocks ``iresnet(2)`` with every option at its
default (hidden 64-64, coeff 0.97, unbiased Russian-roulette log-det, fixed-point inverse) in
density orientation, Adam at a constant learning rate. Every ``--sample-every`` steps the inverse
runs twice: ``flow.sample`` in ``eval()`` mode without gradients, and ``flow.rsample`` in training
mode with a backward pass through the implicit gradient. Every ``--measure-every`` steps, after
``gc.collect()``, it records the process's resident memory (``VmRSS`` from ``/proc/self/status``),
its peak (``ru_maxrss``), the number of objects tracked by ``gc`` and of live tensors among them.
Every warning is recorded (``simplefilter("always")``), and before each sampling round the largest
certified ``lipschitz_bound`` over the blocks is recorded too (reported, not a failure criterion).

At the end it prints the table, the growth after ``--warmup`` steps, the number of
``ConvergenceWarning``\\s, the largest certified ``lipschitz_bound`` over the blocks and the
held-out NLL (exact log-det), and exits with status 1 if RSS grew by more than
``--max-rss-growth-mib`` or the live tensors by more than ``--max-tensor-growth`` after the
warm-up, if any ``ConvergenceWarning`` appeared, or if the bound is not below 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch

from pyro_iresnet import ConvergenceWarning, LipschitzWarning, iresnet, lipschitz_bound

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from two_moons import two_moons  # noqa: E402  (the main demo's data)


def rss_mib() -> float:
    """Current resident set size (``VmRSS``) of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def measure() -> dict[str, float]:
    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for obj in objects if issubclass(type(obj), torch.Tensor))  # type(): no __class__ lookups
    return {"rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib(), "gc_objects": len(objects), "tensors": tensors}


def max_bound(blocks: list[torch.nn.Module]) -> float:
    """The largest certified ``lipschitz_bound`` over the blocks (its own warning silenced: the
    caller records the value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LipschitzWarning)
        return max(lipschitz_bound(block) for block in blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-steps", type=int, default=5000)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure-every", type=int, default=500)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000, help="steps before the growth baseline")
    parser.add_argument("--max-rss-growth-mib", type=float, default=25.0)
    parser.add_argument("--max-tensor-growth", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, test = two_moons(20_000, generator=generator), two_moons(2_000, generator=generator)
    blocks = [iresnet(2) for _ in range(args.num_blocks)]  # every option at its default
    modules = torch.nn.ModuleList(blocks)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, [T.ComposeTransform(blocks).inv])
    optimizer = torch.optim.Adam(modules.parameters(), lr=args.lr)

    rows: list[dict[str, float]] = []
    interval_losses: list[float] = []
    interval_bounds: list[float] = []
    checked_bounds: list[tuple[int, float]] = []  # (step, max bound) every --sample-every steps
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows.append({"step": 0, "seconds": 0.0, "loss": math.nan, "bound": max_bound(blocks), "warnings": 0,
                     **measure()})
        modules.train()
        for step in range(1, args.num_steps + 1):
            batch = train[torch.randint(len(train), (args.batch_size,))]
            loss = -flow.log_prob(batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            interval_losses.append(float(loss.detach()))
            if step % args.sample_every == 0:
                checked_bounds.append((step, max_bound(blocks)))
                interval_bounds.append(checked_bounds[-1][1])
                modules.eval()
                with torch.no_grad():
                    flow.sample((args.num_samples,))
                modules.train()
                flow.rsample((args.batch_size,)).pow(2).mean().backward()  # implicit gradient of the inverse
                optimizer.zero_grad()
            if step % args.measure_every == 0 or step == args.num_steps:
                mean_loss = sum(interval_losses) / len(interval_losses)
                bound = max([*interval_bounds, max_bound(blocks)])
                interval_losses.clear()
                interval_bounds.clear()
                n_conv = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
                row = {"step": step, "seconds": time.perf_counter() - start, "loss": mean_loss, "bound": bound,
                       "warnings": n_conv}
                rows.append({**row, **measure()})
        modules.eval()
        with torch.no_grad():
            nll = float(-flow.log_prob(test).mean())
        bounds = [lipschitz_bound(block) for block in blocks]

    convergence = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    others = sorted({f"{w.category.__name__}: {w.message}" for w in caught if w not in convergence})
    over = [(step, bound) for step, bound in checked_bounds if not bound < 1]
    baseline = next((r for r in rows if r["step"] >= args.warmup), rows[-1])
    after = [r for r in rows if r["step"] >= baseline["step"]]
    rss_growth = max(r["rss_mib"] for r in after) - baseline["rss_mib"]
    tensor_growth = max(r["tensors"] for r in after) - baseline["tensors"]
    object_growth = max(r["gc_objects"] for r in after) - baseline["gc_objects"]

    print(f"soak: {args.num_steps} steps, {args.num_blocks} x iresnet(2) (defaults), batch {args.batch_size}, "
          f"lr {args.lr}, sampling every {args.sample_every} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'step':>6} {'time s':>8} {'loss':>8} {'max Lip':>8} {'RSS MiB':>8} {'peak MiB':>9} {'gc objects':>11} "
          f"{'tensors':>8} {'conv. warnings':>15}")
    for r in rows:
        print(f"{r['step']:>6} {r['seconds']:>8.1f} {r['loss']:>8.4f} {r['bound']:>8.4f} {r['rss_mib']:>8.1f} "
              f"{r['peak_rss_mib']:>9.1f} {r['gc_objects']:>11} {r['tensors']:>8} {r['warnings']:>15}")
    print("(loss: mean training loss since the previous row; max Lip: largest lipschitz_bound over the blocks at "
          f"the checks every {args.sample_every} steps since the previous row and at the row)")
    print(f"growth after warm-up (step {baseline['step']} -> max over steps {baseline['step']}..{rows[-1]['step']}): "
          f"RSS {rss_growth:+.1f} MiB (limit {args.max_rss_growth_mib:g}), tensors {tensor_growth:+d} "
          f"(limit {args.max_tensor_growth}), gc objects {object_growth:+d}")
    print(f"ConvergenceWarnings: {len(convergence)}" + (f" (first: {convergence[0].message})" if convergence else ""))
    if others:
        print("other warnings: " + "; ".join(others))
    print(f"lipschitz_bound per block: {', '.join(f'{b:.4f}' for b in bounds)} (max {max(bounds):.4f})")
    print(f"during training: {len(over)} of {len(checked_bounds)} checks (every {args.sample_every} steps) had a "
          f"bound >= 1" + (f", largest {max(b for _, b in over):.4f} at step {max(over, key=lambda o: o[1])[0]}"
                           if over else "") + " (reported, not a failure: the certificate is for the trained model)")
    print(f"held-out NLL (exact log-det): {nll:.4f} nats")

    failures = []
    if rss_growth > args.max_rss_growth_mib:
        failures.append(f"RSS grew by {rss_growth:.1f} MiB > {args.max_rss_growth_mib:g} MiB after warm-up")
    if tensor_growth > args.max_tensor_growth:
        failures.append(f"live tensors grew by {tensor_growth} > {args.max_tensor_growth} after warm-up")
    if convergence:
        failures.append(f"{len(convergence)} ConvergenceWarning(s)")
    if not max(bounds) < 1:
        failures.append(f"lipschitz_bound {max(bounds):.4f} >= 1")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "rows": rows, "checked_bounds": checked_bounds, "rss_growth_mib": rss_growth,
            "tensor_growth": tensor_growth,
            "object_growth": object_growth, "convergence_warnings": [str(w.message) for w in convergence],
            "other_warnings": others, "lipschitz_bounds": bounds, "heldout_nll": nll, "failures": failures,
        }, indent=2))
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
