"""Triton kernels of the metric's input normalisation, cast and layout change in one pass.

Forward, per element of the output (dense in its layout, CHANNELS_LAST or contiguous NCHW;
the input read through its strides, any float dtype):

    out[n, c, h, w] = round_to_out_dtype((float32(x[n, c, h, w]) - mean[c]) / std[c])

(float64 instead of float32 for float64 x, under the interpreter), with the subtraction and
the division each rounded to float32 (``div_rn``: IEEE division, as
PyTorch's), so the values are those of ``((x.float() - mean) / std).to(dtype, memory_format)``.
Backward, per element of dL/dx (dense in x's layout; the upstream gradient read through its
strides, e.g. the stem's input gradient cut from 8 padded channels back to 3):

    grad_x[n, c, h, w] = round_to_x_dtype(float32(grad[n, c, h, w]) / std[c])

Why: PyTorch runs a subtraction, a division and a cast with a layout change, three passes
over the image (and its float32 copy when the SR network's output is bf16) per input, and a
layout change and a division backward. Here each direction is one read and one write.
"""
import triton
import triton.language as tl

from .layout import decode_nchw, flat_offsets


@triton.jit
def _divide(a, b):
    """a / b rounded once: div_rn for float32 (Triton's default float32 division may be off by
    an ulp or two), the IEEE division for float64."""
    if b.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def normalise_kernel(src_ptr, mean_ptr, std_ptr, dst_ptr, numel, channels, height, width,
                     stride_n, stride_c, stride_h, stride_w,
                     HAS_MEAN: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                     BLOCK: tl.constexpr):
    """dst = (src - mean[c]) / std[c], or src / std[c] without HAS_MEAN (the backward: the
    gradient through x - mean is the gradient itself). dst is dense in the layout CHANNELS_LAST
    names; src is read through its strides; std (and mean) are float32, or float64 for float64."""
    offs = flat_offsets(BLOCK, INDEX_64)
    mask = offs < numel
    n, c, h, w = decode_nchw(offs, channels, height, width, CHANNELS_LAST)
    src = tl.load(src_ptr + n * stride_n + c * stride_c + h * stride_h + w * stride_w, mask=mask, other=0.0)
    std = tl.load(std_ptr + c, mask=mask, other=1.0)
    centred = src.to(std.dtype)
    if HAS_MEAN:
        centred -= tl.load(mean_ptr + c, mask=mask, other=0.0)
    tl.store(dst_ptr + offs, _divide(centred, std).to(dst_ptr.dtype.element_ty), mask=mask)
