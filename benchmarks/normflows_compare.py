"""Ours vs ``normflows.flows.Residual`` on the normflows residual-flow architecture (issue 4).

16 x [Residual(2-128-128-2, coeff 0.9), ActNorm], batch 512, two moons, normflows' default
estimator settings (unbiased geometric roulette p=0.5, 2 exact terms, 1 Gaussian probe,
reduce_memory=True, i.e. Neumann gradient + gradients in the forward pass). normflows runs
``nf.utils.update_lipschitz(model, 5)`` after each optimiser step, as it requires; ours refreshes
its spectral norms itself. Both last layers start near zero (normflows' ``init_zeros``: weight/1000).

Measured side by side in one process (``torch.set_num_threads``): median train-step time
(forward_kld + backward + Adam step [+ update_lipschitz]), time to sample 512 points in eval mode
(ours: inverse to its default tolerance, a residual of at most 1e-6 (1 + |y|); theirs: its default
squared-step stop, a step below about 3e-3 (1 + |y|)^(1/2); for comparison also ours stopped at
``atol=3e-3``, ``rtol=0``), before and after ``--steps`` training steps, and the held-out NLL
(exact log-det, eval mode) at equal wall-clock, linear between the evaluations. Each model trains
on the same batches with its own torch and numpy RNG streams (roulette lengths, probes; normflows
draws its roulette from numpy's global RNG), so neither training curve depends on the other model's
draws and both are reproducible. The power-iteration upkeep differs: ours runs one power step per
layer after each change of the weights, theirs ``update_lipschitz(model, 5)`` after each step (a
difference of about 7 ms of theirs' step; ``--ours-net normflows`` runs normflows' 5 steps on ours).
normflows' net (``nf.nets.LipschitzMLP``) has one more
Swish, before its first layer; ours starts with the linear layer. With ``--ours-net normflows`` our
layers run over normflows' own net instead (the one-import switch; both models then start from the
same weights), whose power iteration runs its ``max_lipschitz_iter`` = 5 steps per weight change.
Peak memory of one training step: the peak of the bytes held by torch tensors allocated during the
step (after a warm-up step), from ``torch.profiler`` with ``profile_memory=True``.

Usage::

    python benchmarks/normflows_compare.py                  # full: 2,000 training steps
    python benchmarks/normflows_compare.py --steps 50 --eval-every 25 --timing-steps 5   # quick
    python benchmarks/normflows_compare.py --ours-net normflows   # ours over normflows' own net
    python benchmarks/normflows_compare.py --ours-net normflows --generic --steps 0   # ... on the generic path
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import normflows as nf
import numpy as np
import torch
from memory import peak_allocated_mib

from pyro_iresnet import LipschitzMLP, ResidualBlock
from pyro_iresnet.normflows import Residual as OursResidual


def two_moons(n: int, generator: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """Two interleaving half circles (standardised), from torch's RNG."""
    return labelled_two_moons(n, generator, noise)[0]


def labelled_two_moons(n: int, generator: torch.Generator, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`two_moons` and, per point, whether it lies on the upper moon (bool)."""
    t = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    data = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)
    return (data - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5]), upper


def build(
    which: str, blocks: int, hidden: int, fused: bool | str = "auto", ours_net: str = "ours"
) -> nf.NormalizingFlow:
    """The benchmark model: normflows' layers (``"theirs"``) or ours (``"ours"``), ours over our
    ``LipschitzMLP`` or, with ``ours_net="normflows"``, over normflows' own net (the one-import switch)."""
    flows = []
    for _ in range(blocks):
        if which == "theirs" or ours_net == "normflows":
            net = nf.nets.LipschitzMLP([2, hidden, hidden, 2], lipschitz_const=0.9, init_zeros=True)
            flows.append(nf.flows.Residual(net, reduce_memory=True) if which == "theirs"
                         else OursResidual(net, reduce_memory=True, fused=fused))
        else:
            net = LipschitzMLP([2, hidden, hidden, 2], coeff=0.9)
            with torch.no_grad():
                net.layers[-1].weight.div_(1000)  # as normflows' init_zeros
            flows.append(OursResidual(net, reduce_memory=True, fused=fused))
        flows.append(nf.flows.ActNorm(2))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)


