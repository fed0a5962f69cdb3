"""Timing shared by the benches' CUDA tables."""
from __future__ import annotations

import statistics

import torch


def loss_step(fn, shape, device, seed: int = 0):
    """The step the image-loss benches time: ``fn(x, y).backward()`` with respect to x, for a
    random x in [0, 1] and y a noisy copy, synchronised on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen).to(device)
    y = (x + 0.1 * torch.randn(shape, generator=gen).to(device)).clamp(0, 1)
    xg = x.clone().requires_grad_(True)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run():
        xg.grad = None
        fn(xg, y).backward()
        sync()

    return run


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


def cuda_graph_replay(step):
    """``step()`` captured in a CUDA graph, warmed up on a side stream first as capture
    requires; returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def cuda_graph_median_ms(step, reps: int) -> float:
    """Median ms of one replay of ``step()`` captured in a CUDA graph: the device's time alone,
    without the host's launch overhead, which eager timing of small ops measures instead."""
    return cuda_median_ms(cuda_graph_replay(step), reps)
