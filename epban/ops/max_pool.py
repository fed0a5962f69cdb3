"""The ResNet stem's tail in one pass: ``max_pool2d(relu(y + bias))``, and its backward.

``bias_relu_max_pool2d(y, bias, kernel_size, stride, padding)`` returns ``(out, argmax)``:
``out`` equals ``F.max_pool2d(F.relu(y + bias.view(1, -1, 1, 1)), kernel_size, stride,
padding)``; ``argmax`` (int8, out's shape) is the window position ``kh * kernel_size + kw`` of
each maximum. ``max_pool2d_relu_grad(grad, other, out, argmax, input_size, ...)`` is the
gradient at ``y``: ``grad (+ other)`` masked where ``out <= 0`` (ReLU) and sent to each
window's maximum (max-pool), one gather pass.

The loss mode runs its stem conv without bias and finishes it here (its largest tensor: the
stem's output, 64 channels at half the input's resolution). PyTorch takes bias + ReLU, then
max_pool2d with int64 indices, and backward a threshold_backward, then a zero-fill and a
scatter: ~5 passes over the stem output's size and 8 bytes of index per pooled element. Fused
(``epban.kernels.max_pool`` holds the math, behind the custom ops
``torch.ops.epban.bias_relu_max_pool2d`` and ``max_pool2d_relu_grad``): the stem's output is
read once forward and written once backward, and no full-size ReLU output or index tensor is
kept.

``backend``: "auto" (Triton on CUDA, the reference elsewhere), "reference", or "fused" (CUDA, or
CPU under ``TRITON_INTERPRET=1``). Pooling: dilation 1, ``ceil_mode=False``, ``padding <=
kernel_size // 2`` (PyTorch's rule), ``kernel_size <= 11`` (int8 positions). The fused path
writes its outputs channels_last when ``y`` is channels_last, contiguous otherwise; the
reference's layouts are PyTorch's. Where ``out`` is 0 every window position had ``y + bias
<= 0`` and the gradient there is 0; ``argmax`` is the first maximum of ``y + bias`` in the
fused path and of ``relu(y + bias)`` in the reference: they may differ only there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from epban.ops._checks import cdiv, check_nchw_float, is_channels_last, memory_format, needs_int64_offsets
from epban.ops.bias_act import bias_act_reference, check_bias_act_args
from epban.ops.registry import register, triton_auto_ok, triton_unavailable_reason, use_fused

_BLOCK = 512  # 4 elements a thread with 4 warps: the window loop's registers leave several programs per SM
MAX_KERNEL = 11  # kernel positions kh * K + kw fit int8


def _square(name, value) -> int:
    a, b = _pair(value)
    if a != b or not isinstance(a, int) or a < 0:
        raise ValueError(f"{name} must be one non-negative int (square pooling), got {value!r}")
    return a


def pool_geometry(kernel_size, stride=None, padding=0):
    """(K, S, P) as ints, checked: ValueError for what the kernels do not take."""
    k = _square("kernel_size", kernel_size)
    s = k if stride is None else _square("stride", stride)
    p = _square("padding", padding)
    if not 1 <= k <= MAX_KERNEL or s < 1:
        raise ValueError(f"kernel_size must be in [1, {MAX_KERNEL}] and stride >= 1, got {k} and {s}")
    if p > k // 2:
        raise ValueError(f"padding must be at most kernel_size // 2 = {k // 2}, got {p}")
    return k, s, p


def pooled_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def fused_stem_pool_serves(t, backend="auto") -> bool:
    """Whether the stem pool's ops take the Triton kernels for tensors of ``t``'s device and
    dtype (``y`` forward, ``out`` backward; any strides): the registry's rule. ValueError for an
    unknown backend or an impossible "fused"."""
    unavailable = triton_unavailable_reason("the fused stem pool", t.device, t.dtype)
    return use_fused(backend, unavailable, auto_ok=triton_auto_ok(t.device))


# ----------------------------------------------------------------------------- reference


def _argmax_from_indices(indices, width, k, s, p):
    """PyTorch's flat input indices (ih * W + iw) of a max-pool as window positions kh * K + kw."""
    oh = torch.arange(indices.shape[2], device=indices.device).view(1, 1, -1, 1)
    ow = torch.arange(indices.shape[3], device=indices.device).view(1, 1, 1, -1)
    kh = indices // width - (oh * s - p)
    kw = indices % width - (ow * s - p)
    return (kh * k + kw).to(torch.int8)


