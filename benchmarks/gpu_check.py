"""SVI with an i-ResNet guide on CUDA under ``torch.cuda.set_sync_debug_mode("error")``; steps/s on
CPU vs GPU (issue 3).

Model: Bayesian logistic regression on synthetic data (``--n-data`` points, ``--dim`` features).
Guide: ``AutoNormalizingFlow(model, partial(T.iterated, K, iresnet, ...))`` with the default
unbiased Russian-roulette log-det. Each step is a hand-written ELBO (guide trace, replayed model
trace, ``log_prob_sum``), ``backward`` and an Adam step: Pyro's ``SVI.step`` and ``Trace_ELBO``
read the loss on the host (``float(loss)``, ``warn_if_nan``), which is a sync by design, so they
are timed separately and kept outside the sync check. Pyro's validation is disabled (its
support checks read tensors too).

Exits with status 0 and a message when no CUDA device is available. Usage::

    python benchmarks/gpu_check.py --num-steps 200
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import transforms as T
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from torch import Tensor

from pyro_iresnet import iresnet


def make_model(n_data: int, dim: int, device: torch.device) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(n_data, dim, generator=gen)
    truth = torch.randn(dim, generator=gen)
    labels = (features @ truth + 0.5 * torch.randn(n_data, generator=gen) > 0).float()
    features, labels = features.to(device), labels.to(device)
    zeros = torch.zeros(dim, device=device)

    def model() -> None:
        w = pyro.sample("w", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
        logits = (w.unsqueeze(-2) @ features.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        with pyro.plate("data", n_data):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=labels)

    return model


def negative_elbo(model: Callable[[], None], guide: Callable[[], None]) -> Tensor:
    """One-particle ELBO estimate (no host reads): ``log q(z) - log p(x, z)``."""
    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace()
    return guide_trace.log_prob_sum() - model_trace.log_prob_sum()


def run(device: torch.device, args: argparse.Namespace, sync_check: bool) -> tuple[float, float]:
    """Returns (hand-written ELBO steps/s, ``SVI.step`` steps/s) on ``device``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = make_model(args.n_data, args.dim, device)
    flow = partial(T.iterated, args.blocks, iresnet, hidden_dims=[args.hidden] * 2)
    guide = AutoNormalizingFlow(model, flow)
    guide()  # builds the flow (host-side set-up, outside the timed and checked region)
    guide.to(device)
    optim = torch.optim.Adam(guide.parameters(), lr=1e-3)

    def step() -> None:
        optim.zero_grad()
        negative_elbo(model, guide).backward()
        optim.step()

    step()  # warm-up (CUDA kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        if sync_check:
            torch.cuda.set_sync_debug_mode("error")
    start = time.perf_counter()
    try:
        for _ in range(args.num_steps):
            step()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    manual = args.num_steps / (time.perf_counter() - start)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step()
    start = time.perf_counter()
    for _ in range(args.num_steps):
        svi.step()
    return manual, args.num_steps / (time.perf_counter() - start)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, default=200)
    parser.add_argument("--n-data", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device available; nothing to check (skipped).")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    cpu_manual, cpu_svi = run(torch.device("cpu"), args, sync_check=False)
    gpu_manual, gpu_svi = run(torch.device("cuda"), args, sync_check=True)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  pyro {pyro.__version__}")
    print(f"model: logistic regression, n={args.n_data}, d={args.dim}; guide: {args.blocks} i-ResNet blocks, "
          f"hidden {args.hidden}x2; {args.num_steps} steps")
    print("no host-device sync in the hand-written SVI step (sync debug mode 'error')")
    print(f"{'':<28}{'CPU steps/s':>12}{'GPU steps/s':>12}")
    print(f"{'ELBO step (sync-checked)':<28}{cpu_manual:>12.1f}{gpu_manual:>12.1f}")
    print(f"{'pyro SVI.step':<28}{cpu_svi:>12.1f}{gpu_svi:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
