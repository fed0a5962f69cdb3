"""A convolution's epilogue in one pass: ``act(y + bias (+ residual))``, act = ReLU or identity.

``bias_act(y, bias, residual=None, relu=True)`` equals ``relu(y + bias.view(1, -1, 1, 1) +
residual)``. The loss mode runs its ResNet convolutions without bias and finishes them here:
on CUDA PyTorch adds a cuDNN convolution's bias in a separate broadcast ``add_`` (a strided,
non-vectorised kernel; 84 of them, 0.53 ms, in one bf16 loss step at 16x3x256x256 on an
H100), then ReLU and the residual add take one kernel each. The fused path
(``epban.kernels.bias_act``, a ``torch.library`` custom op, so CUDA graphs and torch.compile
take it) does all of it in one read and one write, in float32, rounded once.

``backend``: "auto" (the Triton kernel on CUDA, the reference elsewhere), "reference", or
"fused" (CUDA, or CPU under ``TRITON_INTERPRET=1``). The fused path needs ``y`` and
``residual`` in one dense layout (both channels_last or both contiguous); other layouts take
the reference. Gradients: ``y`` and ``residual`` get ``grad * (out > 0)`` (ReLU) or ``grad``;
``bias`` its sum over N, H, W.
"""
from __future__ import annotations

from typing import Optional

import torch

from epban.ops._checks import cdiv, check_nchw_float, fused_triton_available, is_channels_last
from epban.ops._fused_op import fused_op

_BLOCK = 2048


def bias_act_reference(y, bias, residual=None, *, relu=True):
    out = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _layout(t):
    """'cl' (channels_last-dense), 'nchw' (contiguous), or None (neither)."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    return "nchw" if t.is_contiguous() else None


def fused_bias_act_available(device, dtype, backend="auto") -> bool:
    """Whether ``backend`` runs the fused kernel for tensors of this device and dtype when their
    layouts allow (ValueError for an impossible "fused")."""
    return fused_triton_available("the fused epilogue", device, dtype, backend)


def fused_bias_act_serves(y, residual=None, backend="auto") -> bool:
    """Whether ``bias_act`` takes the fused path for these tensors (ValueError for an impossible "fused")."""
    if not fused_bias_act_available(y.device, y.dtype, backend):
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


def _launch(y, bias, residual, relu):
    from epban.kernels.bias_act import bias_act_kernel
    from epban.kernels.launch import launch

    out = torch.empty_like(y)  # same dense layout as y
    numel = y.numel()
    if numel:
        channels_last = is_channels_last(y)
        launch(bias_act_kernel, (cdiv(numel, _BLOCK),),
            y, bias.contiguous(), y if residual is None else residual, out, numel, y.shape[1],
            y.shape[2] * y.shape[3], CHANNELS_LAST=channels_last, HAS_RESIDUAL=residual is not None, RELU=relu,
            BLOCK=_BLOCK, num_warps=4,
        )
    return out


@fused_op("epban::bias_act")
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


# ----------------------------------------------------------------------------- ReLU's backward of a sum


def relu_grad_sum_reference(grad, other, out):
    return torch.ops.aten.threshold_backward(grad + other, out, 0)


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
    layout = _layout(grad)
    if (fused_bias_act_available(grad.device, grad.dtype, backend) and layout is not None
            and _layout(other) == layout and _layout(out) == layout):
        return _relu_grad_sum_op(grad, other, out)
    return relu_grad_sum_reference(grad, other, out)


def _launch_relu_grad_sum(grad, other, out):
    from epban.kernels.bias_act import relu_grad_sum_kernel
    from epban.kernels.launch import launch

    res = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        launch(relu_grad_sum_kernel, (cdiv(numel, _BLOCK),), grad, other, out, res, numel, BLOCK=_BLOCK,
               num_warps=4)
    return res


@fused_op("epban::relu_grad_sum")
def _relu_grad_sum_op(grad: torch.Tensor, other: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _launch_relu_grad_sum(grad, other, out)


@_relu_grad_sum_op.register_fake
def _(grad, other, out):
    return torch.empty_like(grad)
