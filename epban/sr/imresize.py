"""MATLAB-compatible bicubic ``imresize``: how SR papers make their LR images.

MATLAB's ``imresize(img, 1/s, 'bicubic')`` (antialiasing on by default) resamples each
axis with the Keys cubic (a = -0.5)

    cubic(t) = 1.5|t|^3 - 2.5|t|^2 + 1               for |t| <= 1
               -0.5|t|^3 + 2.5|t|^2 - 4|t| + 2       for 1 < |t| <= 2,   0 otherwise.

Output pixel u (1-based) sits at input coordinate x_u = u / k + (1 - 1 / k) / 2, where
k is the scale factor (k = 1/s when downsampling by s). Input pixel j gets the weight

    w(u, j) = h(x_u - j) / sum_j' h(x_u - j'),   h(t) = k cubic(k t) when k < 1 (antialiased),
                                                  h(t) = cubic(t)     otherwise,

so when downsampling by s the kernel is stretched s times: 4 s taps (16 at x4), each
weight cubic(d / s) for an input pixel at distance d. Taps outside the image are
mirrored (``[1..n, n..1]``, the edge pixel repeated). Each axis is one matrix, so
``imresize(x) = W_h @ x @ W_w^T``: differentiable, any device, batch-friendly.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

KERNEL_WIDTH = 4.0  # support of the cubic, in input pixels, before antialias stretching


def cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    a = np.abs(t)
    a2, a3 = a * a, a * a * a
    near = (1.5 * a3 - 2.5 * a2 + 1.0) * (a <= 1)
    far = (-0.5 * a3 + 2.5 * a2 - 4.0 * a + 2.0) * ((a > 1) & (a <= 2))
    return near + far


@functools.lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The (out_length, in_length) float64 matrix that resamples one axis, as MATLAB's ``contributions``."""
    if antialias and scale < 1:
        width = KERNEL_WIDTH / scale

        def h(t):
            return scale * cubic(scale * t)
    else:
        width = KERNEL_WIDTH
        h = cubic
    u = np.arange(1, out_length + 1, dtype=np.float64)
    x = u / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(x - width / 2.0)
    taps = int(math.ceil(width)) + 2
    j = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices, may fall outside
    weights = h(x[:, None] - j)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    idx = mirror[np.mod(j.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), idx.ravel()), weights.ravel())
    return matrix


@functools.lru_cache(maxsize=64)
def _matrix_tensor(in_length, out_length, scale, antialias, dtype, device) -> torch.Tensor:
    return torch.from_numpy(resize_matrix(in_length, out_length, scale, antialias)).to(dtype=dtype, device=device)


def imresize(image: torch.Tensor, scale: float, *, antialias: bool = True) -> torch.Tensor:
    """Resize (..., H, W) by ``scale`` like MATLAB ``imresize(image, scale, 'bicubic')`` on doubles.

    The output is (..., ceil(H * scale), ceil(W * scale)), neither clamped nor rounded
    (MATLAB rounds only uint8 inputs; see :func:`quantize`). Floating-point input only.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.dim() < 2:
        raise ValueError("imresize expects a floating-point tensor (..., H, W)")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    h, w = image.shape[-2:]
    oh, ow = math.ceil(h * scale - 1e-9), math.ceil(w * scale - 1e-9)
    if oh < 1 or ow < 1:
        raise ValueError(f"cannot resize {h}x{w} by {scale}: the output would be empty")
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    mh = _matrix_tensor(h, oh, float(scale), antialias, dtype, image.device)
    mw = _matrix_tensor(w, ow, float(scale), antialias, dtype, image.device)
    out = torch.matmul(mh, image.to(dtype))
    return torch.matmul(out, mw.t()).to(image.dtype)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to 8-bit levels, as saving them to PNG would."""
    return image.clamp(0, 1).mul(255).round().div(255)


def bicubic_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """LR = MATLAB ``imresize(hr, 1/scale, 'bicubic')`` for an HR size divisible by ``scale``."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(
            f"HR size {h}x{w} is not divisible by the scale {scale}; crop it to a multiple of {scale} "
            "(--modcrop does that) or use paired LR/HR folders"
        )
    return imresize(hr, 1.0 / scale)


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: MATLAB ``imresize(lr, scale, 'bicubic')``."""
    return imresize(lr, float(scale))
