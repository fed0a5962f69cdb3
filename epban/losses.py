"""Losses for SR training: SSIM, the frozen Efficient-PBAN metric, and their weighted sum with L1."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from epban.models.pban import EfficientPBAN
from epban.ops.ssim import ssim_loss


class SSIMLoss(nn.Module):
    """``weight * (1 - SSIM(x, y))``, averaged over the batch (``reduction="none"``: one value
    per image). Pass the loss weight here rather than multiplying the output: it is folded
    into the fused kernel pass, and the backward then skips a read and a write of the
    gradient (``epban.ops.ssim.ssim_loss``)."""

    def __init__(self, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid",
                 reduction="mean", backend="auto", weight=1.0):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"SSIMLoss reduction must be 'mean' or 'none', got {reduction!r}")
        self.kwargs = dict(weight=weight, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                           padding=padding, reduction=reduction, backend=backend)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ssim_loss(x, y, **self.kwargs)


class PBANLoss(nn.Module):
    """A frozen Efficient-PBAN as a loss to minimise: the negated score, batch mean.

    With ``rescale=True`` the score is first mapped by the config's ``score_range`` to
    roughly [0, 1], so the loss weight means the same whatever scale the metric was
    trained on. Gradients flow to ``sr`` only; the model stays in eval mode.

    ``loss_mode=True`` (or a dict of ``EfficientPBAN.for_loss`` arguments, e.g.
    ``{"dtype": torch.bfloat16, "cuda_graph": True}``) scores with the fast loss mode:
    BatchNorm folded, channels_last, fused kernels. Move the model to its device first.
    """

    def __init__(self, model_or_path: EfficientPBAN | str | os.PathLike, *, rescale: bool = True,
                 check_finite: bool = False, loss_mode: bool | dict = False):
        super().__init__()
        model = model_or_path
        if not isinstance(model, EfficientPBAN):
            model = EfficientPBAN.from_checkpoint(model_or_path)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.rescale = rescale
        self.check_finite = check_finite
        self.scorer = model.for_loss(**(loss_mode if isinstance(loss_mode, dict) else {})) if loss_mode else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # BatchNorm statistics and dropout of the metric never change
        if self.scorer is not None:
            self.scorer.eval()
        return self

    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of the frozen metric, on its own scale (higher is better)."""
        if self.scorer is not None:
            if self.check_finite:
                self.model.check_inputs(sr, hr, check_finite=True)
            return self.scorer(sr, hr.detach())
        return self.model(sr, hr.detach(), check_finite=self.check_finite)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        s = self.score(sr, hr)
        if self.rescale:
            lo, hi = self.model.config.score_range
            s = (s - lo) / (hi - lo)
        return -s.mean()


class SRLoss(nn.Module):
    """``l1 * L1 + ssim * (1 - SSIM) + pban * PBANLoss``; returns ``(total, parts)``.

    ``parts`` maps each active term to its detached, unweighted value (for logging;
    reading them with ``.item()`` syncs the device, so log every few steps).
    """

    def __init__(self, l1: float = 1.0, ssim: float = 0.0, pban: float = 0.0, pban_model=None,
                 ssim_kwargs: dict | None = None, pban_rescale: bool = True, pban_loss_mode: bool | dict = False):
        super().__init__()
        if min(l1, ssim, pban) < 0:
            raise ValueError(f"loss weights must be non-negative, got l1={l1}, ssim={ssim}, pban={pban}")
        if pban > 0 and pban_model is None:
            raise ValueError("pban > 0 needs pban_model (an EfficientPBAN or a checkpoint path)")
        if "weight" in (ssim_kwargs or {}):
            raise ValueError("the SSIM term's weight is SRLoss's ssim argument, not ssim_kwargs['weight']")
        self.weights = {"l1": float(l1), "ssim": float(ssim), "pban": float(pban)}
        # The weight goes into the SSIM term itself (folded into the fused pass: see SSIMLoss).
        self.ssim_loss = SSIMLoss(**(ssim_kwargs or {}), weight=self.weights["ssim"])
        self.pban_loss = (
            PBANLoss(pban_model, rescale=pban_rescale, loss_mode=pban_loss_mode) if pban_model is not None else None
        )

    def forward(self, sr: torch.Tensor, hr: torch.Tensor):
        weighted = {}  # each active term times its weight
        if self.weights["l1"] > 0:
            weighted["l1"] = self.weights["l1"] * F.l1_loss(sr, hr)
        if self.weights["ssim"] > 0:
            weighted["ssim"] = self.ssim_loss(sr, hr)  # weighted already
        if self.weights["pban"] > 0:
            weighted["pban"] = self.weights["pban"] * self.pban_loss(sr, hr)
        total = sr.new_zeros(())
        for value in weighted.values():
            total = total + value
        return total, {k: v.detach() / self.weights[k] for k, v in weighted.items()}
