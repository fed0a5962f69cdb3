"""The loss mode's scorer, built from a model: ``pban_for_loss(model, options) -> f(sr, hr) -> (B,)``."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from epban.models.loss_mode.attention_block import AttentionBlock
from epban.models.loss_mode.cuda_graph import CUDAGraphScorer
from epban.models.loss_mode.folded import StemConvReLU, fold_batchnorm, fold_resnet_layer
from epban.models.loss_mode.options import LossModeOptions
from epban.models.loss_mode.trunk import Trunk
from epban.models.pban import EfficientPBAN, check_score_inputs
from epban.ops.normalise import fused_normalise_serves, normalise


class PBANScorer(nn.Module):
    """A frozen Efficient-PBAN prepared for use as a loss: ``scorer(sr, hr) -> scores (B,)``, float32.

    Made from a copy of ``model`` (which stays as it is) with ``options``: the trunk (stem and
    ResNet layers 1-3, shared by both images), block2 and the head, each holding the model's
    weights with BatchNorm folded. The gradient flows to ``sr`` only. Inputs are checked by
    shape only (a finite check would sync the host).
    """

    def __init__(self, model: EfficientPBAN, options: LossModeOptions | None = None):
        super().__init__()
        if not isinstance(model, EfficientPBAN):
            raise ValueError(f"pban_for_loss needs an EfficientPBAN, got {type(model).__name__}")
        options = LossModeOptions() if options is None else options
        self.options = options
        m = copy.deepcopy(model).eval().float()  # computes in options.dtype and float32, whatever the model's
        fused = options.fused_epilogue
        stem = StemConvReLU(fold_batchnorm(m.stem[0], m.stem[1]), fused, pad=options.stem_pad)
        layers = [fold_resnet_layer(layer, fused) for layer in (m.stem[4], m.stem[5], m.layer2_1)]
        self.trunk = Trunk(stem, m.stem[3], layers, fused_residual_grad=options.fused_residual_grad,
                           fused_stem_pool=options.fused_stem_pool)
        self.block2 = AttentionBlock(m.block2, fused_epilogue=fused, batch_gates=options.batch_gates,
                                     fp32_precision=options.fp32_precision)
        self.pool1, self.pool2 = m.pool1, m.pool2
        self.fc11, self.fc12, self.fc21, self.fc22, self.fc, self.out = m.fc11, m.fc12, m.fc21, m.fc22, m.fc, m.out
        for name in ("sr_mean", "sr_std", "hr_mean", "hr_std"):
            self.register_buffer(name, getattr(m, name), persistent=False)
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        for part in (self.trunk, self.block2):
            part.to(dtype=options.dtype, memory_format=self.memory_format)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm is folded, dropout is off

    @property
    def kernel_backend(self) -> str:
        """The backend of the loss mode's own Triton ops (epilogues, stem pool, normalisation):
        the stem epilogue's."""
        return self.trunk.stem.epilogue_backend

    def prepare(self, sr: torch.Tensor, hr: torch.Tensor):
        """Both images normalised, in the trunk's dtype and layout (hr detached); one pass each
        where the fused normalisation serves (``fused_input``)."""
        dtype, backend = self.options.dtype, self.kernel_backend
        hr = hr.detach()
        if self.options.fused_input and all(fused_normalise_serves(t, dtype, backend)
                                            for t in (sr, hr)):
            return tuple(normalise(t, mean, std, dtype=dtype, channels_last=self.options.channels_last,
                                   backend=backend)
                         for t, mean, std in ((sr, self.sr_mean, self.sr_std), (hr, self.hr_mean, self.hr_std)))
        sr = (sr.float() - self.sr_mean) / self.sr_std
        hr = (hr.float() - self.hr_mean) / self.hr_std
        return (sr.to(dtype=dtype, memory_format=self.memory_format),
                hr.to(dtype=dtype, memory_format=self.memory_format))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        check_score_inputs(sr, hr, check_finite=False)
        sr, hr = self.prepare(sr, hr)
        f1, f2 = self.block2(self.trunk(sr), self.trunk(hr))
        f1 = self.pool1(f1).flatten(1).float()
        f2 = self.pool2(f2).flatten(1).float()
        f1 = F.relu(self.fc21(F.relu(self.fc11(f1))))
        f2 = F.relu(self.fc22(F.relu(self.fc12(f2))))
        return self.out(self.fc(torch.cat([f1, f2], dim=1))).squeeze(1)


def pban_for_loss(model: EfficientPBAN, options: LossModeOptions | None = None, **keywords) -> nn.Module:
    """A frozen scorer ``f(sr, hr) -> (B,)`` with the scores of ``model`` (see ``epban.models.loss_mode``).

    ``options``: a ``LossModeOptions``; ``keywords``: its fields, replacing the options' (or the
    defaults'), e.g. ``pban_for_loss(model, dtype=torch.bfloat16, cuda_graph=True)``. The model
    is copied (it stays usable as it is); move it to its device first. Returns the
    ``PBANScorer``, wrapped in a ``CUDAGraphScorer`` (``cuda_graph``) or compiled (``compile``).
    """
    options = LossModeOptions() if options is None else options
    if keywords:
        options = options.replace(**keywords)
    scorer = PBANScorer(model, options)
    if options.compile:
        kwargs = dict(options.compile) if isinstance(options.compile, dict) else {}
        if options.cuda_graph:
            kwargs.setdefault("mode", "reduce-overhead")
        return torch.compile(scorer, **kwargs)
    if options.cuda_graph:
        return CUDAGraphScorer(scorer, cudnn_benchmark=options.cudnn_benchmark)
    return scorer
