"""SSIM: the reference (the specification in executable form) and the dispatch to the fused kernels.

SSIM(x, y) per pixel, with Gaussian-weighted local moments (window ``win_size``,
``sigma``; G * . denotes the Gaussian filter):

    mu_x = G*x, mu_y = G*y, s_xx = G*(x^2) - mu_x^2, s_yy = G*(y^2) - mu_y^2,
    s_xy = G*(xy) - mu_x mu_y, C1 = (k1 R)^2, C2 = (k2 R)^2,
    ssim = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_xx + s_yy + C2))

``padding="valid"`` keeps only the pixels whose window lies inside the image (as
pytorch-msssim and scikit-image); ``"same"`` zero-pads the image (as fused-ssim).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from epban._extension import check_backend
from epban.ops._checks import check_image_pair

PADDINGS = ("valid", "same")
REDUCTIONS = ("mean", "none", "map")


@functools.lru_cache(maxsize=32)
def _gaussian_1d_cached(win_size: int, sigma: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_window_1d(win_size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The normalised 1-D Gaussian of the separable SSIM window, cached per (size, sigma, dtype, device)."""
    return _gaussian_1d_cached(win_size, float(sigma), dtype, str(torch.device(device)))


def _gaussian_filter(x: torch.Tensor, g: torch.Tensor, pad: int) -> torch.Tensor:
    """Separable depthwise Gaussian filter of (B, C, H, W); ``pad`` zeros on each side."""
    c = x.shape[1]
    w = g.numel()
    x = F.conv2d(x, g.view(1, 1, w, 1).expand(c, 1, w, 1), padding=(pad, 0), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, w).expand(c, 1, 1, w), padding=(0, pad), groups=c)


def ssim_map_reference(x, y, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid"):
    """The per-pixel SSIM map (B, C, H', W'), computed in the inputs' dtype (float32 for half types)."""
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x, y = x.to(compute_dtype), y.to(compute_dtype)
    g = gaussian_window_1d(win_size, sigma, compute_dtype, x.device)
    pad = win_size // 2 if padding == "same" else 0
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x = _gaussian_filter(x, g, pad)
    mu_y = _gaussian_filter(y, g, pad)
    s_xx = _gaussian_filter(x * x, g, pad) - mu_x**2
    s_yy = _gaussian_filter(y * y, g, pad) - mu_y**2
    s_xy = _gaussian_filter(x * y, g, pad) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    return luminance * contrast_structure


def _reduce(ssim_map: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "map":
        return ssim_map
    per_image = ssim_map.flatten(1).mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def check_ssim_args(x, y, data_range, win_size, sigma, padding, reduction) -> None:
    check_image_pair(x, y)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(win_size, int) and win_size >= 1 and win_size % 2 == 1):
        raise ValueError(f"win_size must be a positive odd integer, got {win_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")
    h, w = x.shape[-2:]
    if h < win_size or w < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size} (the SSIM window), got {h}x{w}")


def ssim_reference(x, y, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid", reduction="mean"):
    """Plain PyTorch SSIM; equals pytorch-msssim and scikit-image for ``padding="valid"``."""
    check_ssim_args(x, y, data_range, win_size, sigma, padding, reduction)
    ssim_map = ssim_map_reference(
        x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, padding=padding
    )
    return _reduce(ssim_map, reduction)


def ssim(x, y, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid", reduction="mean", backend="auto"):
    """Structural similarity of two image batches (B, C, H, W); see the module docstring.

    reduction: "mean" (a scalar), "none" (one value per image, shape (B,)) or "map".
    backend: "auto" (the fastest available for the tensors' device), "reference", or
    "fused" (the compiled kernel; ValueError when it cannot serve these inputs).
    """
    check_backend(backend)
    return ssim_reference(
        x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, padding=padding, reduction=reduction
    )
