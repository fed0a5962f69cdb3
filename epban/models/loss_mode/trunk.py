"""The loss mode's trunk: stem, max-pool and ResNet layers 1-3, with its backward as one node.

With the fused epilogues, and when the input wants a gradient, everything after the stem
convolution runs as one autograd node (``ResidualChain``) whose backward is written out:

- at every block boundary, a block's two input-gradient branches are summed and the previous
  block's ReLU mask applied in one pass (``epban.ops.bias_act.relu_grad_sum``) instead of an
  add and a threshold_backward;
- the stem's ReLU mask is applied at the pooled output (4x fewer elements) instead of the
  stem's output (``fused_residual_grad``);
- the stem's tail (the conv's bias, ReLU and the 3x3 stride-2 max-pool) is one pass that writes
  the pooled output and an int8 window position per pooled element, and its backward one
  gather (``epban.ops.max_pool``), instead of bias + ReLU, max_pool2d with int64 indices, and a
  zero-fill and scatter backward: the stem's output (the network's largest tensor) is read once
  forward and written once backward, and no full-size ReLU output or index tensor is kept
  (``fused_stem_pool``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from epban.models.loss_mode.folded import StemConvReLU
from epban.ops.bias_act import bias_act, relu_grad_sum
from epban.ops.max_pool import bias_relu_max_pool2d, fused_stem_pool_serves, max_pool2d_relu_grad, pool_geometry


def _input_grad(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """dL/dx of a frozen conv(x): the input gradient alone, by the same call (and so the same
    cuDNN kernels and output layout) as autograd's ConvolutionBackward."""
    return torch.ops.aten.convolution_backward(grad, x, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                               False, [0] * len(conv.stride), conv.groups, [True, False, False])[0]


class ResidualChain(torch.autograd.Function):
    """EpilogueBasicBlocks in sequence (fused epilogues; the loss mode's layers 1-3) as one
    autograd node, with a backward for its input only (the weights are frozen). Per block it
    runs what autograd would: ReLU masks (threshold_backward), the convolutions' input
    gradients, the sum of the conv and identity branches at the block's input. But that sum
    and the previous block's output mask are one pass (``relu_grad_sum``): one launch and two
    tensor passes fewer per block boundary, and the block outputs it keeps are what autograd
    would keep."""

    @staticmethod
    def forward(ctx, x, blocks, stem=None):
        """``stem``: None, or (bias, pool, backend, fused_pool) when x is the stem conv's output
        without its bias: then the chain starts with the stem's epilogue (bias, ReLU) and the
        max-pool, in one pass when ``fused_pool`` (``bias_relu_max_pool2d``)."""
        entry = []
        ctx.fused_pool = False
        if stem is not None:
            bias, pool, backend, fused_pool = stem
            if fused_pool:
                ctx.fused_pool, ctx.stem_size = True, tuple(x.shape[2:])
                x, argmax = bias_relu_max_pool2d(x, bias, pool.kernel_size, pool.stride, pool.padding,
                                                 backend=backend)
                entry = [argmax]
            else:
                relu_out = bias_act(x, bias, backend=backend)
                x, indices = F.max_pool2d(relu_out, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                          pool.ceil_mode, return_indices=True)
                entry = [relu_out, indices]
        saved = [x]
        for block in blocks:
            h, x = block.fused_parts(x)
            saved += [h, x]
        ctx.blocks, ctx.pool = blocks, (stem[1] if stem is not None else None)
        ctx.save_for_backward(*saved, *entry)
        return x

    @staticmethod
    @once_differentiable  # a second derivative through it is refused, with PyTorch's message
    def backward(ctx, grad):
        blocks, pool = ctx.blocks, ctx.pool
        saved = ctx.saved_tensors
        n = 2 * len(blocks) + 1
        saved, entry = saved[:n], saved[n:]
        grad_pre = torch.ops.aten.threshold_backward(grad, saved[-1], 0)  # at the last block's output
        for k in range(len(blocks) - 1, -1, -1):
            block = blocks[k]
            x, h = saved[2 * k], saved[2 * k + 1]
            grad_h = torch.ops.aten.threshold_backward(_input_grad(grad_pre, h, block.conv2), h, 0)
            grad_conv = _input_grad(grad_h, x, block.conv1)
            grad_identity = grad_pre if block.downsample is None else _input_grad(grad_pre, x, block.downsample)
            if k == 0 and ctx.fused_pool:  # the sum, the stem's ReLU mask and the pool's backward in one gather
                grad_pre = max_pool2d_relu_grad(grad_conv, grad_identity, x, entry[0], ctx.stem_size,
                                                pool.kernel_size, pool.stride, pool.padding,
                                                backend=block.epilogue_backend)
                return grad_pre, None, None
            if k or entry:  # x is a ReLU's output (the previous block's, or the pooled stem's): mask with the sum
                grad_pre = relu_grad_sum(grad_conv, grad_identity, x, backend=block.epilogue_backend)
            else:
                grad_pre = grad_conv + grad_identity
        if entry:
            # The pool's backward writes only the positions it took, whose stem output equals the
            # pooled value: masked above where that is <= 0, which is the stem ReLU's mask there.
            # So the stem's own threshold_backward (its largest tensor) is not needed.
            relu_out, indices = entry
            grad_pre = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_pre, relu_out, _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding),
                _pair(pool.dilation), pool.ceil_mode, indices)
        return grad_pre, None, None


