"""Train an i-ResNet flow on two moons with DistributedDataParallel, one process per device.

Launch with ``torchrun`` (``python -m torch.distributed.run`` is the same launcher):

    # one machine, 2 CPU processes (backend gloo)
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --num-steps 300

    # one machine, every GPU (backend nccl, rank i uses cuda:LOCAL_RANK)
    torchrun --standalone --nproc_per_node gpu examples/ddp_train.py

    # two machines with 4 GPUs each: run on every node, node_rank 0 on the host of the endpoint
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --rdzv_endpoint HOST:29500 examples/ddp_train.py
    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 4 --rdzv_endpoint HOST:29500 examples/ddp_train.py

DDP wraps ``FlowNLL``, a module whose ``forward(batch)`` *is* the loss (the mean negative
log-likelihood under ``ComposeTransform(blocks).inv``), so that every parameter's gradient passes
through DDP's all-reduce hooks. Each rank draws its own shard of two moons (seeded by
``--seed`` and the rank; nothing is downloaded), so the all-reduced gradient is the gradient of the
loss on ``world_size * batch_size`` points per step.

At the end rank 0 prints the held-out NLL before and after training and the certified
``lipschitz_bound``, every rank's parameters and power-iteration buffers are gathered and compared
bitwise, and rank 0 writes a JSON summary (``--out``) and optionally a checkpoint
(``--checkpoint``). The script exits with status 1 if the ranks disagree.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.distributed as dist_c10d
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from two_moons import two_moons  # the main demo's data (examples/ is on sys.path when run as a script)

from pyro_iresnet import SpectralNormLinear, iresnet, lipschitz_bound


class FlowNLL(nn.Module):
    """A stack of ``iresnet`` blocks in density orientation; ``forward(x)`` is the mean NLL of ``x``."""

    def __init__(self, num_blocks: int, hidden: int, coeff: float, logdet: str, device: torch.device) -> None:
        super().__init__()
        blocks = [iresnet(2, hidden_dims=[hidden, hidden], coeff=coeff, logdet=logdet) for _ in range(num_blocks)]
        self.blocks = nn.ModuleList(blocks).to(device)
        base = dist.Normal(torch.zeros(2, device=device), torch.ones(2, device=device)).to_event(1)
        self.flow = dist.TransformedDistribution(base, [T.ComposeTransform(list(self.blocks)).inv])

    def forward(self, x: Tensor) -> Tensor:
        return -self.flow.log_prob(x).mean()


def wrap_ddp(model: nn.Module, device: torch.device, sync_buffers: bool) -> DistributedDataParallel:
    """``DistributedDataParallel(model)``; ``sync_buffers=False`` turns off the per-forward buffer
    broadcast (``forward_sync_buffers`` since torch 2.13, ``broadcast_buffers`` before)."""
    kwargs: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if not sync_buffers:
        name = "forward_sync_buffers"
        kwargs[name if name in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"] = False
    # The spectral-norm vectors u, v of every SpectralNormLinear are *buffers* that each training-mode
    # forward advances by one power-iteration step. By default DDP broadcasts all buffers from rank 0
    # at the start of every forward (``broadcast_buffers=True``, called ``forward_sync_buffers`` since
    # torch 2.13; the constructor also broadcasts parameters and buffers once). So each step starts
    # from rank 0's u, v, every rank then runs the same power step on the same (all-reduced) weights,
    # and sigma~, the normalised weights and the buffers stay identical on all ranks. Without the
    # broadcast they still agree as long as nothing touches them on one rank only (this script
    # evaluates on every rank before training, and on rank 0 only after it); with it, a rank whose
    # buffers drifted is repaired at its next forward (see --desync-buffers).
    return DistributedDataParallel(model, **kwargs)


def named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of ``model`` (the power-iteration vectors ``u``, ``v`` included)."""
    return [*model.named_parameters(), *model.named_buffers()]


def compare_ranks(model: nn.Module, world_size: int) -> dict[str, Any]:
    """Gather every rank's parameters and buffers and compare them bitwise with rank 0's.

    The float32 values are widened to float64 (exactly) and concatenated, gathered with
    ``all_gather`` and compared with ``torch.equal``, tensor by tensor.
    """
    state = named_state(model)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for _, t in state])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist_c10d.all_gather(gathered, flat)
    sizes = [t.numel() for _, t in state]
    mismatches: dict[str, list[int]] = {}
    for rank in range(1, world_size):
        for (name, _), ref, other in zip(state, gathered[0].split(sizes), gathered[rank].split(sizes)):
            if not torch.equal(ref, other):
                mismatches.setdefault(name, []).append(rank)
    buffers = {name for name, _ in model.named_buffers()}
    return {
        "identical": not mismatches,
        "num_tensors": len(state),
        "num_buffers": len(buffers),
        "num_values": flat.numel(),
        "mismatched_tensors": mismatches,
        "mismatched_buffers": sorted(set(mismatches) & buffers),
        "checksums": [hashlib.sha256(g.cpu().numpy().tobytes()).hexdigest()[:16] for g in gathered],
        "max_abs_difference": max((float((g - gathered[0]).abs().max()) for g in gathered), default=0.0),
    }


