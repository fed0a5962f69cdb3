"""GMDC's four deformable branches (k = 3, 5, 7, 9, 256 -> 4 x 64), forward + backward to x and offsets.

Rows: the reference (four torchvision deform_conv2d calls), the gather path (grid_sample +
matmul per branch, the CPU default), the fused Triton op with fp32
dots as IEEE fp32 and as tf32x3, and the fused op in bfloat16. The weights are frozen, as
in the loss (their gradient kernel is for metric training and is not timed here). The
achieved rate is against the GEMM floor of kernels/deform_conv.py: 2 * OB * C * sum(k^2)
FLOP per pixel, forward and again backward.

    pytest benches/bench_deform_conv.py --benchmark-only
    python benches/bench_deform_conv.py                      (a markdown table)
"""
from __future__ import annotations

import pytest
import torch

from epban.ops import deform_conv as ops
from timing import cuda_median_ms

KERNEL_SIZES = (3, 5, 7, 9)
CUDA_SHAPES = [(1, 256, 64, 64), (16, 256, 16, 16), (1, 256, 128, 128), (1, 256, 32, 32)]
CPU_SHAPES = [(1, 32, 12, 12), (8, 64, 12, 12)]  # (8, 64, 12, 12): a tiny-metric training batch of 96 px crops
# channels_last x and offsets, as in the loss mode.
IMPLS = ["reference", "gather", "fused ieee", "fused tf32x3", "fused bf16"]
CPU_IMPLS = ["reference", "gather"]


def gemm_flop(shape, kernel_sizes=KERNEL_SIZES) -> float:
    """Forward GEMM FLOPs (the backward to x and offsets does the same GEMM once more)."""
    b, c, h, w = shape
    ob = c // len(kernel_sizes)
    return 2.0 * b * h * w * ob * c * sum(k * k for k in kernel_sizes)


def make_inputs(shape, device, dtype=torch.float32, offset_std=1.0, seed=0):
    """x and offsets channels_last, as the loss mode produces them (so their kernels are the ones compiled)."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, c, h, w = shape
    ob = c // len(KERNEL_SIZES)
    cl = torch.channels_last
    x = torch.randn(shape, generator=g, device=device).to(dtype, memory_format=cl).requires_grad_()
    offsets = [(offset_std * torch.randn(b, 2 * k * k, h, w, generator=g, device=device)).to(dtype, memory_format=cl)
               .requires_grad_() for k in KERNEL_SIZES]
    weights = [(torch.randn(ob, c, k, k, generator=g, device=device) / (c * k)).to(dtype) for k in KERNEL_SIZES]
    biases = [torch.randn(ob, generator=g, device=device).to(dtype) for _ in KERNEL_SIZES]
    return x, offsets, weights, biases


def make_step(impl, shape, device):
    dtype = torch.bfloat16 if "bf16" in impl else torch.float32
    x, offsets, weights, biases = make_inputs(shape, device, dtype)
    backend = impl if impl in ("reference", "gather") else "fused"
    precision = impl.split()[-1] if impl in ("fused ieee", "fused tf32x3") else None

    def step():
        out = ops.multi_branch_deform_conv(x, offsets, weights, biases, backend=backend, fp32_precision=precision)
        torch.autograd.grad(out.sum(), [x, *offsets])

    return step


def time_impl(impl, shape, device="cuda", reps=10):
    """Median ms of forward + backward and peak MiB above the inputs."""
    step = make_step(impl, shape, device)
    step()  # compiled and allocated before the peak is reset
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = cuda_median_ms(step, reps)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def table(rows, device_name) -> str:
    out = [f"GMDC deformable branches (k=3,5,7,9), forward + backward to x and offsets, {device_name}",
           "",
           "| shape | impl | ms | GEMM TFLOP/s (2x fwd floor) | peak MiB | vs reference |",
           "|---|---|---|---|---|---|"]
    ref = {r["shape"]: r["ms"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        tflops = 2 * gemm_flop(r["shape"]) / (r["ms"] / 1e3) / 1e12
        speedup = f"{ref[r['shape']] / r['ms']:.2f}x" if r["shape"] in ref else "-"
        out.append(f"| {'x'.join(map(str, r['shape']))} | {r['impl']} | {r['ms']:.3f} | {tflops:.1f} "
                   f"| {r['peak']:.0f} | {speedup} |")
    return "\n".join(out)


def run_rows(shapes, impls, log=print):
    rows = []
    for shape in shapes:
        for impl in impls:
            try:
                ms, peak = time_impl(impl, shape)
                rows.append(dict(shape=shape, impl=impl, ms=ms, peak=peak))
                log(f"{shape} {impl}: {ms:.3f} ms")
            except Exception as exc:
                log(f"{shape} {impl}: FAILED {type(exc).__name__}: {exc}")
    return rows


def _cases():
    cases = [pytest.param("cpu", s, i, id=f"{i}-cpu-{'x'.join(map(str, s))}") for s in CPU_SHAPES for i in CPU_IMPLS]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", s, i, id=f"{i.replace(' ', '-')}-cuda-{'x'.join(map(str, s))}",
                               marks=pytest.mark.cuda)
                  for s in CUDA_SHAPES for i in IMPLS]
    return cases


@pytest.mark.parametrize("device, shape, impl", _cases())
def test_deform_conv(benchmark, device, shape, impl):
    step = make_step(impl, shape, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step()
        sync()

    run()
    benchmark.group = f"deform conv {device} {'x'.join(map(str, shape))}"
    benchmark.extra_info["gemm_gflop"] = 2 * gemm_flop(shape) / 1e9
    benchmark.pedantic(run, rounds=10 if device == "cuda" else 2, warmup_rounds=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the markdown table needs a CUDA GPU; on CPU use pytest benches/bench_deform_conv.py")
    print(table(run_rows(CUDA_SHAPES, IMPLS), torch.cuda.get_device_name()))
