r"""2-D density estimation with Pyro: an i-ResNet flow against Pyro's ``spline_coupling`` flow.

Datasets (generated with torch): two moons, 8 Gaussians, checkerboard. The i-ResNet flow is
``TransformedDistribution(base, [ComposeTransform(blocks).inv])``: ``log_prob(data)`` runs only the
explicit maps $x + g(x)$ (with the training estimator of the log-det), while sampling runs the
fixed-point inverses. Both flows get the same number of Adam steps on the same minibatches; the
held-out NLL uses the exact log-det (``block.eval()`` is exact for small $d$).

Run::

    python examples/pyro_density_2d.py --num-steps 1000 --out outputs/

References:
    Invertible Residual Networks (Behrmann et al., 2019), https://arxiv.org/abs/1811.00995

    Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.distributions import transforms as T  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.distributions import ComposeTransform  # noqa: E402
from tqdm import trange  # noqa: E402

from pyro_iresnet import iresnet, lipschitz_bound  # noqa: E402


# -- data ------------------------------------------------------------------------------------
def two_moons(n: int, generator: torch.Generator) -> Tensor:
    angle = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=-1) * 2.0
    return points + 0.1 * torch.randn(n, 2, generator=generator)


def eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k * (2 * math.pi / 8)
    centres = 2.5 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return centres + 0.3 * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    x1 = 4.0 * torch.rand(n, generator=generator) - 2.0
    offset = torch.randint(0, 2, (n,), generator=generator) * 2.0 - 2.0
    x2 = torch.rand(n, generator=generator) + offset + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=-1) * 1.5


DATASETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": two_moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


# -- flows -----------------------------------------------------------------------------------
def base_distribution() -> dist.Distribution:
    return dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)


def iresnet_flow(n_blocks: int, hidden: int, logdet: str) -> tuple[dist.TransformedDistribution, nn.Module]:
    """Density-estimation orientation: the data side is the explicit side of every block."""
    blocks = nn.ModuleList(
        iresnet(2, hidden_dims=[hidden, hidden], coeff=0.97, logdet=logdet) for _ in range(n_blocks)
    )
    return dist.TransformedDistribution(base_distribution(), [ComposeTransform(list(blocks)).inv]), blocks


def spline_flow(n_layers: int, hidden: int) -> tuple[dist.TransformedDistribution, nn.Module]:
    swap = torch.tensor([1, 0])
    parts: list[nn.Module] = []
    for _ in range(n_layers):
        coupling = T.spline_coupling(2, hidden_dims=[hidden, hidden], count_bins=8, bound=6.0)
        parts += [coupling, T.Permute(swap)]
    flow = T.ComposeTransformModule(parts[:-1])
    return dist.TransformedDistribution(base_distribution(), [flow]), flow


# -- training and evaluation -------------------------------------------------------------------
def train(
    flow: dist.TransformedDistribution, module: nn.Module, sampler: Callable[[int], Tensor],
    num_steps: int, batch_size: int, lr: float, desc: str,
) -> float:
    """Adam on ``-log_prob``; returns seconds per step."""
    module.train()
    optim = torch.optim.Adam(module.parameters(), lr=lr)
    start = time.perf_counter()
    bar = trange(num_steps, desc=desc, leave=False)
    for _ in bar:
        batch = sampler(batch_size)
        optim.zero_grad()
        loss = -flow.log_prob(batch).mean()
        loss.backward()
        optim.step()
        bar.set_postfix(nll=f"{loss.detach():.3f}")
    return (time.perf_counter() - start) / max(num_steps, 1)


@torch.no_grad()
def held_out_nll(flow: dist.TransformedDistribution, module: nn.Module, data: Tensor) -> float:
    module.eval()  # i-ResNet blocks: exact log-det for d = 2
    return float(-torch.cat([flow.log_prob(chunk) for chunk in data.split(2048)]).mean())


@torch.no_grad()
def density_grid(flow: dist.TransformedDistribution, lim: float, n: int) -> Tensor:
    axis = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    return torch.cat([flow.log_prob(chunk) for chunk in grid.split(4096)]).exp().reshape(n, n)


def plot(results: dict[str, dict], lim: float, path: Path) -> None:
    columns = ["data", "i-ResNet density", "i-ResNet samples", "spline density", "spline samples"]
    fig, axes = plt.subplots(len(results), 5, figsize=(15, 3 * len(results)), squeeze=False)
    for row, (name, res) in enumerate(results.items()):
        images = [None, res["iresnet"]["density"], None, res["spline"]["density"], None]
        points = [res["data"], None, res["iresnet"]["samples"], None, res["spline"]["samples"]]
        for col, ax in enumerate(axes[row]):
            if images[col] is not None:
                ax.imshow(images[col].numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
            else:
                xy = points[col].numpy()
                ax.hist2d(xy[:, 0], xy[:, 1], bins=100, range=[[-lim, lim], [-lim, lim]], cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col])
        axes[row][0].set_ylabel(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, default=1000)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=16, help="i-ResNet blocks")
    parser.add_argument("--spline-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--logdet", choices=["unbiased", "series", "exact"], default="unbiased",
                        help="training estimator of the i-ResNet log-det")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--n-plot", type=int, default=10_000, help="points per scatter panel")
    parser.add_argument("--grid", type=int, default=100, help="density grid resolution")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lim = 4.5
    results: dict[str, dict] = {}
    table: dict[str, dict[str, float]] = {}
    for name in args.datasets:
        make = DATASETS[name]
        test = make(args.n_test, torch.Generator().manual_seed(args.seed + 2))
        res: dict = {"data": make(args.n_plot, torch.Generator().manual_seed(args.seed + 3))}
        row: dict[str, float] = {}
        builders = {
            "iresnet": lambda: iresnet_flow(args.blocks, args.hidden, args.logdet),
            "spline": lambda: spline_flow(args.spline_layers, args.hidden),
        }
        for model_name, build in builders.items():
            torch.manual_seed(args.seed)  # each model's weights from the seed alone, whatever ran before
            flow, module = build()
            data_gen = torch.Generator().manual_seed(args.seed + 1)  # the same minibatches for each model

            def sampler(n: int, make: Callable = make, data_gen: torch.Generator = data_gen) -> Tensor:
                return make(n, data_gen)

            step_time = train(
                flow, module, sampler, args.num_steps, args.batch_size, args.lr, f"{name}/{model_name}"
            )
            row[f"{model_name}_nll"] = held_out_nll(flow, module, test)
            row[f"{model_name}_ms_per_step"] = 1e3 * step_time
            with torch.no_grad():
                res[model_name] = {
                    "density": density_grid(flow, lim, args.grid),
                    "samples": flow.sample((args.n_plot,)),
                }
            if model_name == "iresnet":
                row["iresnet_lip"] = lipschitz_bound(module)
        results[name] = res
        table[name] = row
    path = args.out / "pyro_density_2d.png"
    plot(results, lim, path)
    print(f"\nheld-out NLL (nats, exact log-det), {args.num_steps} Adam steps each; plot: {path}")
    header = ("dataset", "i-ResNet", "spline", "ms/step iRes", "ms/step spl", "max Lip(g)")
    print("{:<14}{:>10}{:>10}{:>14}{:>13}{:>12}".format(*header))
    for name, row in table.items():
        print(f"{name:<14}{row['iresnet_nll']:>10.3f}{row['spline_nll']:>10.3f}"
              f"{row['iresnet_ms_per_step']:>14.1f}{row['spline_ms_per_step']:>13.1f}{row['iresnet_lip']:>12.3f}")
    return table


if __name__ == "__main__":
    main()
