"""PSNR and SSIM on the Y channel with a border crop, as SR papers report them.

Y is ITU-R BT.601 luma as MATLAB's ``rgb2ycbcr`` computes it for double RGB in [0, 1]:

    Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255        (in [16/255, 235/255])

PSNR = 10 log10(1 / MSE) on that Y (identical to using Y * 255 with peak 255); SSIM is
Wang et al.'s with an 11x11 Gaussian window (sigma 1.5), valid positions only, data
range 1 (scikit-image ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``). ``crop`` pixels are removed from each
border first (the convention: crop = scale).
"""
from __future__ import annotations

import torch

from epban.ops.ssim import ssim

YCBCR_Y = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11  # the Gaussian window's side: SSIM needs at least this many pixels each way


def min_image_side(crop: int) -> int:
    """The smallest image side that ``psnr_y`` and ``ssim_y`` take with a ``crop``-pixel border crop."""
    return 2 * crop + SSIM_WINDOW


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) BT.601 Y in [16/255, 235/255]."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(image.shape)}")
    r, g, b = image.unbind(1)
    y = 16.0 + YCBCR_Y[0] * r + YCBCR_Y[1] * g + YCBCR_Y[2] * b
    return (y / 255.0).unsqueeze(1)


def _crop_y(sr: torch.Tensor, hr: torch.Tensor, crop: int):
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    h, w = sr.shape[-2:]
    if crop < 0 or 2 * crop >= min(h, w):
        raise ValueError(f"border crop {crop} leaves nothing of a {h}x{w} image")
    ys, yh = rgb_to_y(sr.double()), rgb_to_y(hr.double())
    if crop:
        ys, yh = ys[..., crop:-crop, crop:-crop], yh[..., crop:-crop, crop:-crop]
    return ys, yh


@torch.no_grad()
def psnr_y(sr: torch.Tensor, hr: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """PSNR (dB) on Y after a ``crop``-pixel border crop: one value per image, (B,), float64."""
    ys, yh = _crop_y(sr, hr, crop)
    mse = (ys - yh).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


@torch.no_grad()
def ssim_y(sr: torch.Tensor, hr: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """SSIM on Y after a ``crop``-pixel border crop: one value per image, (B,), float64."""
    ys, yh = _crop_y(sr, hr, crop)
    return ssim(ys, yh, data_range=1.0, reduction="none", backend="reference")