class Trainer:
    """Adam training steps of one model. The step draws its random numbers from the trainer's own
    streams, swapped into torch's and numpy's global RNGs for the step (ours draws roulette lengths
    and probes from torch; normflows' roulette draws from numpy's global RNG), so that a model's
    training trajectory is reproducible and does not depend on the draws of a model trained beside it."""

    def __init__(self, which: str, model: nf.NormalizingFlow, lr: float, seed: int = 0) -> None:
        self.which, self.model = which, model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
        self.rng_state = torch.Generator().manual_seed(seed).get_state()
        self.numpy_state = np.random.RandomState(seed).get_state()

    def step(self, x: torch.Tensor) -> float:
        outer, outer_numpy = torch.get_rng_state(), np.random.get_state()
        torch.set_rng_state(self.rng_state)
        np.random.set_state(self.numpy_state)
        try:
            self.model.train()
            self.opt.zero_grad(set_to_none=True)
            loss = self.model.forward_kld(x)
            loss.backward()
            self.opt.step()
            if self.which == "theirs":
                nf.utils.update_lipschitz(self.model, 5)
        finally:
            self.rng_state, self.numpy_state = torch.get_rng_state(), np.random.get_state()
            torch.set_rng_state(outer)
            np.random.set_state(outer_numpy)
        return float(loss.detach())


