"""Peak tensor memory of a piece of code, shared by the benchmark scripts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_iresnet.fused import _SCRATCH


def peak_allocated_mib(fn: Callable[[], object]) -> float:
    """Peak of the bytes held by torch tensors allocated during ``fn()`` (relative to its start):
    the running sum of the allocations and frees that ``torch.profiler`` (``profile_memory=True``)
    records, each at its own timestamp (its raw ``[memory]`` records). Summing the operators'
    ``self_cpu_memory_usage`` at their start times instead would book every free inside an
    operator, e.g. a custom Function's backward releasing what its forward saved, before that
    operator's allocations, and under-report the peak.

    The fused path's per-thread scratch store (:mod:`pyro_iresnet.fused`), which keeps its
    temporaries from one call to the next, is emptied first, so that ``fn()`` allocates them again
    and they are counted: memory kept between steps is memory a step needs. (Until 2026-11-29 21:30
    UTC it was not emptied, and the fused path's peaks left out about 7.8 MiB of such buffers on
    the normflows model.)"""
    _SCRATCH.__dict__.clear()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20
