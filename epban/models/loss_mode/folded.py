"""The model's layers for the loss mode, with BatchNorm folded and frozen weights packed.

BatchNorm with inference statistics is folded into the preceding convolution:
``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
A folded convolution followed by a ReLU ends, where the fused epilogue serves (CUDA), in one
``epban.ops.bias_act`` pass: the convolution runs without bias, and the pass adds the bias
(and a BasicBlock's residual and downsample bias) and applies the ReLU, instead of PyTorch's
strided bias ``add_``, the ReLU and the residual add.

GMDC's branches' offset convolutions become one convolution whose output is the packed offset
tensor of the fused deformable convolution, and the branch weights are packed once.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from epban.models.pban import GMDC
from epban.ops.bias_act import bias_act, fused_bias_act_serves
from epban.ops.deform_conv import (
    check_fp32_precision,
    deform_path,
    fused_deform_conv_packed,
    multi_branch_deform_conv,
    pack_weights,
)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing ``bn(conv(x))`` with ``bn`` in inference mode (in float64, then cast back)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    dtype = conv.weight.dtype
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=dtype)
    with torch.no_grad():
        folded.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
        folded.bias.copy_(bias.to(dtype))
    return folded


def conv2d(x: torch.Tensor, conv: nn.Conv2d, bias=None) -> torch.Tensor:
    """``conv``'s convolution of x with ``bias`` in place of its own (None: no bias)."""
    return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Epilogue(nn.Module):
    """A module ending in fused conv epilogues (``fused_epilogue``, ``epilogue_backend``)."""

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the fused epilogue serves x (its device, dtype and layout)."""
        return self.fused_epilogue and fused_bias_act_serves(x, None, self.epilogue_backend)


class ConvReLU(_Epilogue):
    """relu(conv(x)) of a folded conv; where the fused epilogue serves (CUDA), the conv runs
    without bias and ``epban.ops.bias_act`` adds the bias and applies the ReLU in one pass."""

    def __init__(self, conv: nn.Conv2d, fused_epilogue: bool = True):
        super().__init__()
        self.conv = conv
        self.fused_epilogue = fused_epilogue
        self.epilogue_backend = "auto"  # of bias_act; "fused" runs it under TRITON_INTERPRET=1 (tests)

    def conv_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, None)

    def _conv(self, x: torch.Tensor, bias) -> torch.Tensor:
        return conv2d(x, self.conv, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            return bias_act(self._conv(x, None), self.conv.bias, backend=self.epilogue_backend)
        return F.relu(self._conv(x, self.conv.bias))


class _ConvWithPaddedInputGrad(torch.autograd.Function):
    """conv2d(x, weight) without bias, whose input gradient is computed with ``padded_weight``
    (the weight with zero input channels added) and cut back to x's channels: the same values."""

    @staticmethod
    def forward(ctx, x, weight, padded_weight, stride, padding, dilation, groups):
        ctx.save_for_backward(padded_weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (padded_weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        padded_shape = (shape[0], padded_weight.shape[1], shape[2], shape[3])
        grad_x = torch.nn.grad.conv2d_input(padded_shape, padded_weight, grad, stride, padding, dilation, groups)
        return grad_x[:, :shape[1]], None, None, None, None, None, None


class StemConvReLU(ConvReLU):
    """The stem's relu(conv(x)) (7x7, stride 2, 3 input channels).

    On the devices in ``pad_devices`` (CUDA by default), when x requires grad, the input
    gradient is computed with the weight zero-padded to 16 bytes of input channels per pixel
    (8 bf16 or 4 float32 channels) and cut back to 3 channels: the same values. With 3
    channels cuDNN's input gradient takes an unaligned kernel, several times slower than the
    aligned one (docs/performance.md). The forward stays on 3 channels: padded, it would
    multiply the padding's zeros too."""

    def __init__(self, conv: nn.Conv2d, fused_epilogue: bool = True, pad: bool = True):
        super().__init__(conv, fused_epilogue)
        self.pad_devices = {"cuda"} if pad else set()
        self._padded = None  # (weight it was made from, channels, padded weight): frozen weights, made once

    def _padded_weight(self, channels: int) -> torch.Tensor:
        weight = self.conv.weight
        if self._padded is None or self._padded[0] is not weight or self._padded[1] != channels:
            padded = F.pad(weight.detach(), (0, 0, 0, 0, 0, channels - weight.shape[1]))
            if weight.is_contiguous(memory_format=torch.channels_last):
                padded = padded.contiguous(memory_format=torch.channels_last)
            self._padded = (weight, channels, padded)
        return self._padded[2]

    def _conv(self, x: torch.Tensor, bias) -> torch.Tensor:
        if not (x.device.type in self.pad_devices and x.requires_grad and torch.is_grad_enabled()
                and x.shape[1] * x.element_size() < 16):
            return super()._conv(x, bias)
        c = self.conv
        padded_weight = self._padded_weight(16 // x.element_size())
        y = _ConvWithPaddedInputGrad.apply(x, c.weight, padded_weight, c.stride, c.padding, c.dilation, c.groups)
        return y if bias is None else y + bias.view(1, -1, 1, 1)


class EpilogueBasicBlock(_Epilogue):
    """A torchvision BasicBlock with BatchNorm folded:
    ``relu(conv2(relu(conv1(x))) + downsample(x))``. Where the fused epilogue serves (CUDA),
    the convs run without bias and each ends in one ``bias_act`` pass: conv1's bias and ReLU;
    conv2's bias plus the downsample's (both per channel, summed once), the residual and the
    ReLU. Otherwise the same sum from the folded convs as they are."""

    def __init__(self, block: BasicBlock, fused_epilogue: bool = True):
        super().__init__()
        if not isinstance(block, BasicBlock):
            raise ValueError(f"expected torchvision BasicBlocks in the ResNet layers, got {type(block).__name__}")
        self.conv1 = fold_batchnorm(block.conv1, block.bn1)
        self.conv2 = fold_batchnorm(block.conv2, block.bn2)
        self.downsample = None
        bias2 = self.conv2.bias.detach().clone()
        if block.downsample is not None:
            self.downsample = fold_batchnorm(block.downsample[0], block.downsample[1])
            bias2 += self.downsample.bias.detach()
        self.register_buffer("bias2", bias2)  # conv2's and the downsample's biases together
        self.fused_epilogue = fused_epilogue
        self.epilogue_backend = "auto"  # as ConvReLU's

    def fused_parts(self, x: torch.Tensor):
        """(h, out) of the fused-epilogue path: h = relu(conv1(x)), out = the block's output."""
        backend = self.epilogue_backend
        h = bias_act(conv2d(x, self.conv1), self.conv1.bias, backend=backend)
        identity = x if self.downsample is None else conv2d(x, self.downsample)
        return h, bias_act(conv2d(h, self.conv2), self.bias2, identity, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            return self.fused_parts(x)[1]
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + identity)


def fold_resnet_layer(layer: nn.Sequential, fused_epilogue: bool) -> nn.Sequential:
    """A ResNet layer (torchvision BasicBlocks) as EpilogueBasicBlocks."""
    return nn.Sequential(*(EpilogueBasicBlock(block, fused_epilogue) for block in layer))


class PackedGMDC(nn.Module):
    """GMDC with one offset conv for all branches and pre-packed branch weights (frozen)."""

    def __init__(self, gmdc: GMDC, fp32_precision: str | None = None):
        super().__init__()
        self.kernel_sizes = tuple(gmdc.kernel_sizes)
        gens = list(gmdc.param_generators)
        ref = gens[0]
        self.offset_conv = nn.Conv2d(ref.in_channels, sum(g.out_channels for g in gens), 3, padding=1,
                                     device=ref.weight.device, dtype=ref.weight.dtype)
        with torch.no_grad():
            self.offset_conv.weight.copy_(torch.cat([g.weight for g in gens]))
            self.offset_conv.bias.copy_(torch.cat([g.bias for g in gens]))
        self.register_buffer("weight", pack_weights([w.detach() for w in gmdc.weights]))
        self.register_buffer("bias", torch.cat([b.detach() for b in gmdc.biases]))
        self.merge_conv = gmdc.merge_conv
        self.backend = gmdc.backend
        self.fp32_precision = check_fp32_precision(fp32_precision)
        self._unpacked_cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = self.offset_conv(x)
        if deform_path(x, self.backend) == "fused":
            out = fused_deform_conv_packed(x, offsets, self.weight, self.bias, self.kernel_sizes,
                                           fp32_precision=self.fp32_precision)
        else:
            out = multi_branch_deform_conv(x, *self._unpacked(offsets), backend=self.backend)
        return self.merge_conv(out)

    def _unpacked(self, offsets):
        sizes = [k * k for k in self.kernel_sizes]
        offs = list(torch.split(offsets, [2 * s for s in sizes], dim=1))
        return offs, *self._unpacked_weights()

    def _unpacked_weights(self):
        """The per-branch (OB, C, k, k) weights and biases for the non-fused paths, made once:
        the weights are frozen, and the gather path's matmul needs them contiguous (unpacking
        them per call would copy every branch's weights each time). Remade if the module moves."""
        cached = self._unpacked_cache
        if cached is None or cached[0] is not self.weight:  # .to() and friends replace the buffer
            ob, c = self.weight.shape[-1], self.weight.shape[1]
            weights = [w.reshape(k, k, c, ob).permute(3, 2, 0, 1).contiguous()
                       for w, k in zip(torch.split(self.weight, [k * k for k in self.kernel_sizes]),
                                       self.kernel_sizes)]
            cached = self._unpacked_cache = (self.weight, weights, list(torch.split(self.bias, ob)))
        return cached[1], cached[2]
