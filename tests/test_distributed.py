"""examples/ddp_train.py under torchrun: 2 gloo processes on CPU, loopback only.

The example gathers every rank's parameters and power-iteration buffers (``all_gather`` of the
actual tensors) and compares them bitwise; these tests read rank 0's JSON summary. The second test
is the control: with the per-forward buffer broadcast off and the buffers of rank 1 perturbed, the
same check must report the difference (and the script must fail).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ddp_train.py"
SMALL = ["--num-blocks", "2", "--hidden", "16", "--batch-size", "64", "--log-every", "5"]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(tmp_path: Path, *args: str, expect_ok: bool = True) -> dict[str, Any]:
    """Run the example on 2 CPU processes and return rank 0's summary."""
    out = tmp_path / "summary.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even on a GPU machine
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for _ in range(3):  # another process may grab the free port between bind and launch
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
            "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(EXAMPLE), *SMALL, "--out", str(out), *args,
        ]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if "address already in use" not in result.stderr.lower():
            break
    report = f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert (result.returncode == 0) == expect_ok, report
    assert out.exists(), report
    return json.loads(out.read_text())


def test_ddp_ranks_identical_and_loss_decreases(tmp_path: Path) -> None:
    # Rank 1's power-iteration vectors are replaced after wrapping: DDP's buffer broadcast from
    # rank 0 at the next forward must repair them, so everything ends bitwise identical.
    checkpoint = tmp_path / "checkpoint.pt"
    summary = run_ddp(tmp_path, "--num-steps", "20", "--desync-buffers", "--checkpoint", str(checkpoint))
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["sync_buffers"]
    assert summary["identical"], summary["mismatched_tensors"]
    assert summary["num_buffers"] == 12  # u and v of 3 layers in each of 2 blocks
    assert summary["checksums"][0] == summary["checksums"][1]
    assert summary["final_nll"] < summary["initial_nll"]
    assert all(math.isfinite(loss) for _, loss in summary["losses"])
    assert summary["lipschitz_bound"] < 1 and summary["samples_finite"]
    assert checkpoint.stat().st_size > 0


def test_ddp_check_detects_diverged_buffers(tmp_path: Path) -> None:
    # The control (also the --num-steps 2 smoke run): no broadcast, rank 1's buffers perturbed.
    summary = run_ddp(tmp_path, "--num-steps", "2", "--desync-buffers", "--no-sync-buffers", expect_ok=False)
    assert not summary["identical"]
    assert summary["checksums"][0] != summary["checksums"][1]
    assert len(summary["mismatched_buffers"]) == summary["num_buffers"] == 12
    # the gradients are still all-reduced, so the parameters themselves agree
    assert set(summary["mismatched_tensors"]) == set(summary["mismatched_buffers"])


def test_ranks_stay_identical_without_the_buffer_broadcast(tmp_path: Path) -> None:
    # Without DDP's buffer broadcast the ranks still agree when nothing touches one rank only: the
    # example evaluates on every rank before training (eval settles each rank alike).
    summary = run_ddp(tmp_path, "--num-steps", "10", "--no-sync-buffers")
    assert not summary["sync_buffers"] and summary["identical"], summary["mismatched_tensors"]