def global_mean(value: Tensor, world_size: int) -> float:
    """The mean of a scalar over all ranks (all_reduce of the sum)."""
    total = value.detach().clone().reshape(1)
    dist_c10d.all_reduce(total)
    return float(total) / world_size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256, help="points per rank and step")
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--coeff", type=float, default=0.97)
    parser.add_argument("--logdet", choices=["unbiased", "series", "exact"], default="exact")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("outputs/ddp_train.json"), help="rank 0's JSON summary")
    parser.add_argument("--checkpoint", type=Path, default=None, help="rank 0 saves model.module's state_dict here")
    parser.add_argument("--no-sync-buffers", action="store_true",
                        help="(testing) turn off DDP's per-forward buffer broadcast")
    parser.add_argument("--desync-buffers", action="store_true",
                        help="(testing) before training, give ranks > 0 fresh random power-iteration vectors")
    args = parser.parse_args(argv)
    if args.log_every < 1:
        parser.error(f"--log-every must be >= 1, got {args.log_every}")

    use_cuda = torch.cuda.is_available()
    dist_c10d.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world_size = dist_c10d.get_rank(), dist_c10d.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)

    # Same seed for the model on every rank (DDP broadcasts rank 0's weights anyway) ...
    torch.manual_seed(args.seed)
    model = FlowNLL(args.num_blocks, args.hidden, args.coeff, args.logdet, device)
    ddp = wrap_ddp(model, device, sync_buffers=not args.no_sync_buffers)
    # ... and a different stream per rank for its data shard and the estimator's draws.
    torch.manual_seed(args.seed * 100_003 + rank + 1)
    shard = two_moons(20_000, generator=torch.Generator().manual_seed(args.seed * 100_003 + rank + 1)).to(device)
    test = two_moons(2_000, generator=torch.Generator().manual_seed(args.seed * 100_003)).to(device)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.num_steps, 1))

    def held_out_nll() -> float:
        """Exact-log-det NLL of the shared test set with ``ddp.module`` (no collectives; eval mode
        settles the calling rank's power iteration without marking the training-mode step done)."""
        model.eval()
        with torch.no_grad():
            nll = float(model(test))
        model.train()
        return nll

    # on every rank (no collectives): eval() settles each rank's power iteration alike, so the ranks
    # stay identical even without DDP's buffer broadcast (--no-sync-buffers)
    initial_nll = held_out_nll()
    if args.desync_buffers and rank > 0:  # a rank whose power iteration drifted (test of the check)
        desync = torch.Generator().manual_seed(rank)  # after eval(), whose settling would repair them
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, SpectralNormLinear)):
                for buffer in (layer.u, layer.v):
                    buffer.copy_(torch.nn.functional.normalize(torch.randn(buffer.shape, generator=desync), dim=0))
    losses: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(args.num_steps):
        batch = shard[torch.randint(len(shard), (args.batch_size,), device=device)]
        loss = ddp(batch)  # buffer broadcast from rank 0, then forward (one power-iteration step)
        optimizer.zero_grad()
        loss.backward()  # gradients all-reduced (averaged) across ranks by DDP's hooks
        optimizer.step()
        scheduler.step()
        if step == 0 or step == args.num_steps - 1 or (step + 1) % args.log_every == 0:
            mean_loss = global_mean(loss, world_size)
            losses.append((step + 1, mean_loss))
            if rank == 0:
                print(f"step {step + 1:5d}  loss (mean over ranks) {mean_loss:.4f}", flush=True)
    train_seconds = time.perf_counter() - start

    check = compare_ranks(model, world_size)
    summary: dict[str, Any] = {
        "world_size": world_size,
        "backend": dist_c10d.get_backend(),
        "num_steps": args.num_steps,
        "train_seconds": train_seconds,
        "sync_buffers": not args.no_sync_buffers,
        "desync_buffers": args.desync_buffers,
        "losses": losses,
        **check,
    }
    if rank == 0:  # evaluation, sampling and checkpoints on rank 0 only, on the unwrapped module
        model.eval()
        with torch.no_grad():
            samples = model.flow.sample((1000,))
        summary.update(
            initial_nll=initial_nll,
            final_nll=held_out_nll(),
            lipschitz_bound=lipschitz_bound(model),
            samples_finite=bool(torch.isfinite(samples).all()),
        )
        print(f"held-out NLL (exact log-det): {summary['initial_nll']:.4f} -> {summary['final_nll']:.4f} nats | "
              f"training {train_seconds:.1f} s on {world_size} ranks ({summary['backend']}) | "
              f"max Lip(g) certified {summary['lipschitz_bound']:.4f}")
        status = "identical" if check["identical"] else f"DIFFERENT: {check['mismatched_tensors']}"
        print(f"parameters and power-iteration buffers across ranks ({check['num_tensors']} tensors, "
              f"{check['num_buffers']} buffers): {status}; checksums {check['checksums']}")
        if args.checkpoint is not None:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.checkpoint)
            print(f"wrote {args.checkpoint}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    # Free DDP's reducer (it holds the process group and gloo work objects) while the group is alive,
    # so nothing of it is left for the interpreter's shutdown.
    del ddp, optimizer, scheduler
    gc.collect()
    dist_c10d.barrier()
    dist_c10d.destroy_process_group()
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
