"""A convolution's epilogue in one pass: ``act(y + bias (+ residual))``, act = ReLU or identity.

``bias_act(y, bias, residual=None, relu=True)`` equals ``relu(y + bias.view(1, -1, 1, 1) +
residual)``. The loss mode runs its ResNet convolutions without bias and finishes them here:
on CUDA PyTorch adds a cuDNN convolution's bias in a separate broadcast ``add_`` (a strided,
non-vectorised kernel), then ReLU and the residual add take one kernel each. The fused path
(``epban.kernels.bias_act``, behind the custom op ``torch.ops.epban.bias_act``) does all of
it in one read and one write, in float32, rounded once.

``relu_grad_sum(grad, other, out)`` is ReLU's backward of a gradient that arrives in two parts:
``threshold_backward(grad + other, out, 0)`` in one pass (``torch.ops.epban.relu_grad_sum``).

``backend``: "auto" (the Triton kernel on CUDA, the reference elsewhere), "reference", or
"fused" (CUDA, or CPU under ``TRITON_INTERPRET=1``). The fused path needs its tensors in one
dense layout (all channels_last or all contiguous); other layouts take the reference.
Gradients of ``bias_act``: ``y`` and ``residual`` get ``grad * (out > 0)`` (ReLU) or ``grad``;
``bias`` its sum over N, H, W.
"""
from __future__ import annotations

from typing import Optional

import torch

from epban.ops._checks import cdiv, check_nchw_float, is_channels_last
from epban.ops.registry import register, triton_auto_ok, triton_unavailable_reason, use_fused

_BLOCK = 2048


# ----------------------------------------------------------------------------- references


def bias_act_reference(y, bias, residual=None, *, relu=True):
    out = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def relu_grad_sum_reference(grad, other, out):
    return torch.ops.aten.threshold_backward(grad + other, out, 0)


# ----------------------------------------------------------------------------- checks and dispatch


def _layout(t):
    """'cl' (channels_last-dense), 'nchw' (contiguous), or None (neither)."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    return "nchw" if t.is_contiguous() else None


def fused_bias_act_serves(y, residual=None, backend="auto") -> bool:
    """Whether ``bias_act`` takes the fused kernel for these tensors: the registry's rule for
    y's device and dtype, and ``y`` and ``residual`` in one dense layout. ValueError for an
    unknown backend or an impossible "fused"."""
    unavailable = triton_unavailable_reason("the fused epilogue", y.device, y.dtype)
    if not use_fused(backend, unavailable, auto_ok=triton_auto_ok(y.device)):
        return False
    layout = _layout(y)
    return layout is not None and (residual is None or _layout(residual) == layout)


def check_bias_act_args(y, bias, residual) -> None:
    check_nchw_float("y", y)
    if not isinstance(bias, torch.Tensor) or bias.shape != (y.shape[1],):
        raise ValueError(f"bias must be a tensor of shape ({y.shape[1]},) (y's channels), "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")
    if bias.device != y.device:
        raise ValueError(f"bias must be on y's device {y.device}, got {bias.device}")
    if residual is not None:
        check_nchw_float("residual", residual)
        if residual.shape != y.shape or residual.dtype != y.dtype or residual.device != y.device:
            raise ValueError(f"residual must match y (shape {tuple(y.shape)}, {y.dtype}, {y.device}), got "
                             f"shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}")


def bias_act(y, bias, residual=None, *, relu=True, backend="auto"):
    """``act(y + bias[c] (+ residual))`` of a (B, C, H, W) tensor; see the module docstring."""
    check_bias_act_args(y, bias, residual)
    if fused_bias_act_serves(y, residual, backend):
        return _bias_act_op(y, bias, residual, relu)
    return bias_act_reference(y, bias, residual, relu=relu)


def relu_grad_sum(grad, other, out, *, backend="auto"):
    """``threshold_backward(grad + other, out, 0)`` in one pass: the gradient reaching a ReLU's
    output ``out`` in two parts (a residual block's convolution branch and its identity) summed
    and masked where ``out <= 0``. A backward helper of the loss mode (no gradient of its own).
    The fused path needs the three tensors in one dense layout; others take the reference."""
    for name, t in (("grad", grad), ("other", other), ("out", out)):
        check_nchw_float(name, t)
        if t.shape != grad.shape or t.dtype != grad.dtype or t.device != grad.device:
            raise ValueError(f"{name} must match grad (shape {tuple(grad.shape)}, {grad.dtype}, {grad.device}), "
                             f"got shape {tuple(t.shape)}, {t.dtype}, {t.device}")
    if fused_bias_act_serves(grad, other, backend) and _layout(out) == _layout(grad):
        return _relu_grad_sum_op(grad, other, out)
    return relu_grad_sum_reference(grad, other, out)


# ----------------------------------------------------------------------------- launchers


def _launch(y, bias, residual, relu):
    from epban.kernels.bias_act import bias_act_kernel

    out = torch.empty_like(y)  # same dense layout as y
    numel = y.numel()
    if numel:
        bias_act_kernel[(cdiv(numel, _BLOCK),)](
            y, bias.contiguous(), y if residual is None else residual, out, numel, y.shape[1],
            y.shape[2] * y.shape[3], CHANNELS_LAST=is_channels_last(y), HAS_RESIDUAL=residual is not None,
            RELU=relu, BLOCK=_BLOCK, num_warps=4,
        )
    return out


def _launch_relu_grad_sum(grad, other, out):
    from epban.kernels.bias_act import relu_grad_sum_kernel

    res = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        relu_grad_sum_kernel[(cdiv(numel, _BLOCK),)](grad, other, out, res, numel, BLOCK=_BLOCK, num_warps=4)
    return res


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("epban::bias_act", mutates_args=())
def _bias_act_op(y: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return _launch(y, bias, residual, relu)


@_bias_act_op.register_fake
def _(y, bias, residual, relu):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, bias, residual, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(output if relu else None)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    # ReLU's own backward (threshold_backward): the gradient where the output is positive.
    grad_y = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
    grad_bias = grad_y.sum(dim=(0, 2, 3)).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
    return grad_y, grad_bias, grad_y if ctx.has_residual else None, None


_bias_act_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("epban::relu_grad_sum", mutates_args=())
def _relu_grad_sum_op(grad: torch.Tensor, other: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _launch_relu_grad_sum(grad, other, out)


@_relu_grad_sum_op.register_fake
def _(grad, other, out):
    return torch.empty_like(grad)


def _auto_backend(device: torch.device) -> str:
    return "fused" if fused_bias_act_serves(torch.empty(0, 0, 0, 0, device=device)) else "reference"


register("bias_act", kernels="Triton (kernels/bias_act.py)", auto_backend=_auto_backend)
