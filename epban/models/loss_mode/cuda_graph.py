"""CUDA-graph capture of the loss step: forward and backward captured once per input shape, then replayed.

The scores and the gradient handed to autograd live in the graph's static buffers, so consume
them before the next call (an SR training step does).
"""
from __future__ import annotations

import gc

import torch
import torch.nn as nn

from epban.ops import axial_attention as axial_ops


class CUDAGraphScorer(nn.Module):
    """Replays a captured forward + backward of ``scorer`` per (shape, dtype, device) of the inputs.

    ``scorer`` is a ``PBANScorer``. Calls without a gradient to ``sr`` (or not on CUDA) run it
    eagerly. When its attention backend is "auto", the first call of a shape captures the step
    once with the fused attention kernels and once with the reference attention, times a few
    replays of each, and keeps the faster: replays carry no host overhead, so the eager rule
    behind "auto" (which weighs the host time of each path's kernel launches) does not hold
    inside a graph. ``attention_choice`` records the pick and its time (ms) per shape.
    ``cudnn_benchmark``: cuDNN times its algorithms for each captured shape.
    """

    TIMED_REPLAYS = 5

    def __init__(self, scorer: nn.Module, cudnn_benchmark: bool = False):
        super().__init__()
        self.scorer = scorer
        self.cudnn_benchmark = cudnn_benchmark
        self._graphed: dict = {}
        self.attention_choice: dict = {}

    def train(self, mode: bool = True):
        return super().train(False)

    def _capture(self, sr: torch.Tensor, hr: torch.Tensor):
        # cudnn_benchmark: cuDNN times its convolution algorithms for these shapes during the
        # warm-up runs (make_graphed_callables runs forward and backward before capturing) and
        # the graph keeps the fastest; the process-wide flag is restored afterwards.
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = saved or self.cudnn_benchmark
        try:
            self.scorer(sr.detach(), hr)  # validates the inputs and compiles the kernels before capture
            return torch.cuda.make_graphed_callables(
                lambda a, b: self.scorer(a, b), (sr.detach().clone().requires_grad_(), hr.clone())
            )
        finally:
            torch.backends.cudnn.benchmark = saved

    def _attention_candidates(self, sr: torch.Tensor) -> list:
        block = self.scorer.block2
        if block.attention_backend != "auto" or not axial_ops.fused_axial_available(sr.device):
            return []
        return ["fused", "reference"]

    def _replay_ms(self, fn, sr: torch.Tensor, hr: torch.Tensor) -> float:
        x = sr.detach().clone().requires_grad_()
        for _ in range(2):
            torch.autograd.grad(fn(x, hr).sum(), x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.TIMED_REPLAYS):
            torch.autograd.grad(fn(x, hr).sum(), x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.TIMED_REPLAYS

    def _capture_fastest(self, sr: torch.Tensor, hr: torch.Tensor, key):
        candidates = self._attention_candidates(sr)
        if not candidates:
            return self._capture(sr, hr)
        block = self.scorer.block2
        best = None
        try:
            for backend in candidates:
                block.attention_backend = backend
                try:
                    fn = self._capture(sr, hr)
                except Exception:  # a backend that cannot serve this shape or device
                    continue
                ms = self._replay_ms(fn, sr, hr)
                if best is None or ms < best[0]:
                    best = (ms, backend, fn)
                del fn
        finally:
            block.attention_backend = "auto"
        gc.collect()  # frees the slower capture's graph and its memory pool
        if best is None:
            return self._capture(sr, hr)
        self.attention_choice[key] = (best[1], round(best[0], 3))
        return best[2]

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if not (sr.is_cuda and sr.requires_grad and torch.is_grad_enabled()):
            return self.scorer(sr, hr)
        hr = hr.detach()
        key = (tuple(sr.shape), sr.dtype, hr.dtype, sr.device)
        fn = self._graphed.get(key)
        if fn is None:
            fn = self._graphed[key] = self._capture_fastest(sr, hr, key)
        return fn(sr, hr)
