"""The metric's input normalisation, dtype cast and layout change in one pass.

``normalise(x, mean, std, dtype=torch.bfloat16, channels_last=True)`` equals
``((x.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(dtype,
memory_format=torch.channels_last)``, bit for bit on CUDA; differentiable in ``x``, twice and
more (``mean`` and ``std`` are constants: they get no gradient). The loss mode prepares both
images with it: PyTorch takes a subtraction, a division and a cast with a layout change (three
passes over the image per input, and a float32 copy first when the SR network's output is bf16),
and backward a layout change and a division; fused, each direction is one read and one write
(``epban.kernels.normalise``, behind the custom ops ``torch.ops.epban.normalise`` and
``normalise_backward``; the backward reads the stem's input gradient through its strides, so
the cut from 8 padded channels back to 3 needs no copy).

``backend``: "auto" (Triton on CUDA, the reference elsewhere), "reference", or "fused" (CUDA, or
CPU under ``TRITON_INTERPRET=1``, where float64 is taken too, for gradcheck). The output is
dense channels_last or contiguous NCHW; the gradient is dense in x's layout (channels_last or
contiguous).
"""
from __future__ import annotations

import torch

from epban.ops._checks import cdiv, check_nchw_float, is_channels_last, memory_format, needs_int64_offsets
from epban.ops.registry import register, triton_auto_ok, triton_unavailable_reason, use_fused

_BLOCK = 1024


def _compute_dtype(dtype):
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def normalise_reference(x, mean, std, *, dtype=None, channels_last=False):
    c, acc = x.shape[1], _compute_dtype(x.dtype)
    out = (x.to(acc) - mean.to(acc).reshape(1, c, 1, 1)) / std.to(acc).reshape(1, c, 1, 1)
    return out.to(dtype or x.dtype, memory_format=memory_format(channels_last))


# ----------------------------------------------------------------------------- checks and dispatch


def fused_normalise_serves(x, dtype=None, backend="auto") -> bool:
    """Whether ``normalise`` takes the Triton kernels for ``x`` and the output ``dtype`` (None:
    x's): the registry's rule for x's device and both dtypes. ValueError for an unknown backend
    or an impossible "fused"."""
    unavailable = None
    for role, t in (("input", x.dtype), ("output", dtype or x.dtype)):
        unavailable = unavailable or triton_unavailable_reason(
            f"the fused normalisation ({role})", x.device, t, interpreter_also=(torch.float64,))
    return use_fused(backend, unavailable, auto_ok=triton_auto_ok(x.device))


def _check_stats(x, name, t):
    if not isinstance(t, torch.Tensor) or t.numel() != x.shape[1] or not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of {x.shape[1]} values (one per channel of x), "
                         f"got {getattr(t, 'shape', type(t).__name__)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def normalise(x, mean, std, *, dtype=None, channels_last=False, backend="auto"):
    """``((x.float() - mean[c]) / std[c]).to(dtype)`` of a (B, C, H, W) tensor, dense
    channels_last or contiguous; ``dtype`` defaults to x's. Computed in float32 (float64 for
    float64 x). See the module docstring."""
    check_nchw_float("x", x)
    _check_stats(x, "mean", mean)
    _check_stats(x, "std", std)
    dtype = dtype or x.dtype
    if fused_normalise_serves(x, dtype, backend):
        acc = _compute_dtype(x.dtype)
        return _normalise_op(x, mean.to(acc).reshape(-1).contiguous(), std.to(acc).reshape(-1).contiguous(), dtype,
                             channels_last)
    return normalise_reference(x, mean, std, dtype=dtype, channels_last=channels_last)


# ----------------------------------------------------------------------------- launchers


def _launch(src, mean, std, dst):
    """One pass of the kernel: dst = (src - mean) / std, or src / std when mean is None."""
    from epban.kernels.normalise import normalise_kernel

    numel = dst.numel()
    if numel:
        normalise_kernel[(cdiv(numel, _BLOCK),)](
            src, std if mean is None else mean, std, dst, numel, *dst.shape[1:], *src.stride(),
            HAS_MEAN=mean is not None, CHANNELS_LAST=is_channels_last(dst),
            INDEX_64=needs_int64_offsets(src, dst, slack=_BLOCK), BLOCK=_BLOCK, num_warps=4,
        )
    return dst


def _launch_normalise(x, mean, std, dtype, channels_last):
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format(channels_last))
    return _launch(x, mean, std, out)


def _launch_grad(grad, std, dtype, channels_last):
    res = torch.empty(grad.shape, dtype=dtype, device=grad.device, memory_format=memory_format(channels_last))
    return _launch(grad, None, std, res)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("epban::normalise", mutates_args=())
def _normalise_op(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype,
                  channels_last: bool) -> torch.Tensor:
    return _launch_normalise(x, mean, std, dtype, channels_last)


@_normalise_op.register_fake
def _(x, mean, std, dtype, channels_last):
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format(channels_last))


@torch.library.custom_op("epban::normalise_backward", mutates_args=())
def _normalise_backward_op(grad: torch.Tensor, std: torch.Tensor, dtype: torch.dtype,
                           channels_last: bool) -> torch.Tensor:
    return _launch_grad(grad, std, dtype, channels_last)


@_normalise_backward_op.register_fake
def _(grad, std, dtype, channels_last):
    return torch.empty(grad.shape, dtype=dtype, device=grad.device, memory_format=memory_format(channels_last))


def _setup_context(ctx, inputs, output):
    x, _, std, _, _ = inputs
    ctx.x_dtype, ctx.x_cl = x.dtype, is_channels_last(x)
    ctx.save_for_backward(std)


def _backward(ctx, grad):
    (std,) = ctx.saved_tensors
    grad_x = _normalise_backward_op(grad, std, ctx.x_dtype, ctx.x_cl) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None


_normalise_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, std, _, _ = inputs
    ctx.grad_dtype, ctx.grad_cl = grad.dtype, is_channels_last(grad)
    ctx.save_for_backward(std)


def _double_backward(ctx, grad_grad_x):
    """The backward is linear in the upstream gradient (grad / std): its own gradient is the
    same division, so second derivatives through the normalisation work."""
    (std,) = ctx.saved_tensors
    grad = _normalise_backward_op(grad_grad_x, std, ctx.grad_dtype, ctx.grad_cl) if ctx.needs_input_grad[0] else None
    return grad, None, None, None


_normalise_backward_op.register_autograd(_double_backward, setup_context=_setup_backward_context)


def _auto_backend(device: torch.device) -> str:
    return "fused" if fused_normalise_serves(torch.empty(0, 0, 0, 0, device=device)) else "reference"


register("normalise", kernels="Triton (kernels/normalise.py)", auto_backend=_auto_backend)
