"""Host time of a fused op's call, forward + backward, by the door it takes (epban.ops._fused_op).

"dispatcher" forces the torch.library custom op, as torch.compile sees it. "eager" is the
autograd.Function that eager calls take. Both run the same checks, allocations and autograd
bookkeeping. The Triton launch is replaced by a stub that only allocates the outputs, so the
rows time the Python around the kernel: what an eager step, not captured in a CUDA graph, pays
per op before the GPU sees any work. CPU only; tiny tensors, so the data costs nothing.

    pytest benches/bench_op_overhead.py --benchmark-only
    python benches/bench_op_overhead.py          (a markdown table of microseconds per call)
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import epban.ops.bias_act as bias_act_ops
import epban.ops.max_pool as max_pool_ops
import epban.ops.normalise as normalise_ops
from epban.ops import _fused_op

OPS = ["normalise", "bias_act", "bias_relu_max_pool2d"]
DOORS = ["dispatcher", "eager"]


def _stub_launches(patch):
    """Launches that allocate their outputs and run no kernel; ``patch(module, name, value)``."""
    patch(normalise_ops, "_launch", lambda src, mean, std, dst: dst)
    patch(bias_act_ops, "_launch", lambda y, bias, residual, relu: torch.empty_like(y))

    def pool(y, bias, k, s, p):
        size = (*y.shape[:2], max_pool_ops.pooled_size(y.shape[2], k, s, p), max_pool_ops.pooled_size(y.shape[3], k, s, p))
        return torch.empty(size, dtype=y.dtype), torch.empty(size, dtype=torch.int8)

    patch(max_pool_ops, "_launch_pool", pool)
    patch(max_pool_ops, "_launch_grad", lambda grad, other, out, argmax, h, w, k, s, p: torch.empty(
        (*out.shape[:2], h, w), dtype=out.dtype))


def make_step(op):
    """fwd + bwd of one fused call on tiny CPU tensors (backend="fused": TRITON_INTERPRET=1 set)."""
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    if op == "normalise":
        mean, std = torch.tensor([0.4, 0.4, 0.4]), torch.tensor([0.2, 0.2, 0.2])
        forward = lambda: normalise_ops.normalise(x, mean, std, dtype=torch.bfloat16,  # noqa: E731
                                                  channels_last=True, backend="fused")
    elif op == "bias_act":
        bias = torch.zeros(3, requires_grad=True)
        forward = lambda: bias_act_ops.bias_act(x, bias, backend="fused")  # noqa: E731
    else:
        bias = torch.zeros(3, requires_grad=True)
        forward = lambda: max_pool_ops.bias_relu_max_pool2d(x, bias, 3, 2, 1, backend="fused")[0]  # noqa: E731
    upstream = forward().detach().clone()
    return lambda: torch.autograd.grad(forward(), x, upstream)


def _force(patch, door):
    if door == "dispatcher":
        patch(_fused_op, "needs_dispatcher", lambda args: True)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("op", OPS)
def test_op_overhead(benchmark, monkeypatch, op, door):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _stub_launches(monkeypatch.setattr)
    _force(monkeypatch.setattr, door)
    benchmark.group = f"host time per fwd+bwd call: {op}"
    benchmark.pedantic(make_step(op), rounds=200, warmup_rounds=20)


def median_us(step, reps=400) -> float:
    for _ in range(20):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    saved = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    _stub_launches(patch)
    rows = {}
    for door in ("eager", "dispatcher"):
        _force(patch, door)
        rows[door] = {op: median_us(make_step(op)) for op in OPS}
    print("| op, fwd + bwd, launch stubbed | dispatcher (custom op) us | eager (autograd.Function) us |")
    print("|---|---|---|")
    for op in OPS:
        print(f"| {op} | {rows['dispatcher'][op]:.0f} | {rows['eager'][op]:.0f} |")
