"""Peak tensor memory of a piece of code, shared by the benchmark scripts."""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_allocated_mib(fn: Callable[[], object]) -> float:
    """Peak of the bytes held by torch tensors allocated during ``fn()`` (relative to its start):
    the running sum of the allocations and frees recorded by ``torch.profiler`` with
    ``profile_memory=True``, in time order."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20