def held_out_nll(model: nf.NormalizingFlow, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(-model.log_prob(x).mean())


def set_inverse_method(model: nf.NormalizingFlow, method: str, atol: float | None = None) -> None:
    """Inverse method and absolute residual tolerance of ours (``atol=None``: the dtype default,
    with ``rtol`` at its default; a given ``atol`` comes with ``rtol=0``)."""
    for m in model.modules():
        if isinstance(m, ResidualBlock):
            m.inverse_method = method
            m.atol, m.rtol = atol, (None if atol is None else 0.0)


def inverse_iterations(model: nf.NormalizingFlow) -> int:
    """Total inverse iterations of ours in the last call, summed over blocks."""
    return sum(m.last_diagnostics.inverse.iterations for m in model.modules()
               if isinstance(m, ResidualBlock) and m.last_diagnostics.inverse is not None)


class Clock:
    """Wall-clock and process CPU time of a block of code (CPU time is robust to other processes
    competing for the cores; both are single-threaded here)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _summary(clocks: list[Clock]) -> dict[str, float]:
    return {"median": statistics.median(c.wall for c in clocks), "min": min(c.wall for c in clocks),
            "cpu_median": statistics.median(c.cpu for c in clocks)}


# normflows stops its fixed point when every squared step is below 1e-5 (1 + |y|), i.e. a step (=
# residual) below about 3e-3 (1 + |y|)^(1/2); ours stopped at that threshold, for comparison only
# (normflows' actual residuals are smaller: sampling_breakdown.py measures them)
NORMFLOWS_LIKE_ATOL = 3e-3


def sample_times(models: dict[str, nf.NormalizingFlow], n: int, reps: int) -> dict[str, dict]:
    """Interleaved sampling times (eval mode, no_grad): ours with the fixed point and with Newton
    at the default tolerance, ours at normflows' tolerance, and normflows."""
    variants = {"ours (fixed_point)": ("ours", "fixed_point", None), "ours (newton)": ("ours", "newton", None),
                "ours (fixed_point, atol 3e-3)": ("ours", "fixed_point", NORMFLOWS_LIKE_ATOL),
                "normflows": ("theirs", None, None)}
    iters: dict[str, int | None] = {k: None for k in variants}
    clocks: dict[str, list[Clock]] = {k: [] for k in variants}
    for r in range(reps):  # in alternating order
        for name, (which, method, atol) in list(variants.items())[:: 1 if r % 2 == 0 else -1]:
            model = models[which].eval()
            if method:
                set_inverse_method(model, method, atol)
            with torch.no_grad(), Clock() as clock:
                z, _ = model.sample(n)
            clocks[name].append(clock)
            if not bool(torch.isfinite(z).all()):
                raise RuntimeError(f"{name}: non-finite samples")
            if method:
                iters[name] = inverse_iterations(model)
    set_inverse_method(models["ours"], "fixed_point")
    return {k: {**_summary(v), "iterations": iters[k]} for k, v in clocks.items()}


def _alternating(trainers: dict[str, Trainer], i: int) -> list[tuple[str, Trainer]]:
    """The trainers in their order for even ``i``, reversed for odd: neither side always runs first
    (after the other's step, with its caches cold)."""
    items = list(trainers.items())
    return items if i % 2 == 0 else items[::-1]


def step_times(trainers: dict[str, Trainer], data: torch.Generator, batch: int, n: int) -> dict[str, dict]:
    clocks: dict[str, list[Clock]] = {k: [] for k in trainers}
    for i in range(n):  # interleaved, same batches, in alternating order
        x = two_moons(batch, data)
        for name, trainer in _alternating(trainers, i):
            with Clock() as clock:
                trainer.step(x)
            clocks[name].append(clock)
    return {k: _summary(v) for k, v in clocks.items()}


def peak_memory(which: str, args: argparse.Namespace) -> float:
    """Peak torch allocation of one training step of a freshly built model (after a warm-up step)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build(which, args.blocks, args.hidden, fused=not args.generic and "auto", ours_net=args.ours_net)
    trainer = Trainer(which, model, args.lr)
    trainer.step(two_moons(args.batch, gen))  # warm-up: ActNorm init, optimiser state
    x = two_moons(args.batch, gen)
    return peak_allocated_mib(lambda: trainer.step(x))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="training steps per model")
    parser.add_argument("--eval-every", type=int, default=250, help="held-out NLL every N steps")
    parser.add_argument("--timing-steps", type=int, default=20, help="train steps timed (median)")
    parser.add_argument("--sample-reps", type=int, default=3, help="sampling repetitions (median)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ours-net", choices=("ours", "normflows"), default="ours",
                        help="net of our layers: our LipschitzMLP, or normflows' own (the one-import switch)")
    parser.add_argument("--generic", action="store_true",
                        help="our layers on the generic autograd path (fused=False; the Newton rows still "
                             "use the fused solver)")
    parser.add_argument("--test-size", type=int, default=4096)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--save", default=None, help="save both trained models' state_dicts here")
    parser.add_argument("--load", default=None, help="skip training: load a --save file as the trained state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, our layers over {args.ours_net}' LipschitzMLP",
          flush=True)
    test = two_moons(args.test_size, torch.Generator().manual_seed(123))
    models = {}
    for which in ("ours", "theirs"):
        torch.manual_seed(0)
        models[which] = build(which, args.blocks, args.hidden, fused=not args.generic and "auto",
                              ours_net=args.ours_net)
    trainers = {k: Trainer(k, m, args.lr) for k, m in models.items()}
    data = torch.Generator().manual_seed(7)
    res: dict = {"args": vars(args)}
    step_times(trainers, data, args.batch, 2)  # warm-up (also ActNorm's data-dependent init)
    res["step_fresh"] = step_times(trainers, data, args.batch, args.timing_steps)
    res["sample_fresh"] = sample_times(models, args.batch, args.sample_reps)
    print(json.dumps(res), flush=True)
    res["peak_step_mib"] = {k: peak_memory(k, args) for k in models}
    print(json.dumps(res["peak_step_mib"]), flush=True)
    if args.load:  # trained state from an earlier --save: sampling and step timing only
        state = torch.load(args.load)
        for k, m in models.items():
            m.load_state_dict(state[k])
        res["curves"] = None
    else:  # interleaved training, same batches; wall-clock of the steps only
        curves: dict[str, list] = {k: [] for k in models}
        elapsed = {k: 0.0 for k in models}
        for step in range(1, args.steps + 1):
            x = two_moons(args.batch, data)
            for k, trainer in _alternating(trainers, step):
                start = time.perf_counter()
                trainer.step(x)
                elapsed[k] += time.perf_counter() - start
            if step % args.eval_every == 0 or step == args.steps:
                for k, m in models.items():
                    curves[k].append((step, elapsed[k], held_out_nll(m, test)))
                print(f"step {step}: " + ", ".join(f"{k} {elapsed[k]:.0f}s nll {curves[k][-1][2]:.4f}"
                                                    for k in models), flush=True)
        res["curves"] = curves
        if args.save:
            torch.save({k: m.state_dict() for k, m in models.items()}, args.save)
    res["sample_trained"] = sample_times(models, args.batch, args.sample_reps)
    res["step_trained"] = step_times(trainers, data, args.batch, args.timing_steps)
    report(res, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def _cells(o: dict, t: dict) -> str:
    speed = f"{t['median'] / o['median']:.2f}x / {t['cpu_median'] / o['cpu_median']:.2f}x"
    return (f"{o['median'] * 1e3:.1f} / {o['cpu_median'] * 1e3:.1f} | {t['median'] * 1e3:.1f} / "
            f"{t['cpu_median'] * 1e3:.1f} | {speed}")


def nll_at(curve: list[tuple[int, float, float]], seconds: float) -> float:
    """Held-out NLL after ``seconds`` of training, linear between the evaluations of ``curve``
    ``(step, seconds, nll)`` (its first point before them; NaN after its last)."""
    previous = None
    for _, t, value in curve:
        if t >= seconds * (1 - 1e-9):
            if previous is None or t == previous[0]:
                return value
            t0, v0 = previous
            return v0 + (seconds - t0) / (t - t0) * (value - v0)
        previous = (t, value)
    return float("nan")


def report(res: dict, args: argparse.Namespace) -> None:
    trained = f"after {args.steps} steps" if not args.load else f"trained ({args.load})"
    print("\nTimes in ms as median wall-clock / median process CPU time; speed-up = normflows / ours.")
    print("\n| metric | ours | normflows | speed-up | target |\n|---|---|---|---|---|")
    for state, label in (("fresh", "fresh"), ("trained", trained)):
        o, t = res[f"step_{state}"]["ours"], res[f"step_{state}"]["theirs"]
        print(f"| train step, {label} | {_cells(o, t)} | >= 2x |")
        samples = res[f"sample_{state}"]
        for name in ("ours (fixed_point)", "ours (newton)", "ours (fixed_point, atol 3e-3)"):
            target = "(comparison only)" if "atol" in name else ">= 3x"
            print(f"| sample 512, {label}, {name}, {samples[name]['iterations']} iterations | "
                  f"{_cells(samples[name], samples['normflows'])} | {target} |")
    mem = res["peak_step_mib"]
    print(f"| peak memory of a train step (MiB allocated by torch) | {mem['ours']:.1f} | "
          f"{mem['theirs']:.1f} | "
          f"{mem['theirs'] / mem['ours']:.2f}x | ours <= theirs |")
    curves = res["curves"]
    if not curves or not all(curves.values()):  # --load, or --steps 0
        return
    budget = min(curves[k][-1][1] for k in curves)  # equal wall-clock: the faster model's total
    nll = {k: nll_at(curves[k], budget) for k in curves}
    print(f"| held-out NLL at equal wall-clock {budget:.0f} s (linear between evaluations) | "
          f"{nll['ours']:.4f} | {nll['theirs']:.4f} | {nll['theirs'] - nll['ours']:+.4f} nats | ours <= theirs |")
    print("\nheld-out NLL curves (step, train seconds, NLL):")
    for k, curve in curves.items():
        print(f"  {k}: " + ", ".join(f"({s}, {e:.0f}, {n:.3f})" for s, e, n in curve))


if __name__ == "__main__":
    main()
