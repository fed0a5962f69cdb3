"""The loss mode of a frozen Efficient-PBAN: the same scores, computed for SR training.

``pban_for_loss(model, options)`` returns a frozen scorer ``f(sr, hr) -> scores (B,)``
(float32) whose gradient flows to ``sr`` only; ``LossModeOptions`` holds its options, and
``epban.PBANLoss(model, loss_mode=...)`` takes the same. Against ``model(sr, hr)`` it changes
how, never what:

- BatchNorm (inference statistics) folded into the preceding convolutions, GMDC's offset
  convolutions merged and its branch weights packed once (``folded``);
- channels_last activations (the layout cuDNN and the fused deformable conv read best);
- ``dtype=torch.bfloat16``: the trunk (stem, ResNet layers, block2) runs in bf16; the input
  normalisation, the pooled features and the head stay float32. Scores stay within 1e-2
  (relative) of float32, but the input gradient only agrees in direction (cosine about 0.99
  on random weights): it is a piecewise function of the activations (ReLU masks, max-pool
  arg-maxes), so any rounding moves it. The same holds for TF32 convolutions (cuDNN's default);
- the ResNet convolutions' epilogues fused (``fused_epilogue``), the stem's input gradient
  through cuDNN's aligned kernels (``stem_pad``), each image's normalisation, cast and layout
  change in one pass (``fused_input``);
- the trunk's backward as one autograd node (``trunk``: ``fused_residual_grad``,
  ``fused_stem_pool``);
- one SE gate call for both attention directions (``attention_block``: ``batch_gates``);
- no host syncs: inputs are checked by shape only (no finite check);
- ``cuda_graph=True``: forward and backward captured per input shape and replayed
  (``cuda_graph``); ``compile=True``: the scorer is compiled (the fused ops are opaque custom
  ops to Dynamo).

Modules: ``options`` (the dataclass), ``scorer`` (``PBANScorer``, ``pban_for_loss``),
``folded`` (BatchNorm folding, fused epilogues, weight packing), ``trunk`` (stem and ResNet
layers with their one-node backward), ``attention_block`` (block2), ``cuda_graph`` (capture
and replay). None imports this package's ``__init__``; the model imports none of them.
"""
from epban.models.loss_mode.attention_block import AttentionBlock, spatial_mean
from epban.models.loss_mode.cuda_graph import CUDAGraphScorer
from epban.models.loss_mode.folded import ConvReLU, EpilogueBasicBlock, PackedGMDC, StemConvReLU, fold_batchnorm
from epban.models.loss_mode.options import LOSS_DTYPES, LossModeOptions, loss_mode_options
from epban.models.loss_mode.scorer import PBANScorer, pban_for_loss
from epban.models.loss_mode.trunk import ResidualChain, Trunk

__all__ = [
    "LOSS_DTYPES",
    "LossModeOptions",
    "loss_mode_options",
    "PBANScorer",
    "pban_for_loss",
    "CUDAGraphScorer",
    "fold_batchnorm",
    "ConvReLU",
    "StemConvReLU",
    "EpilogueBasicBlock",
    "PackedGMDC",
    "Trunk",
    "ResidualChain",
    "AttentionBlock",
    "spatial_mean",
]
