"""Triton kernels of the ResNet stem's tail: bias, ReLU and max-pool in one pass, and its backward.

Forward, per pooled element (n, c, oh, ow), window rows ih = oh*S - P + kh, columns
iw = ow*S - P + kw, 0 <= kh, kw < K, positions outside the input skipped:

    v[kh, kw]             = round(y[n, c, ih, iw] + bias[c])        (rounded to y's dtype)
    out[n, c, oh, ow]     = relu(max over the window of v)          (a NaN wins, as in PyTorch)
    argmax[n, c, oh, ow]  = kh*K + kw of the first maximum in row-major order (int8)

max-pool(relu(v)) = relu(max-pool(v)) because ReLU is monotone, and the rounding to y's dtype
before the comparison makes the maximum and its first position those of PyTorch's
``max_pool2d(relu(y + bias))`` wherever the output is positive (where it is zero, the gradient
is masked anyway, so which zero was first does not matter).

Backward, per input element (n, c, ih, iw), over the at most ceil(K/S)^2 windows that hold it:

    grad_y[n, c, ih, iw] = sum over windows w whose argmax is (ih, iw) of
                           (out[w] > 0 or NaN) ? round(grad[w] + other[w]) : 0

a gather, so every element is written once, in a fixed order, with no zero-fill and no atomics.
``other`` is the second part of a gradient that arrives in two (the loss mode's layer1 block:
its convolution branch and its identity), summed and rounded as PyTorch's add would.

Why: PyTorch runs bias + ReLU (one pass), then max_pool2d with int64 indices (8 bytes per
pooled element), and in the backward threshold_backward of the pooled gradient, then
max_pool2d_with_indices_backward (a zero-fill of the stem's output, then a scatter). Per stem
output element (bf16) that is ~2 + 2 + 2 + 1 bytes forward and ~2 + 2 + 1.5 backward, plus
the indices; here it is 2 bytes read forward and 2 written backward, plus the pooled tensors
(a quarter of the elements). The ResNet stem's output is the largest tensor of the network.
"""
import triton
import triton.language as tl

from .layout import decode_nchw, flat_offsets


@triton.jit
def bias_relu_max_pool_kernel(y_ptr, bias_ptr, out_ptr, argmax_ptr, numel, channels, height, width, out_h, out_w,
                              stride_n, stride_c, stride_h, stride_w,
                              CHANNELS_LAST: tl.constexpr, K: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
                              INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK pooled elements (out and argmax dense in the layout CHANNELS_LAST
    names); y is read through its strides."""
    offs = flat_offsets(BLOCK, INDEX_64)
    mask = offs < numel
    n, c, oh, ow = decode_nchw(offs, channels, out_h, out_w, CHANNELS_LAST)
    base = n * stride_n + c * stride_c
    b = tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    code = tl.zeros([BLOCK], tl.int32)
    for kh in tl.static_range(K):
        ih = oh * S - P + kh
        row_ok = (ih >= 0) & (ih < height)
        for kw in tl.static_range(K):
            iw = ow * S - P + kw
            ok = mask & row_ok & (iw >= 0) & (iw < width)
            v = tl.load(y_ptr + base + ih * stride_h + iw * stride_w, mask=ok, other=0.0).to(tl.float32)
            v = (v + b).to(y_ptr.dtype.element_ty).to(tl.float32)  # as the separate epilogue rounds it
            take = ok & ((v > best) | (v != v))  # the first maximum; a NaN wins (PyTorch's rule)
            best = tl.where(take, v, best)
            code = tl.where(take, kh * K + kw, code)
    out = tl.where(best < 0.0, 0.0, best)  # ReLU; NaN stays NaN
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(argmax_ptr + offs, code.to(tl.int8), mask=mask)


@triton.jit
def max_pool_relu_grad_kernel(grad_ptr, other_ptr, out_ptr, argmax_ptr, res_ptr, numel, channels, height, width,
                              out_h, out_w, stride_n, stride_c, stride_h, stride_w,
                              CHANNELS_LAST: tl.constexpr, HAS_OTHER: tl.constexpr,
                              K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, INDEX_64: tl.constexpr,
                              BLOCK: tl.constexpr):
    """One program per BLOCK input elements (res dense in the layout CHANNELS_LAST names); grad,
    other, out and argmax share the strides given."""
    offs = flat_offsets(BLOCK, INDEX_64)
    mask = offs < numel
    n, c, ih, iw = decode_nchw(offs, channels, height, width, CHANNELS_LAST)
    base = n * stride_n + c * stride_c
    # The windows holding (ih, iw): oh*S in [ih + P - K + 1, ih + P], clipped to the output.
    # (The lower bound's ceil division is taken on a non-negative numerator only.)
    lo_h = tl.maximum(ih + P - K + S, 0) // S
    hi_h = tl.minimum((ih + P) // S, out_h - 1)
    lo_w = tl.maximum(iw + P - K + S, 0) // S
    hi_w = tl.minimum((iw + P) // S, out_w - 1)
    acc = tl.zeros([BLOCK], tl.float32)
    for th in tl.static_range((K + S - 1) // S):
        oh = lo_h + th
        for tw in tl.static_range((K + S - 1) // S):
            ow = lo_w + tw
            ok = mask & (oh <= hi_h) & (ow <= hi_w)
            at = base + oh * stride_h + ow * stride_w
            code = tl.load(argmax_ptr + at, mask=ok, other=-1).to(tl.int32)
            hit = ok & (code == (ih + P - oh * S) * K + (iw + P - ow * S))
            g = tl.load(grad_ptr + at, mask=hit, other=0.0).to(tl.float32)
            if HAS_OTHER:
                g += tl.load(other_ptr + at, mask=hit, other=0.0).to(tl.float32)
                g = g.to(grad_ptr.dtype.element_ty).to(tl.float32)  # the add's rounding
            pooled = tl.load(out_ptr + at, mask=hit, other=0.0).to(tl.float32)
            passes = (pooled > 0.0) | (pooled != pooled)  # threshold_backward's mask: a NaN output passes
            acc += tl.where(hit & passes, g, 0.0)
    tl.store(res_ptr + offs, acc.to(res_ptr.dtype.element_ty), mask=mask)
