"""Timing shared by the benches' CUDA tables."""
from __future__ import annotations

import statistics

import torch


def cuda_median_ms(step, reps: int) -> float:
    """Median ms of ``step()`` over ``reps`` calls, each timed by CUDA events (after one warm-up
    call that compiles and allocates)."""
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
