"""Host time of Triton launches: Triton's own path (``kernel[grid](...)``) against epban's
``launch`` (epban.kernels.launch), on the 2-core CI machine, no GPU needed.

The kernels are compiled for an H100 through Triton's real pipeline and launched through its
real host path; only the last step, the driver call, goes to a stand-in that drops it
(epban.testing.compiled_kernels_without_gpu). So each row is the Python a GPU user's eager call
pays before the GPU sees any work: binding, specialisation, cache lookup, the op's own
bookkeeping and autograd. The driver call itself (~5 us) is not in either column.
On a CUDA machine the same cases run for real on the GPU: wall time per eager call, synchronised
(the larger of host and device time).

    pytest benches/bench_launch.py --benchmark-only     (no GPU; run it in its own process: a
                                                         process that imported Triton under
                                                         TRITON_INTERPRET=1 cannot compile)
    python benches/bench_launch.py        (a markdown table; the paths alternate call by call)
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from epban.kernels.launch import FAST_LAUNCH_VARIABLE
from epban.testing import compiled_kernels_without_gpu

PATHS = {"triton": "0", "fast": "1"}  # values of FAST_LAUNCH_VARIABLE
CASES = ["axial one-tile 16x256x16x16 bf16", "axial loop 1x256x64x64 fp32", "bias_act 1x64x32x32",
         "one launch (axial stats kernel)", "loss step, tiny network, 1x3x32x32"]


def make_step(case, device="cpu"):
    """fwd + bwd (or one launch) of ``case``; on CPU tensors inside compiled_kernels_without_gpu."""
    from epban.kernels import axial_attention as kernels
    from epban.kernels.launch import launch
    from epban.ops import bias_act as bias_act_ops
    from epban.ops.axial_attention import _AxialFunction

    torch.manual_seed(0)
    if case.startswith("loss step"):
        # the eager loss mode, every fused path forced (benches/bench_op_overhead.py); on CPU
        # tensors its convolutions run for real, the same in both columns
        from bench_op_overhead import make_loss_step

        return make_loss_step(device)
    if case.startswith("axial"):
        shape, dtype = ((16, 256, 16, 16), torch.bfloat16) if "one-tile" in case else ((1, 256, 64, 64), torch.float32)
        ts = [torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
              for _ in range(6)]
        grads = [torch.ones_like(t) for t in ts[:2]]
        return lambda: torch.autograd.grad(_AxialFunction.apply("sample", "ieee", *ts), ts, grads)
    if case.startswith("bias_act"):
        y = torch.randn(1, 64, 32, 32, device=device, requires_grad=True)
        bias = torch.zeros(64, device=device, requires_grad=True)
        grad = torch.ones_like(y)
        return lambda: torch.autograd.grad(bias_act_ops._bias_act_op(y, bias, None, True), (y, bias), grad)
    q = torch.randn(16, 256, 16, 16, dtype=torch.bfloat16, device=device).contiguous(
        memory_format=torch.channels_last)
    plan = kernels._plan(q.shape, q.dtype, "sample", "ieee", None, True)
    part = torch.empty((2, plan.n_progs, 3), device=device)
    args = (q, q, q, q, q, q, q, q, part, 256, 16, 16, *kernels.layout_strides([q], True), plan.n_row, plan.n_progs)
    meta = plan.both()
    return lambda: launch(kernels._axial_fwd_stats_kernel, (plan.n_progs, 2), *args, **meta)


@pytest.fixture(scope="module")
def compiled():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: python benches/bench_launch.py times the real launches")
    try:
        with compiled_kernels_without_gpu():
            yield
    except RuntimeError as exc:  # Triton imported under the interpreter by an earlier bench
        pytest.skip(str(exc))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_launch_host_time(benchmark, monkeypatch, compiled, case, path):
    monkeypatch.setenv(FAST_LAUNCH_VARIABLE, PATHS[path])
    step = make_step(case)
    step()  # compiles (seconds, once) and fills the fast path's cache
    benchmark.group = f"host time: {case}"
    benchmark.pedantic(step, rounds=100, warmup_rounds=5)


def paired_medians_us(step, reps=200, sync=lambda: None) -> dict:
    """Median us of ``step()`` on each path, the paths alternating call by call (this VM's speed
    drifts between runs); ``sync`` ends each timed call (CUDA: synchronise)."""
    times = {path: [] for path in PATHS}
    for path in PATHS:
        os.environ[FAST_LAUNCH_VARIABLE] = PATHS[path]
        for _ in range(5):
            step()
    for _ in range(reps):
        for path in PATHS:
            os.environ[FAST_LAUNCH_VARIABLE] = PATHS[path]
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[path].append(time.perf_counter() - start)
    return {path: sorted(t)[len(t) // 2] * 1e6 for path, t in times.items()}


def table(device) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    # on a GPU the loop kernels compile last (tens of seconds): the other rows print first
    order = sorted(CASES, key=lambda c: c.startswith("axial loop")) if device == "cuda" else CASES
    for case in order:
        us = paired_medians_us(make_step(case, device), reps=100 if device == "cuda" else 200, sync=sync)
        print(f"| {case} | {us['triton']:.0f} us | {us['fast']:.0f} us |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the data work of the CPU stand-ins should not add noise
    if torch.cuda.is_available():
        print(f"| eager call on {torch.cuda.get_device_name()}, synchronised, median | Triton's path | epban launch |")
        print("|---|---|---|")
        table("cuda")
    else:
        print("| host time, median (no GPU: compiled kernels, launches dropped) | Triton's path | epban launch |")
        print("|---|---|---|")
        with compiled_kernels_without_gpu():
            table("cpu")