def bias_relu_max_pool2d_reference(y, bias, kernel_size, stride=None, padding=0):
    k, s, p = pool_geometry(kernel_size, stride, padding)
    out, indices = F.max_pool2d(bias_act_reference(y, bias), k, s, p, return_indices=True)
    return out, _argmax_from_indices(indices, y.shape[3], k, s, p)


def max_pool2d_relu_grad_reference(grad, other, out, argmax, input_size, kernel_size, stride=None, padding=0):
    """threshold_backward(grad + other, out, 0), sent to each window's maximum (summed in float32)."""
    k, s, p = pool_geometry(kernel_size, stride, padding)
    h, w = input_size
    g = torch.ops.aten.threshold_backward(grad if other is None else grad + other, out, 0)
    code = argmax.long()
    oh = torch.arange(out.shape[2], device=out.device).view(1, 1, -1, 1)
    ow = torch.arange(out.shape[3], device=out.device).view(1, 1, 1, -1)
    flat = (oh * s - p + code // k) * w + (ow * s - p + code % k)
    n, c = out.shape[:2]
    res = torch.zeros(n, c, h * w, dtype=torch.float32, device=out.device)
    res.scatter_add_(2, flat.flatten(2), g.float().flatten(2))
    return res.view(n, c, h, w).to(grad.dtype).contiguous(memory_format=memory_format(is_channels_last(out)))


# ----------------------------------------------------------------------------- public ops


def bias_relu_max_pool2d(y, bias, kernel_size, stride=None, padding=0, *, backend="auto"):
    """``(max_pool2d(relu(y + bias[c])), argmax)`` of a (B, C, H, W) tensor; see the module
    docstring. Differentiable in ``y`` and ``bias`` (the fused path's backward is one gather)."""
    check_bias_act_args(y, bias, None)
    k, s, p = pool_geometry(kernel_size, stride, padding)
    if y.shape[2] + 2 * p < k or y.shape[3] + 2 * p < k:
        raise ValueError(f"y's {tuple(y.shape[2:])} pixels (padded by {p}) are smaller than the {k}x{k} window")
    if fused_stem_pool_serves(y, backend):
        return _bias_relu_max_pool_op(y, bias, k, s, p)
    return bias_relu_max_pool2d_reference(y, bias, k, s, p)


def max_pool2d_relu_grad(grad, other, out, argmax, input_size, kernel_size, stride=None, padding=0, *,
                         backend="auto"):
    """The gradient at ``y`` of ``bias_relu_max_pool2d``'s ``out`` for an upstream gradient
    ``grad + other`` (``other`` may be None), from ``out`` and ``argmax``: (B, C, *input_size),
    in out's layout. A backward helper (no gradient of its own)."""
    k, s, p = pool_geometry(kernel_size, stride, padding)
    for name, t in (("grad", grad), ("other", other), ("out", out)):
        if t is None and name == "other":
            continue
        check_nchw_float(name, t)
        if t.shape != out.shape or t.dtype != out.dtype or t.device != out.device:
            raise ValueError(f"{name} must match out (shape {tuple(out.shape)}, {out.dtype}, {out.device}), "
                             f"got shape {tuple(t.shape)}, {t.dtype}, {t.device}")
    if not isinstance(argmax, torch.Tensor) or argmax.shape != out.shape or argmax.dtype != torch.int8:
        raise ValueError(f"argmax must be an int8 tensor of out's shape {tuple(out.shape)}")
    h, w = (int(v) for v in input_size)
    if (pooled_size(h, k, s, p), pooled_size(w, k, s, p)) != tuple(out.shape[2:]):
        raise ValueError(f"input_size {(h, w)} does not pool to out's {tuple(out.shape[2:])} with "
                         f"kernel {k}, stride {s}, padding {p}")
    if fused_stem_pool_serves(out, backend):
        return _max_pool_relu_grad_op(grad, other, out, argmax, h, w, k, s, p)
    return max_pool2d_relu_grad_reference(grad, other, out, argmax, (h, w), k, s, p)


# ----------------------------------------------------------------------------- launchers


def _launch_pool(y, bias, k, s, p):
    from epban.kernels.max_pool import bias_relu_max_pool_kernel

    n, c, h, w = y.shape
    cl = is_channels_last(y)
    size = (n, c, pooled_size(h, k, s, p), pooled_size(w, k, s, p))
    out = torch.empty(size, dtype=y.dtype, device=y.device, memory_format=memory_format(cl))
    argmax = torch.empty(size, dtype=torch.int8, device=y.device, memory_format=memory_format(cl))
    numel = out.numel()
    if numel:
        bias_relu_max_pool_kernel[(cdiv(numel, _BLOCK),)](
            y, bias.contiguous(), out, argmax, numel, c, h, w, size[2], size[3], *y.stride(),
            CHANNELS_LAST=cl, K=k, S=s, P=p, INDEX_64=needs_int64_offsets(y, out, slack=_BLOCK), BLOCK=_BLOCK,
            num_warps=4,
        )
    return out, argmax


def _launch_grad(grad, other, out, argmax, h, w, k, s, p):
    from epban.kernels.max_pool import max_pool_relu_grad_kernel

    cl = is_channels_last(out)
    fmt = memory_format(cl)
    # grad, other and argmax are read with out's strides: bring any other layout to out's.
    grad, argmax = grad.contiguous(memory_format=fmt), argmax.contiguous(memory_format=fmt)
    other = None if other is None else other.contiguous(memory_format=fmt)
    out = out.contiguous(memory_format=fmt)
    n, c = out.shape[:2]
    res = torch.empty((n, c, h, w), dtype=out.dtype, device=out.device, memory_format=fmt)
    numel = res.numel()
    if numel:
        max_pool_relu_grad_kernel[(cdiv(numel, _BLOCK),)](
            grad, grad if other is None else other, out, argmax, res, numel, c, h, w, out.shape[2], out.shape[3],
            *out.stride(), CHANNELS_LAST=cl, HAS_OTHER=other is not None, K=k, S=s, P=p,
            INDEX_64=needs_int64_offsets(res, out, slack=_BLOCK), BLOCK=_BLOCK, num_warps=4,
        )
    return res


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("epban::bias_relu_max_pool2d", mutates_args=())
def _bias_relu_max_pool_op(y: torch.Tensor, bias: torch.Tensor, k: int, s: int,
                           p: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_pool(y, bias, k, s, p)


@_bias_relu_max_pool_op.register_fake
def _(y, bias, k, s, p):
    n, c, h, w = y.shape
    size = (n, c, pooled_size(h, k, s, p), pooled_size(w, k, s, p))
    fmt = memory_format(is_channels_last(y))
    return (torch.empty(size, dtype=y.dtype, device=y.device, memory_format=fmt),
            torch.empty(size, dtype=torch.int8, device=y.device, memory_format=fmt))


@torch.library.custom_op("epban::max_pool2d_relu_grad", mutates_args=())
def _max_pool_relu_grad_op(grad: torch.Tensor, other: Optional[torch.Tensor], out: torch.Tensor,
                           argmax: torch.Tensor, h: int, w: int, k: int, s: int, p: int) -> torch.Tensor:
    return _launch_grad(grad, other, out, argmax, h, w, k, s, p)


@_max_pool_relu_grad_op.register_fake
def _(grad, other, out, argmax, h, w, k, s, p):
    return torch.empty((*out.shape[:2], h, w), dtype=out.dtype, device=out.device,
                       memory_format=memory_format(is_channels_last(out)))


def _setup_context(ctx, inputs, output):
    y, bias, k, s, p = inputs
    ctx.geometry = (y.shape[2], y.shape[3], k, s, p)
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(*output)


def _backward(ctx, grad, _grad_argmax):
    out, argmax = ctx.saved_tensors
    h, w, k, s, p = ctx.geometry
    grad_y = _max_pool_relu_grad_op(grad, None, out, argmax, h, w, k, s, p)
    grad_bias = grad_y.sum(dim=(0, 2, 3)).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
    return grad_y, grad_bias, None, None, None


_bias_relu_max_pool_op.register_autograd(_backward, setup_context=_setup_context)


def _auto_backend(device: torch.device) -> str:
    return "fused" if fused_stem_pool_serves(torch.empty(0, device=device)) else "reference"


register("stem_pool", kernels="Triton (kernels/max_pool.py)", auto_backend=_auto_backend)