def fusable_pool(pool: nn.Module) -> bool:
    """Whether ``bias_relu_max_pool2d`` computes this max-pool (square, dilation 1, floor mode)."""
    if not isinstance(pool, nn.MaxPool2d) or pool.ceil_mode or _pair(pool.dilation) != (1, 1):
        return False
    try:
        pool_geometry(pool.kernel_size, pool.stride, pool.padding)
    except ValueError:
        return False
    return True


class Trunk(nn.Module):
    """layer3(layer2(layer1(maxpool(stem(x))))): an image's features for block2.

    ``stem``: the folded stem conv with its ReLU; ``layers``: ResNet layers 1-3 of
    EpilogueBasicBlocks. When x wants a gradient and the fused epilogues serve, all of it after
    the stem conv is one ``ResidualChain`` (``fused_residual_grad``); the stem's bias, ReLU and
    pool are one pass where ``fused_stem_pool`` (and the pool is one the kernel computes).
    """

    def __init__(self, stem: StemConvReLU, pool: nn.MaxPool2d, layers: Sequence[nn.Sequential], *,
                 fused_residual_grad: bool = True, fused_stem_pool: bool = True):
        super().__init__()
        self.stem = stem
        self.pool = pool
        self.layers = nn.Sequential(*layers)
        self.fused_residual_grad = fused_residual_grad
        self.fused_stem_pool = fused_stem_pool and fusable_pool(pool)

    def blocks(self) -> tuple:
        return tuple(block for layer in self.layers for block in layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem, pool = self.stem, self.pool
        backend = stem.epilogue_backend
        fused = stem.fused(x)
        fused_pool = self.fused_stem_pool and fused and fused_stem_pool_serves(x, backend)
        blocks = self.blocks()
        if (self.fused_residual_grad and x.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and fused and all(b.fused(x) for b in blocks)):
            return ResidualChain.apply(stem.conv_without_bias(x), blocks, (stem.conv.bias, pool, backend, fused_pool))
        if fused_pool:  # the HR image's trunk (no gradient), or autograd's block-by-block backward
            h, _ = bias_relu_max_pool2d(stem.conv_without_bias(x), stem.conv.bias, pool.kernel_size, pool.stride,
                                        pool.padding, backend=backend)
            return self.layers(h)
        return self.layers(pool(stem(x)))
