"""Losses for SR training: SSIM, the frozen Efficient-PBAN metric, and their weighted sum with L1.

Each loss checks its arguments when made (weights finite and non-negative) and its inputs
when called (one shape of (B, C, H, W) float images, on one device: ``ValueError``). The
first batch a loss object sees is also read once (one host sync) for its value range: images
far outside [0, 1] (beyond ``INPUT_RANGE``, scaled by SSIM's ``data_range``) look like 0..255
and get one warning. Only a warning: an SR network may overshoot [0, 1] a little, and a
training run should not stop for that.
"""
from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from epban.models.loss_mode import LossModeOptions, loss_mode_options, pban_for_loss
from epban.models.pban import INPUT_RANGE, EfficientPBAN, check_score_inputs, value_bounds
from epban._extension import check_backend
from epban.ops._checks import check_image_pair, check_loss_weight, window_args
from epban.ops.ms_ssim import MS_SSIM_WEIGHTS, ms_ssim_loss, ms_ssim_scales
from epban.ops.ssim import ssim_l1_loss_parts, ssim_loss, ssim_options


class _FirstBatchRangeCheck(nn.Module):
    """Warns once per loss object when the first batch it sees looks like 0..255 images."""

    value_scale = 1.0  # the images' nominal range is [0, value_scale]

    def __init__(self):
        super().__init__()
        self.range_checked = False  # set by a loss that checks on behalf of this one (SRLoss)

    def _check_first_batch(self, sr: torch.Tensor, hr: torch.Tensor) -> None:
        if self.range_checked or torch.compiler.is_compiling() or sr.numel() == 0 or hr.numel() == 0:
            return
        self.range_checked = True
        low, high = INPUT_RANGE[0] * self.value_scale, INPUT_RANGE[1] * self.value_scale
        for name, (lo, hi) in zip(("sr", "hr"), value_bounds(sr, hr)):
            if lo < low or hi > high:
                warnings.warn(
                    f"{type(self).__name__}: {name} of the first batch has values in [{lo:.4g}, {hi:.4g}], far "
                    f"outside [0, {self.value_scale:g}]: these look like 0..255 images, and the loss expects "
                    f"[0, {self.value_scale:g}] (divide by 255). Only the first batch is checked.",
                    stacklevel=3,
                )
                return


class SSIMLoss(_FirstBatchRangeCheck):
    """``l1 * mean|x - y| + weight * (1 - SSIM(x, y))``, averaged over the batch
    (``reduction="none"``: one value per image). Pass the loss weight here rather than
    multiplying the output: it is folded into the fused kernel pass, and the backward then
    skips a read and a write of the gradient; the L1 term (``l1``, default off) joins the same
    pass (``epban.ops.ssim.ssim_loss``). The weights must be finite and non-negative."""

    def __init__(self, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid",
                 reduction="mean", backend="auto", weight=1.0, l1=0.0):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"SSIMLoss reduction must be 'mean' or 'none', got {reduction!r}")
        options = ssim_options(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, padding=padding,
                               backend=backend)
        self.value_scale = options["data_range"]
        self.kwargs = dict(weight=check_loss_weight("SSIMLoss weight", weight), l1=check_loss_weight("SSIMLoss l1", l1),
                           reduction=reduction, **options)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_first_batch(x, y)
        return ssim_loss(x, y, **self.kwargs)


class MSSSIMLoss(_FirstBatchRangeCheck):
    """``l1 * mean|x - y| + weight * (1 - MS-SSIM(x, y))``, averaged over the batch
    (``reduction="none"``: one value per image). The arguments are those of
    ``epban.ops.ms_ssim.ms_ssim_loss``."""

    def __init__(self, weight=1.0, l1=0.0, *, data_range=1.0, win_size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS,
                 k1=0.01, k2=0.03, reduction="mean", backend="auto", check_finite=True):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"MSSSIMLoss reduction must be 'mean' or 'none', got {reduction!r}")
        check_backend(backend)
        ms_ssim_scales(weights)
        data_range, win_size, sigma, k1, k2 = window_args(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1,
                                                          k2=k2)
        self.value_scale = data_range
        self.kwargs = dict(weight=check_loss_weight("MSSSIMLoss weight", weight), l1=check_loss_weight("MSSSIMLoss l1", l1),
                           data_range=data_range, win_size=win_size, sigma=sigma, weights=weights, k1=k1, k2=k2,
                           reduction=reduction, backend=backend, check_finite=check_finite)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_first_batch(x, y)
        return ms_ssim_loss(x, y, **self.kwargs)


