"""Forward+backward of both directions of the block's axial attention, float32 (and bf16).

Rows: the reference, the fused Triton kernels (CUDA; also in bfloat16 channels_last, the loss
mode's case, which takes the kernels' resident-tile path), torch.compile of the reference (CUDA,
only with EPBAN_TEST_COMPILE=1: it compiles for minutes), and
torch.nn.functional.scaled_dot_product_attention on the same row and column tokens: a speed
yardstick that computes a different function (textbook attention, 1/sqrt(C), no std).
On CPU only small shapes and the plain PyTorch rows run: the Triton interpreter is not a
speed path.

    pytest benches/bench_axial_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from epban import settings
from epban.ops.axial_attention import bi_axial_attention, fused_axial_available

CUDA_SHAPES = [(1, 256, 64, 64), (1, 256, 128, 128), (16, 256, 16, 16), (1, 256, 135, 240)]
CPU_SHAPES = [(1, 32, 16, 16), (2, 64, 12, 20)]
IMPLS = ["reference", "fused", "fused-bf16-channels_last", "compiled-reference", "sdpa-yardstick-different-function"]


def _sdpa_axial(q, k, v):
    """0.5 (row + col) of textbook attention over the same sequences (not the axial op)."""
    B, C, H, W = q.shape

    def rows(t):
        return t.permute(0, 2, 3, 1).reshape(B * H, 1, W, C)

    def cols(t):
        return t.permute(0, 3, 2, 1).reshape(B * W, 1, H, C)

    row = F.scaled_dot_product_attention(rows(q), rows(k), rows(v)).reshape(B, H, W, C).permute(0, 3, 1, 2)
    col = F.scaled_dot_product_attention(cols(q), cols(k), cols(v)).reshape(B, W, H, C).permute(0, 3, 2, 1)
    return 0.5 * (row + col)


def _directions(impl):
    if impl == "sdpa-yardstick-different-function":
        return lambda q1, k1, v1, q2, k2, v2: (_sdpa_axial(q1, k2, v1), _sdpa_axial(q2, k1, v2))
    if impl == "compiled-reference":
        return torch.compile(lambda *t: bi_axial_attention(*t, backend="reference"))
    return lambda *t: bi_axial_attention(*t, backend=impl.split("-")[0])


def _cases():
    cases = [pytest.param("cpu", s, impl, id=f"{impl}-cpu-{'x'.join(map(str, s))}")
             for s in CPU_SHAPES for impl in ("reference", "sdpa-yardstick-different-function")]
    if torch.cuda.is_available():
        for s in CUDA_SHAPES:
            for impl in IMPLS:
                marks = [pytest.mark.cuda]
                if impl == "compiled-reference" and not settings.test_compile():
                    marks.append(pytest.mark.skip(reason="set EPBAN_TEST_COMPILE=1 (compiles for minutes)"))
                if impl.startswith("fused") and not fused_axial_available("cuda"):
                    marks.append(pytest.mark.skip(reason="Triton is not available"))
                cases.append(pytest.param("cuda", s, impl, id=f"{impl}-cuda-{'x'.join(map(str, s))}", marks=marks))
    return cases


@pytest.mark.parametrize("device, shape, impl", _cases())
def test_axial_attention_fwd_bwd(benchmark, device, shape, impl):
    benchmark.group = f"axial {device} {shape} fwd+bwd"
    benchmark.extra_info["implementation"] = impl
    g = torch.Generator().manual_seed(0)
    dtype, fmt = torch.float32, torch.contiguous_format
    if impl == "fused-bf16-channels_last":
        dtype, fmt = torch.bfloat16, torch.channels_last
    inputs = [(0.1 * torch.randn(shape, generator=g)).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
              for _ in range(6)]
    grads = [torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt) for _ in range(2)]
    fn = _directions(impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        for t in inputs:
            t.grad = None
        torch.autograd.backward(fn(*inputs), grads)
        sync()

    step()
    if device == "cpu":
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
