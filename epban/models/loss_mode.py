"""The loss mode of a frozen Efficient-PBAN: the same scores, computed for SR training.

``pban_for_loss(model)`` returns a frozen scorer ``f(sr, hr) -> scores (B,)`` (float32) whose
gradient flows to ``sr`` only. Against ``model(sr, hr)`` it changes how, never what:

- BatchNorm (inference statistics) is folded into the preceding convolutions:
  ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
- GMDC: the branches' offset convolutions become one conv with all 2 * sum(k^2) channels,
  whose output is the packed offset tensor of the fused deformable convolution, and the
  branch weights are packed once (``epban.ops.deform_conv``).
- channels_last activations (the layout cuDNN and the fused deformable conv read best).
- ``dtype=torch.bfloat16``: the trunk (stem, layer3, block2) runs in bf16; the input
  normalisation, the 2x2 pooling's output and the head stay float32. Scores stay within
  ~5e-3 (relative) of float32, but the input gradient does not meet 1e-2: it is a
  piecewise function of the activations (ReLU masks, max-pool arg-maxes), so any rounding
  moves it — on random weights bf16 gives ~15% relative L2 error (cosine 0.99), a 1e-3
  change of the input moves the float32 gradient by ~4%, and keeping stem and layer3 in
  float32 still leaves ~3%. The same holds for TF32 convolutions (cuDNN's default).
- The ResNet convolutions' epilogues fused (CUDA): each conv runs without bias, and one pass
  (``epban.ops.bias_act``) adds the bias (and the residual, and a downsample's bias) and applies
  the ReLU, instead of PyTorch's strided bias ``add_``, the ReLU and the residual add.
- The trunk's backward (with the fused epilogues) as one autograd node, from the stem conv's
  epilogue and max-pool through every block of layers 1-3: a block's two input-gradient
  branches summed and the previous block's ReLU mask applied in one pass
  (``epban.ops.bias_act.relu_grad_sum``) instead of an add and a threshold_backward, at
  every block boundary; the stem's ReLU mask is applied at the pooled output (4x fewer
  elements) instead of the stem's output (``fused_residual_grad``;
  ``EPBAN_LOSS_FUSED_RESIDUAL_GRAD=0`` turns it off).
- The stem's tail (the conv's bias, ReLU and the 3x2 max-pool) as one pass that writes the
  pooled output and an int8 window position per pooled element, and its backward as one
  gather (``epban.ops.max_pool``), instead of bias + ReLU, max_pool2d with int64 indices,
  and a zero-fill and scatter backward: the stem's output (the network's largest tensor) is
  read once forward and written once backward, and no full-size ReLU output or index tensor
  is kept (``fused_stem_pool``; ``EPBAN_LOSS_FUSED_STEM_POOL=0`` turns it off).
- Each image's normalisation, cast to the trunk's dtype and layout change as one pass, and the
  SR image's gradient back through them as one pass (``epban.ops.normalise``), instead of a
  subtraction, a division and a cast forward and a layout change and a division backward
  (``fused_input``; ``EPBAN_LOSS_FUSED_INPUT=0`` turns it off).
- The stem conv's input gradient (3 channels) computed on CUDA with its weight zero-padded to
  16 bytes of input channels, then cut back: the same sums through cuDNN's aligned kernels.
- The pixel and channel gate (SE) runs once on both directions' attention outputs stacked
  along the batch instead of once per direction (``batch_gates``; SE works image by image,
  so the values are the same): one SE forward + backward is ~40 small operators (five convs,
  tanh, sigmoid, pixel shuffle, products, their gradients), launch-bound on the loss mode's
  maps; batched, a step issues one set instead of two, plus a concatenation forward and one
  backward. ``EPBAN_LOSS_BATCH_GATES=0`` turns it off.
- No host syncs: inputs are checked by shape only (no finite check).
- ``cuda_graph=True``: forward and backward are captured once per input shape, dtype and
  device (``torch.cuda.make_graphed_callables``) and replayed; the scores and the gradient
  handed to autograd live in the graph's static buffers, so consume them before the next
  call (an SR training step does). ``cudnn_benchmark=True`` lets cuDNN time its algorithms
  for each captured shape. Calls without a gradient to ``sr`` run eagerly. With the
  attention backend "auto", the first call of a shape captures the step with the fused and
  with the reference attention and keeps the faster (``.attention_choice``).
- ``compile=True`` (or a dict of ``torch.compile`` arguments): the scorer is compiled; the
  fused ops are opaque custom ops to Dynamo. With both, ``mode="reduce-overhead"`` is used.
"""
from __future__ import annotations