class PBANLoss(_FirstBatchRangeCheck):
    """A frozen Efficient-PBAN as a loss to minimise: the negated score, batch mean.

    With ``rescale=True`` the score is first mapped by the config's ``score_range`` to
    roughly [0, 1], so the loss weight means the same whatever scale the metric was
    trained on. Gradients flow to ``sr`` only.

    The model given is left as it is (its mode, ``requires_grad`` and weights): the loss
    scores with a frozen copy in eval mode (``self.model``), or, with the loss mode, with the
    loss mode's own frozen copy (``self.scorer``; ``self.model`` is then None). Later changes
    to the model given do not reach the loss. ``self.config`` is the model's config.

    ``loss_mode=True`` (or ``LossModeOptions``, or a dict of its fields, e.g.
    ``{"dtype": torch.bfloat16, "cuda_graph": True}``) scores with the fast loss mode
    (``epban.models.loss_mode``): BatchNorm folded, channels_last, fused kernels. Move the
    model to its device first.

    ``check_finite=True`` refuses NaN and inf in the inputs (a host sync per call); the value
    range is only checked on the first batch, with a warning (see ``epban.losses``).
    """

    def __init__(self, model_or_path: EfficientPBAN | str | os.PathLike, *, rescale: bool = True,
                 check_finite: bool = False, loss_mode: bool | dict | LossModeOptions = False):
        super().__init__()
        given = isinstance(model_or_path, EfficientPBAN)
        model = model_or_path if given else EfficientPBAN.from_checkpoint(model_or_path)
        self.config = copy.deepcopy(model.config)
        self.rescale = rescale
        self.check_finite = check_finite
        options = loss_mode_options(loss_mode)
        if options is None:
            self.model = _frozen_copy(model) if given else model.eval().requires_grad_(False)
            self.scorer = None
        else:
            self.model = None
            self.scorer = pban_for_loss(model, options)  # a frozen copy; the model stays as it is

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.model, self.scorer):  # BatchNorm statistics and dropout never change
            if frozen is not None:
                frozen.eval()
        return self

    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of the frozen metric, on its own scale (higher is better)."""
        check_score_inputs(sr, hr, check_finite=self.check_finite, check_range=False)
        if self.scorer is not None:
            return self.scorer(sr, hr.detach())
        return self.model(sr, hr.detach(), check_finite=False)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        self._check_first_batch(sr, hr)
        s = self.score(sr, hr)
        if self.rescale:
            lo, hi = self.config.score_range
            s = (s - lo) / (hi - lo)
        return -s.mean()


def _frozen_copy(model: EfficientPBAN) -> EfficientPBAN:
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
        p.grad = None
    return frozen


class SRLoss(_FirstBatchRangeCheck):
    """``l1 * L1 + ssim * (1 - SSIM) + pban * PBANLoss``; returns ``(total, parts)``.

    The weights must be finite and non-negative; a term with weight 0 is not computed.
    ``parts`` maps each active term to its detached, unweighted value (for logging; reading
    them with ``.item()`` syncs the device, so log every few steps):

    - ``"l1"``: mean absolute error, ``mean |sr - hr|``;
    - ``"ssim_loss"``: ``1 - SSIM(sr, hr)``, batch mean (lower is better);
    - ``"pban_loss"``: the ``PBANLoss`` value, minus the batch-mean score, rescaled by the
      metric's ``score_range`` to about [-1, 0] unless ``pban_rescale=False`` (lower is
      better; not the score itself: that is ``self.pban_loss.score(sr, hr)``).

    ``total = l1 * parts["l1"] + ssim * parts["ssim_loss"] + pban * parts["pban_loss"]``.
    With ``l1`` and ``ssim`` both on, the two terms and both parts come from one SSIM kernel
    pass where the fused path serves (``ssim_loss(..., l1=...)``). ``ssim_kwargs`` are
    ``SSIMLoss``'s other arguments (``data_range``, ``win_size``, ...; the reduction is the batch
    mean). ``sr`` and ``hr`` may differ in dtype (an SR network under autocast): the pixel terms
    take both in the wider one.
    """

    PART_NAMES = {"l1": "l1", "ssim": "ssim_loss", "pban": "pban_loss"}  # weight argument -> part

    def __init__(self, l1: float = 1.0, ssim: float = 0.0, pban: float = 0.0, pban_model=None,
                 ssim_kwargs: dict | None = None, pban_rescale: bool = True,
                 pban_loss_mode: bool | dict | LossModeOptions = False):
        super().__init__()
        self.weights = {name: check_loss_weight(f"SRLoss {name}", value)
                        for name, value in (("l1", l1), ("ssim", ssim), ("pban", pban))}
        if self.weights["pban"] > 0 and pban_model is None:
            raise ValueError("pban > 0 needs pban_model (an EfficientPBAN or a checkpoint path)")
        ssim_kwargs = dict(ssim_kwargs or {})
        for key in ("weight", "l1"):
            if key in ssim_kwargs:
                raise ValueError(f"the {'SSIM' if key == 'weight' else 'L1'} term's weight is SRLoss's "
                                 f"{'ssim' if key == 'weight' else 'l1'} argument, not ssim_kwargs[{key!r}]")
        if ssim_kwargs.get("reduction", "mean") != "mean":
            raise ValueError("SRLoss gives batch means (ssim_kwargs['reduction'] must be 'mean'); for one value per "
                             "image use SSIMLoss(reduction='none')")
        # The weight goes into the SSIM term itself (folded into the fused pass: see SSIMLoss); with
        # both on and a batch mean, so does the L1 term (one pass for both).
        self.ssim_loss = SSIMLoss(**ssim_kwargs, weight=self.weights["ssim"])
        self.l1_in_ssim = self.weights["l1"] > 0 and self.weights["ssim"] > 0
        self.pban_loss = (
            PBANLoss(pban_model, rescale=pban_rescale, loss_mode=pban_loss_mode) if pban_model is not None else None
        )
        # One range check for the whole loss, on the scale of its terms: the metric's [0, 1]
        # when it is on, otherwise SSIM's data_range.
        self.value_scale = 1.0 if self.weights["pban"] > 0 else self.ssim_loss.value_scale
        for term in (self.ssim_loss, self.pban_loss):
            if term is not None:
                term.range_checked = True

    def forward(self, sr: torch.Tensor, hr: torch.Tensor):
        check_image_pair(sr, hr, name_x="sr", name_y="hr", same_dtype=False)
        self._check_first_batch(sr, hr)
        # An SR network under autocast may give bf16 against a float32 hr: the pixel terms take
        # both in the wider dtype (the metric takes mixed dtypes itself).
        common = torch.promote_types(sr.dtype, hr.dtype)
        sr_px, hr_px = sr.to(common), hr.to(common)
        weighted = {}  # each active term times its weight
        parts = {}
        if self.l1_in_ssim:  # L1 and SSIM from one pass, with both parts
            weighted["l1+ssim"], parts["l1"], parts["ssim_loss"] = ssim_l1_loss_parts(
                sr_px, hr_px, **{**self.ssim_loss.kwargs, "l1": self.weights["l1"]})
        else:
            if self.weights["l1"] > 0:
                weighted["l1"] = self.weights["l1"] * F.l1_loss(sr_px, hr_px)
            if self.weights["ssim"] > 0:
                weighted["ssim"] = self.ssim_loss(sr_px, hr_px)  # weighted already
        if self.weights["pban"] > 0:
            weighted["pban"] = self.weights["pban"] * self.pban_loss(sr, hr)
        total = sr.new_zeros(())
        for value in weighted.values():
            total = total + value
        parts.update({self.PART_NAMES[k]: v.detach() / self.weights[k] for k, v in weighted.items() if k != "l1+ssim"})
        return total, {name: parts[name] for name in ("l1", "ssim_loss", "pban_loss") if name in parts}
