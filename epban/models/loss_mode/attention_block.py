"""block2 of the loss mode: the model's bi-directional attention block, built for a frozen loss.

The same computation as ``epban.models.pban.BiAttentionBlock``, from its modules, with:
- GMDC's branches packed (``PackedGMDC``), after_block1/2 with BatchNorm folded and a fused
  epilogue (``ConvReLU``);
- the SE gate's spatial mean with a backward that keeps channels_last (``spatial_mean``);
- ``batch_gates``: one SE call on both directions' outputs stacked along the batch instead
  of one per direction. SE works image by image, so the values are the same; one SE forward
  and backward is about forty small operators (five convs, tanh, sigmoid, pixel shuffle,
  products, their gradients), launch-bound on the loss mode's feature maps, so batched a
  step issues one set instead of two, plus a concatenation forward and one backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from epban.models.loss_mode.folded import ConvReLU, PackedGMDC, fold_batchnorm
from epban.models.pban import SE, BiAttentionBlock
from epban.ops.axial_attention import bi_axial_attention


class _SpatialMean(torch.autograd.Function):
    """x.mean((2, 3), keepdim=True), whose backward returns dL/dmean / (H W) as an expanded
    view. The default backward materialises that broadcast as a contiguous NCHW tensor; added
    to the channels_last gradients of the gate's other inputs it made the attention's output
    gradient NCHW (mixed-layout, non-vectorised elementwise kernels, then a layout copy). The
    view costs no buffer and lets the sum take the channels_last layout of the other terms."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return (grad / (ctx.shape[2] * ctx.shape[3])).expand(ctx.shape)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """The channel gate's global average pool (the values of adaptive_avg_pool2d(x, 1))."""
    return _SpatialMean.apply(x)


class Gate(nn.Module):
    """The model's SE gate, ``x * pixel_gate(x) * channel_gate(x)``, from its modules, with the
    channel gate's mean taken by ``spatial_mean``."""

    def __init__(self, se: SE):
        super().__init__()
        self.subchannel_before = se.subchannel_before
        self.subchannel_after = se.subchannel_after
        self.shuffle = se.shuffle
        self.pixelse = se.pixelse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.subchannel_after(self.shuffle(self.subchannel_before(spatial_mean(x))))
        return x * self.pixelse(x) * channel


class AttentionBlock(nn.Module):
    """block2 for the loss mode, made from the model's (see the module docstring); its attribute
    names are the model block's."""

    def __init__(self, block: BiAttentionBlock, *, fused_epilogue: bool = True, batch_gates: bool = True,
                 fp32_precision: str | None = None):
        super().__init__()
        self.q1, self.q2, self.k1, self.k2, self.v1, self.v2 = (block.q1, block.q2, block.k1, block.k2,
                                                                block.v1, block.v2)
        self.br1 = PackedGMDC(block.br1, fp32_precision)
        self.br2 = PackedGMDC(block.br2, fp32_precision)
        self.SE = Gate(block.SE)
        self.after_block1 = ConvReLU(fold_batchnorm(block.after_block1[0], block.after_block1[1]), fused_epilogue)
        self.after_block2 = ConvReLU(fold_batchnorm(block.after_block2[0], block.after_block2[1]), fused_epilogue)
        self.sigma_scope = block.sigma_scope
        self.attention_backend = block.attention_backend
        self.batch_gates = batch_gates

    def forward(self, f_sr: torch.Tensor, f_hr: torch.Tensor):
        q1, k1, v1 = self.br1(self.q1(f_sr)), self.k1(f_sr), self.v1(f_sr)
        q2, k2, v2 = self.br2(self.q2(f_hr)), self.k2(f_hr), self.v2(f_hr)
        out1, out2 = bi_axial_attention(
            q1, k1, v1, q2, k2, v2, sigma_scope=self.sigma_scope, backend=self.attention_backend
        )
        if self.batch_gates and out1.shape == out2.shape:
            # split, not slicing: its backward is one cat of the halves' gradients
            out1, out2 = self.SE(torch.cat([out1, out2])).split(len(out1))
        else:
            out1, out2 = self.SE(out1), self.SE(out2)
        return self.after_block1(out1 + f_sr), self.after_block2(out2 + f_hr)