import copy
import gc
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torchvision.models.resnet import BasicBlock

from epban.models.pban import GMDC, EfficientPBAN
from epban.ops.bias_act import bias_act, fused_bias_act_available, fused_bias_act_serves, relu_grad_sum
from epban.ops.normalise import fused_normalise_available, normalise
from epban.ops.max_pool import bias_relu_max_pool2d, max_pool2d_relu_grad, pool_geometry
from epban.ops.deform_conv import (
    check_fp32_precision,
    deform_path,
    fused_deform_conv_packed,
    multi_branch_deform_conv,
    pack_weights,
)

LOSS_DTYPES = (torch.float32, torch.bfloat16)


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


def _conv2d(x: torch.Tensor, conv: nn.Conv2d, bias=None) -> torch.Tensor:
    """``conv``'s convolution of x with ``bias`` in place of its own (None: no bias)."""
    return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Epilogue(nn.Module):
    """A module ending in fused conv epilogues (``fused_epilogue``, ``epilogue_backend``)."""

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the fused epilogue serves x's device and dtype."""
        return self.fused_epilogue and fused_bias_act_available(x.device, x.dtype, self.epilogue_backend)


class ConvReLU(_Epilogue):
    """relu(conv(x)) of a folded conv; where the fused epilogue serves (CUDA), the conv runs
    without bias and ``epban.ops.bias_act`` adds the bias and applies the ReLU in one pass."""

    def __init__(self, conv: nn.Conv2d, fused_epilogue: bool = True):
        super().__init__()
        self.conv = conv
        self.fused_epilogue = fused_epilogue
        self.epilogue_backend = "auto"  # of bias_act; "fused" runs it under TRITON_INTERPRET=1 (tests)

    def _conv(self, x: torch.Tensor, bias) -> torch.Tensor:
        return _conv2d(x, self.conv, bias)

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
    """The stem's relu(conv(x)) (7x7, stride 2, 3 input channels). On the devices in
    ``pad_devices`` (CUDA by default), when x requires grad, the input gradient is computed with
    the weight zero-padded to 16 bytes of input channels per pixel (8 bf16 or 4 float32
    channels) and cut back to 3 channels: the same values. Measured on an H100 (bf16, 16x3x256x256
    and 1x3x1024x1024): with 3 channels cuDNN's input gradient runs an unaligned kernel (0.29 and
    0.51 ms); padded, it is under 0.12 ms. The forward stays on 3 channels: padded, it took
    0.32 ms a call instead of 0.13 (the padding's zeros are multiplied too)."""

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
        h = bias_act(_conv2d(x, self.conv1), self.conv1.bias, backend=backend)
        identity = x if self.downsample is None else _conv2d(x, self.downsample)
        return h, bias_act(_conv2d(h, self.conv2), self.bias2, identity, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            return self.fused_parts(x)[1]
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + identity)


