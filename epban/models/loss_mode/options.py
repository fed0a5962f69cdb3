"""The loss mode's options, in one dataclass: what ``pban_for_loss`` and ``PBANLoss(loss_mode=...)`` take.

Every option keeps the scores of the model; each switch that is on by default turns one
fusion off when set to ``False`` (for comparisons, or where a path misbehaves).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

LOSS_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True, kw_only=True)
class LossModeOptions:
    """How the loss mode scores; every field is keyword-only.

    dtype: the trunk's dtype (stem, ResNet layers, block2), float32 or bfloat16; the input
        normalisation, the pooled features and the head stay float32.
    channels_last: activations in channels_last (the layout cuDNN and the fused deformable
        convolution read best).
    cuda_graph: capture forward and backward once per input shape, dtype and device, and replay
        them (``CUDAGraphScorer``); calls without a gradient to ``sr`` run eagerly.
    compile: ``torch.compile`` the scorer (``True``, or a dict of its arguments); with
        ``cuda_graph``, ``mode="reduce-overhead"`` is used.
    cudnn_benchmark: with ``cuda_graph`` (and without ``compile``), let cuDNN time its
        convolution algorithms for each captured shape (``torch.backends.cudnn.benchmark``
        during the capture only): a slower first call, possibly more workspace memory.
    fp32_precision: the fused deformable convolution's float32 dots: ``None`` (the op's
        default), "ieee", or "tf32x3" / "tf32" (faster, no longer bit-for-bit float32).
    fused_epilogue: on CUDA, the ResNet convolutions run without bias and one
        ``epban.ops.bias_act`` pass adds bias, residual and ReLU.
    stem_pad: on CUDA, the stem convolution's input gradient is computed with its weight
        zero-padded to 16 bytes of input channels (cuDNN's aligned kernels), then cut back.
    batch_gates: one SE gate call on both attention outputs stacked along the batch instead of
        one per direction (SE works image by image: the same values).
    fused_residual_grad: with the fused epilogues, the trunk's backward is one autograd node
        that sums each block's two input-gradient branches and applies the previous block's
        ReLU mask in one pass (``epban.ops.bias_act.relu_grad_sum``).
    fused_stem_pool: with the fused epilogues, the stem convolution's bias, ReLU and max-pool
        in one pass and their backward as one gather (``epban.ops.max_pool``).
    fused_input: each image's normalisation, cast and layout change in one pass, and the SR
        image's gradient back in one (``epban.ops.normalise``).
    """

    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    cuda_graph: bool = False
    compile: Union[bool, dict] = False
    cudnn_benchmark: bool = False
    fp32_precision: Optional[str] = None
    fused_epilogue: bool = True
    stem_pad: bool = True
    batch_gates: bool = True
    fused_residual_grad: bool = True
    fused_stem_pool: bool = True
    fused_input: bool = True

    def __post_init__(self):
        if self.dtype not in LOSS_DTYPES:
            raise ValueError(f"loss-mode dtype must be one of {LOSS_DTYPES}, got {self.dtype}")
        if self.cudnn_benchmark and (not self.cuda_graph or self.compile):
            raise ValueError("cudnn_benchmark=True needs cuda_graph=True without compile: the algorithms are "
                             "chosen once, when the step is captured (otherwise set torch.backends.cudnn.benchmark "
                             "yourself)")

    def replace(self, **changes) -> "LossModeOptions":
        """A copy with ``changes`` (field names; TypeError for an unknown one)."""
        return dataclasses.replace(self, **changes)


def loss_mode_options(loss_mode) -> Optional[LossModeOptions]:
    """``PBANLoss``'s ``loss_mode`` argument as options: ``False`` / ``None`` -> None (the
    model's own forward), ``True`` -> the defaults, a dict -> its keywords, options as they are."""
    if loss_mode is None or loss_mode is False:
        return None
    if loss_mode is True:
        return LossModeOptions()
    if isinstance(loss_mode, LossModeOptions):
        return loss_mode
    if isinstance(loss_mode, dict):
        return LossModeOptions(**loss_mode)
    raise ValueError(f"loss_mode must be a bool, a dict of LossModeOptions fields or LossModeOptions, "
                     f"got {type(loss_mode).__name__}")
