"""NeuTra HMC with a guide of ``iresnet`` blocks on a 2-d funnel: ``eval()`` against training mode.

Trains an ``AutoNormalizingFlow`` guide (two ``iresnet`` blocks of width 16, coeff 0.9) by SVI,
then runs NUTS on the ``NeuTraReparam`` potential with the guide in each ``--modes`` entry and
prints the time, the divergences and the mean and standard deviation of the samples (the funnel
has y ~ N(0, 3) and x | y ~ N(0, e^{y/2})). In training mode the blocks' log-det is the Russian
roulette estimate, so the potential is random and NUTS degrades (see docs/pyro.md).

    python benchmarks/neutra_funnel.py                     # eval only (about 10 s)
    python benchmarks/neutra_funnel.py --modes eval,train  # training mode takes minutes
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.infer.reparam import NeuTraReparam

from pyro_iresnet import iresnet


def funnel() -> None:
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=100, help="NUTS warm-up steps and samples, each")
    parser.add_argument("--modes", default="eval", help="comma-separated: eval, train")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for mode in args.modes.split(","):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormalizingFlow(funnel, partial(T.iterated, 2, iresnet, hidden_dims=[16], coeff=0.9))
        svi = SVI(funnel, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(args.svi_steps):
            svi.step()
        guide.train(mode == "train")
        neutra = NeuTraReparam(guide.requires_grad_(False))
        mcmc = MCMC(NUTS(poutine.reparam(funnel, config=lambda _, reparam=neutra: reparam)), num_samples=args.samples,
                    warmup_steps=args.samples, disable_progbar=True)
        start = time.perf_counter()
        mcmc.run()
        seconds = time.perf_counter() - start
        (latent,) = mcmc.get_samples().values()
        samples = neutra.transform_sample(latent)
        divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])
        summary = ", ".join(f"{k} {float(v.mean()):+.2f} ± {float(v.std()):.2f}" for k, v in samples.items())
        print(f"{mode:5s}: NUTS {2 * args.samples} iterations in {seconds:6.1f} s, {divergences} divergences; "
              f"{summary}")


if __name__ == "__main__":
    main()