def _input_grad(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """dL/dx of a frozen conv(x): the input gradient alone, by the same call (and so the same
    cuDNN kernels and output layout) as autograd's ConvolutionBackward."""
    return torch.ops.aten.convolution_backward(grad, x, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                               False, [0] * len(conv.stride), conv.groups, [True, False, False])[0]


class _ResidualChain(torch.autograd.Function):
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


def _fusable_pool(pool: nn.Module) -> bool:
    """Whether ``bias_relu_max_pool2d`` computes this max-pool (square, dilation 1, floor mode)."""
    if not isinstance(pool, nn.MaxPool2d) or pool.ceil_mode or _pair(pool.dilation) != (1, 1):
        return False
    try:
        pool_geometry(pool.kernel_size, pool.stride, pool.padding)
    except ValueError:
        return False
    return True


def _fold_resnet_layer(layer: nn.Sequential, fused_epilogue: bool) -> None:
    for i, block in enumerate(layer):
        layer[i] = EpilogueBasicBlock(block, fused_epilogue)


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
    """The channel gate's global average pool for the loss mode (same values as adaptive_avg_pool2d(x, 1))."""
    return _SpatialMean.apply(x)


class PackedGMDC(nn.Module):
    """GMDC with one offset conv for all branches and pre-packed branch weights (frozen)."""

    def __init__(self, gmdc: GMDC):
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
        self.backend = getattr(gmdc, "backend", "auto")
        self.fp32_precision = None

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
        the weights are frozen, and unpacking them per call was a 21 MB copy per GMDC call at
        C = 256 (the gather path's matmul needs them contiguous). Remade if the module moves."""
        cached = getattr(self, "_unpacked_cache", None)
        if cached is None or cached[0] is not self.weight:  # .to() and friends replace the buffer
            ob, c = self.weight.shape[-1], self.weight.shape[1]
            weights = [w.reshape(k, k, c, ob).permute(3, 2, 0, 1).contiguous()
                       for w, k in zip(torch.split(self.weight, [k * k for k in self.kernel_sizes]),
                                       self.kernel_sizes)]
            cached = self._unpacked_cache = (self.weight, weights, list(torch.split(self.bias, ob)))
        return cached[1], cached[2]


class PBANLossScorer(nn.Module):
    """A frozen Efficient-PBAN prepared for use as a loss: ``scorer(sr, hr) -> scores (B,)``, float32."""

    def __init__(self, model: EfficientPBAN, *, dtype=torch.float32, channels_last=True, fp32_precision=None,
                 fused_epilogue=None, stem_pad=None, batch_gates=None, fused_residual_grad=None,
                 fused_stem_pool=None, fused_input=None):
        super().__init__()
        if not isinstance(model, EfficientPBAN):
            raise ValueError(f"pban_for_loss needs an EfficientPBAN, got {type(model).__name__}")
        if dtype not in LOSS_DTYPES:
            raise ValueError(f"loss-mode dtype must be one of {LOSS_DTYPES}, got {dtype}")
        m = copy.deepcopy(model).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if fused_epilogue is None:
            fused_epilogue = os.environ.get("EPBAN_LOSS_FUSED_EPILOGUE", "1") != "0"
        self.fused_epilogue = bool(fused_epilogue)
        if stem_pad is None:
            stem_pad = os.environ.get("EPBAN_LOSS_STEM_PAD", "1") != "0"
        m.stem[0], m.stem[1], m.stem[2] = (
            StemConvReLU(fold_batchnorm(m.stem[0], m.stem[1]), self.fused_epilogue, pad=bool(stem_pad)),
            nn.Identity(), nn.Identity())
        _fold_resnet_layer(m.stem[4], self.fused_epilogue)
        _fold_resnet_layer(m.stem[5], self.fused_epilogue)
        _fold_resnet_layer(m.layer2_1, self.fused_epilogue)  # layer2_2 is the same module
        if fused_residual_grad is None:
            fused_residual_grad = os.environ.get("EPBAN_LOSS_FUSED_RESIDUAL_GRAD", "1") != "0"
        self.fused_residual_grad = bool(fused_residual_grad)
        if fused_stem_pool is None:
            fused_stem_pool = os.environ.get("EPBAN_LOSS_FUSED_STEM_POOL", "1") != "0"
        self.fused_stem_pool = bool(fused_stem_pool) and _fusable_pool(m.stem[3])
        if fused_input is None:
            fused_input = os.environ.get("EPBAN_LOSS_FUSED_INPUT", "1") != "0"
        self.fused_input = bool(fused_input)
        blk = m.block2
        for name in ("after_block1", "after_block2"):
            seq = getattr(blk, name)
            setattr(blk, name, ConvReLU(fold_batchnorm(seq[0], seq[1]), self.fused_epilogue))
        blk.after_block3 = blk.after_block4 = None  # unused when upchannel=True
        blk.br1, blk.br2 = PackedGMDC(blk.br1), PackedGMDC(blk.br2)
        blk.SE.spatial_mean = spatial_mean
        if batch_gates is None:
            batch_gates = os.environ.get("EPBAN_LOSS_BATCH_GATES", "1") != "0"
        blk.batch_gates = bool(batch_gates)
        blk.br1.fp32_precision = blk.br2.fp32_precision = check_fp32_precision(fp32_precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for trunk in (m.stem, m.layer2_1, m.block2):
            trunk.to(dtype=dtype, memory_format=self.memory_format)
        for p in m.parameters():
            p.requires_grad_(False)
        self.model = m
        self.dtype = dtype

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm is folded, dropout is off

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """layer3(layer2(layer1(maxpool(stem(x))))): an image's features for block2. When x wants
        a gradient and the fused epilogues serve, all of it after the stem conv is one
        _ResidualChain: the stem's epilogue and max-pool, then every block of layers 1-3, so
        the gradient's sums and ReLU masks meet at every block and layer boundary, and the
        stem's mask is taken at the pooled output (4x fewer elements than the stem's)."""
        m = self.model
        stem, pool = m.stem[0], m.stem[3]
        blocks = (*m.stem[4], *m.stem[5], *m.layer2_1)
        backend = stem.epilogue_backend
        fused = stem.fused(x)  # the stem pool follows the epilogues' rule (epban.ops._checks)
        fused_pool = self.fused_stem_pool and fused
        if (self.fused_residual_grad and x.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and fused and all(b.fused(x) for b in blocks)
                and fused_bias_act_serves(x, None, backend)):
            return _ResidualChain.apply(stem._conv(x, None), blocks, (stem.conv.bias, pool, backend, fused_pool))
        if fused_pool:  # the HR image's trunk (no gradient), or autograd's block-by-block backward
            h, _ = bias_relu_max_pool2d(stem._conv(x, None), stem.conv.bias, pool.kernel_size, pool.stride,
                                        pool.padding, backend=backend)
            return m.layer2_1(m.stem[5](m.stem[4](h)))
        return m.layer2_1(m.stem(x))

    def prepare(self, sr: torch.Tensor, hr: torch.Tensor):
        """Both images normalised, in the trunk's dtype and layout (hr detached); one pass each
        where the fused normalisation serves (``fused_input``)."""
        m = self.model
        backend = m.stem[0].epilogue_backend  # the loss mode's Triton kernels share one backend
        channels_last = self.memory_format == torch.channels_last
        hr = hr.detach()
        if self.fused_input and all(fused_normalise_available(t.device, t.dtype, self.dtype, backend)
                                    for t in (sr, hr)):
            return tuple(normalise(t, mean, std, dtype=self.dtype, channels_last=channels_last, backend=backend)
                         for t, mean, std in ((sr, m.sr_mean, m.sr_std), (hr, m.hr_mean, m.hr_std)))
        sr, hr = m.normalise(sr.float(), hr.float())
        return (sr.to(dtype=self.dtype, memory_format=self.memory_format),
                hr.to(dtype=self.dtype, memory_format=self.memory_format))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        m = self.model
        m.check_inputs(sr, hr, check_finite=False)
        sr, hr = self.prepare(sr, hr)
        f1, f2 = m.block2(self.trunk(sr), self.trunk(hr))
        f1 = m.pool1(f1).flatten(1).float()
        f2 = m.pool2(f2).flatten(1).float()
        f1 = F.relu(m.fc21(F.relu(m.fc11(f1))))
        f2 = F.relu(m.fc22(F.relu(m.fc12(f2))))
        return m.out(m.fc(torch.cat([f1, f2], dim=1))).squeeze(1)


class CUDAGraphScorer(nn.Module):
    """Replays a captured forward + backward per (shape, dtype, device) of the inputs.

    When the attention backend is "auto", the first call of a shape captures the step once
    with the fused attention kernels and once with the reference attention, times a few
    replays of each, and keeps the faster: replays carry no host overhead, so the eager
    rule of thumb behind "auto" (which counts the host time of ~10 kernel launches against
    ~40) does not hold inside a graph. ``attention_choice`` records the pick per shape.
    """

    TIMED_REPLAYS = 5

    def __init__(self, scorer: nn.Module, cudnn_benchmark: bool = False):
        super().__init__()
        self.scorer = scorer
        self.cudnn_benchmark = cudnn_benchmark
        self._graphed: dict = {}
        self.attention_choice: dict = {}

    def train(self, mode: bool = True):
        return super().train(False)

    def _capture(self, sr: torch.Tensor, hr: torch.Tensor):
        # cudnn_benchmark: cuDNN times its convolution algorithms for these shapes during the
        # warm-up runs (make_graphed_callables runs forward and backward before capturing) and
        # the graph keeps the fastest; the process-wide flag is restored afterwards.
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = saved or self.cudnn_benchmark
        try:
            self.scorer(sr.detach(), hr)  # validates the inputs and compiles the kernels before capture
            return torch.cuda.make_graphed_callables(
                lambda a, b: self.scorer(a, b), (sr.detach().clone().requires_grad_(), hr.clone())
            )
        finally:
            torch.backends.cudnn.benchmark = saved

    def _attention_candidates(self, sr: torch.Tensor) -> list:
        from epban.ops.axial_attention import fused_axial_available

        block = self.scorer.model.block2
        if block.attention_backend != "auto" or not fused_axial_available(sr.device):
            return []
        return ["fused", "reference"]

    def _replay_ms(self, fn, sr: torch.Tensor, hr: torch.Tensor) -> float:
        x = sr.detach().clone().requires_grad_()
        for _ in range(2):
            torch.autograd.grad(fn(x, hr).sum(), x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.TIMED_REPLAYS):
            torch.autograd.grad(fn(x, hr).sum(), x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.TIMED_REPLAYS

    def _capture_fastest(self, sr: torch.Tensor, hr: torch.Tensor, key):
        candidates = self._attention_candidates(sr)
        if not candidates:
            return self._capture(sr, hr)
        block = self.scorer.model.block2
        best = None
        try:
            for backend in candidates:
                block.attention_backend = backend
                try:
                    fn = self._capture(sr, hr)
                except Exception:  # a backend that cannot serve this shape or device
                    continue
                ms = self._replay_ms(fn, sr, hr)
                if best is None or ms < best[0]:
                    best = (ms, backend, fn)
                del fn
        finally:
            block.attention_backend = "auto"
        gc.collect()  # frees the slower capture's graph and its memory pool
        if best is None:
            return self._capture(sr, hr)
        self.attention_choice[key] = (best[1], round(best[0], 3))
        return best[2]

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if not (sr.is_cuda and sr.requires_grad and torch.is_grad_enabled()):
            return self.scorer(sr, hr)
        hr = hr.detach()
        key = (tuple(sr.shape), sr.dtype, hr.dtype, sr.device)
        fn = self._graphed.get(key)
        if fn is None:
            fn = self._graphed[key] = self._capture_fastest(sr, hr, key)
        return fn(sr, hr)


def pban_for_loss(model: EfficientPBAN, *, dtype=torch.float32, channels_last=True, cuda_graph=False,
                  compile=False, fp32_precision=None, fused_epilogue=None, stem_pad=None,
                  batch_gates=None, fused_residual_grad=None, fused_stem_pool=None, fused_input=None,
                  cudnn_benchmark=None) -> nn.Module:
    """A frozen scorer ``f(sr, hr) -> (B,)`` with the scores of ``model`` (see the module docstring).

    The model is copied (it stays usable as it is); move it to its device first.
    ``fp32_precision``: the fused deformable convolution's float32 dots ("ieee", the default,
    or "tf32x3" / "tf32": faster, no longer bit-for-bit float32).
    ``fused_epilogue``: on CUDA, the ResNet convs run without bias and ``epban.ops.bias_act``
    adds bias, residual and ReLU in one pass (default on; ``EPBAN_LOSS_FUSED_EPILOGUE=0`` or
    ``False`` keeps PyTorch's separate kernels).
    ``stem_pad``: on CUDA, the stem conv's input gradient is computed with its weight
    zero-padded to 16 bytes of input channels, for cuDNN's aligned kernels (default on;
    ``EPBAN_LOSS_STEM_PAD=0`` or ``False`` keeps 3 channels).
    ``batch_gates``: one SE call on both attention outputs stacked along the batch (default on;
    ``EPBAN_LOSS_BATCH_GATES=0`` or ``False`` calls it once per direction, as the model does).
    ``fused_residual_grad``: with the fused epilogues, the trunk's backward sums each block's
    two input-gradient branches and applies the previous block's ReLU mask in one pass
    (default on; ``EPBAN_LOSS_FUSED_RESIDUAL_GRAD=0`` or ``False`` leaves it to autograd).
    ``fused_stem_pool``: with the fused epilogues, the stem conv's bias, ReLU and max-pool run as
    one pass and their backward as one gather (``epban.ops.max_pool``; default on;
    ``EPBAN_LOSS_FUSED_STEM_POOL=0`` or ``False`` keeps bias_act and PyTorch's max-pool).
    ``fused_input``: each image's normalisation, cast and layout change in one pass, and its
    backward in one (``epban.ops.normalise``; default on where Triton serves;
    ``EPBAN_LOSS_FUSED_INPUT=0`` or ``False`` keeps PyTorch's ops).
    ``cudnn_benchmark``: with ``cuda_graph``, let cuDNN time its convolution algorithms for each
    captured shape (``torch.backends.cudnn.benchmark`` during the capture only; default off, or
    ``EPBAN_LOSS_CUDNN_BENCHMARK=1``): a slower first call, possibly more workspace memory.
    """
    if cudnn_benchmark is None:
        cudnn_benchmark = os.environ.get("EPBAN_LOSS_CUDNN_BENCHMARK", "0") == "1" and bool(cuda_graph)
    if cudnn_benchmark and (not cuda_graph or compile):
        raise ValueError("cudnn_benchmark=True needs cuda_graph=True without compile: the algorithms are chosen "
                         "once, when the step is captured (otherwise set torch.backends.cudnn.benchmark yourself)")
    scorer = PBANLossScorer(model, dtype=dtype, channels_last=channels_last, fp32_precision=fp32_precision,
                            fused_epilogue=fused_epilogue, stem_pad=stem_pad, batch_gates=batch_gates,
                            fused_residual_grad=fused_residual_grad, fused_stem_pool=fused_stem_pool,
                            fused_input=fused_input)
    if compile:
        kwargs = dict(compile) if isinstance(compile, dict) else {}
        if cuda_graph:
            kwargs.setdefault("mode", "reduce-overhead")
        return torch.compile(scorer, **kwargs)
    if cuda_graph:
        return CUDAGraphScorer(scorer, cudnn_benchmark=bool(cudnn_benchmark))
    return scorer
