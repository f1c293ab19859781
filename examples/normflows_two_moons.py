r"""normflows' residual-flow two-moons example, on ``pyro_iresnet.normflows.Residual``.

The architecture is normflows' (16 x [Residual(2-128-128-2, Lipschitz 0.9), ActNorm], a standard
normal base, ``forward_kld`` on the ``TwoMoons`` target with Adam 3e-4) with our ``Residual`` and
our ``LipschitzMLP`` (``--net normflows``: normflows' own ``nf.nets.LipschitzMLP``, i.e. normflows'
example with only the import changed), and without ``nf.utils.update_lipschitz`` (power
iteration stays fresh by itself). It plots
the learned density next to the target and prints the held-out negative log-likelihood computed
with the exact log-det (``eval()`` mode).

Run (about 40 s on a CPU; held-out NLL about 1.8):
    python examples/normflows_two_moons.py --num-blocks 4 --lr 3e-3 --num-steps 1400 \
        --out outputs/normflows_two_moons
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import normflows as nf  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pyro_iresnet import LipschitzMLP  # noqa: E402
from pyro_iresnet.normflows import Residual  # noqa: E402


def build_model(
    num_blocks: int = 16, hidden_units: int = 128, hidden_layers: int = 3, net: str = "ours"
) -> nf.NormalizingFlow:
    """normflows' residual-flow architecture with our layer, over our Lipschitz MLP or normflows'
    (``net="normflows"``). Our MLP keeps its default initialisation; normflows' is built with
    ``init_zeros=True`` (its last layer scaled by 1/1000), as normflows' example does."""
    flows = []
    widths = [2] + [hidden_units] * (hidden_layers - 1) + [2]
    for _ in range(num_blocks):
        if net == "normflows":
            mlp = nf.nets.LipschitzMLP(widths, init_zeros=True, lipschitz_const=0.9)
        else:
            mlp = LipschitzMLP(widths, coeff=0.9)
        flows += [Residual(mlp, reduce_memory=True), nf.flows.ActNorm(2)]
    base = nf.distributions.DiagGaussian(2, trainable=False)
    return nf.NormalizingFlow(q0=base, flows=flows, p=nf.distributions.TwoMoons())


@torch.no_grad()
def heldout_nll(model: nf.NormalizingFlow, data: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean negative log-likelihood with the exact log-det (``eval()`` mode)."""
    model.eval()
    nll = torch.cat([-model.log_prob(chunk) for chunk in data.split(batch_size)]).mean()
    model.train()
    return float(nll)


@torch.no_grad()
def plot(model: nf.NormalizingFlow, path: Path, grid_size: int) -> None:
    axis = torch.linspace(-3.0, 3.0, grid_size)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    model.eval()
    log_q = model.log_prob(points).reshape(grid_size, grid_size)
    model.train()
    log_p = model.p.log_prob(points).reshape(grid_size, grid_size)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, density, title in ((axes[0], log_p.exp(), "target"), (axes[1], log_q.exp(), "residual flow")):
        ax.pcolormesh(xx, yy, density, shading="auto")
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num-test", type=int, default=5000)
    parser.add_argument("--grid-size", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--net", choices=("ours", "normflows"), default="ours",
                        help="Lipschitz MLP of the residual blocks: ours, or normflows' nf.nets.LipschitzMLP")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads (these small layers run fastest on one)")
    parser.add_argument("--out", type=Path, default=Path("outputs/normflows_two_moons"))
    args = parser.parse_args()
    if args.num_steps < 1:  # ActNorm initialises on its first batch, which must be training data
        parser.error(f"--num-steps must be >= 1, got {args.num_steps}")

    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.num_blocks, net=args.net)
    test = model.p.sample(args.num_test)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)

    start = time.perf_counter()
    progress = tqdm(range(args.num_steps), desc="train")
    for _ in progress:
        optimizer.zero_grad()
        loss = model.forward_kld(model.p.sample(args.batch_size))
        if torch.isfinite(loss):
            loss.backward()
            optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start

    nll = heldout_nll(model, test)
    figure = args.out / "normflows_two_moons.png"
    plot(model, figure, args.grid_size)
    print(f"steps: {args.num_steps}  train time: {elapsed:.1f} s  held-out NLL (exact log-det): {nll:.4f}")
    print(f"plot: {figure}")


if __name__ == "__main__":
    main()
