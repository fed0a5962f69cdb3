"""Triton kernel of a convolution's epilogue: per-channel bias, optional residual, optional ReLU.

    out[n, c, h, w] = act(y[n, c, h, w] + bias[c] (+ residual[n, c, h, w]))    act = ReLU or identity

in float32, rounded once to the output dtype. ``y``, ``residual`` and ``out`` share one dense
layout, walked as a flat array: channels_last (c = i mod C) or contiguous NCHW
(c = (i div HW) mod C).

Why: PyTorch's cuDNN convolution adds its bias in a separate broadcast ``add_`` (a strided,
non-vectorised elementwise kernel), then ReLU and the residual add are one kernel each. Run
without bias, the convolution's output gets all three here in one read and one write
(two reads with a residual). Floor: 2 (3) x the tensor's bytes of DRAM traffic, no FLOPs to
speak of.
"""
import triton
import triton.language as tl


@triton.jit
def bias_act_kernel(y_ptr, bias_ptr, res_ptr, out_ptr, numel, channels, plane,
                    CHANNELS_LAST: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CHANNELS_LAST:
        c = offs % channels
    else:
        c = (offs // plane) % channels
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as torch.relu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu_grad_sum_kernel(grad_ptr, other_ptr, out_ptr, res_ptr, numel, BLOCK: tl.constexpr):
    """res = grad + other where out > 0, else 0: threshold_backward(grad + other, out, 0), a NaN
    ``out`` passing the gradient as there. ReLU's backward of a gradient that arrives in two
    parts (a residual block's convolution branch and its identity) in one launch: 3 tensor
    reads and 1 write, where PyTorch's add then threshold_backward take two launches and
    4 reads + 2 writes. The sum is taken in float32 and rounded once to the gradient's dtype,
    as PyTorch's add rounds it; the mask only selects: the same values."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g += tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_ptr + offs, tl.where(out <= 0.0, 0.0, g).to(res_ptr.dtype.element_ty), mask=mask)
