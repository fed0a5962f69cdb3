"""pytorch-msssim's API (version 1.0) served by epban: switch with one import,

    from pytorch_msssim import ssim, ms_ssim, SSIM, MS_SSIM
    from epban.compat import ssim, ms_ssim, SSIM, MS_SSIM      # the same calls, same defaults

``ssim`` goes through ``epban.ssim`` (the fused kernels where they serve, "valid" padding),
``ms_ssim`` through ``epban.ops.ms_ssim``; both give the value per image and channel,
averaged over channels (``size_average=False``: shape (N,)) and then over images
(``size_average=True``), as pytorch-msssim does. A ``win`` given by the caller is used as is
(the reference formula with that window).

Where it differs from pytorch-msssim:
- The Gaussian window is computed in float64 (pytorch-msssim computes it in float32): float64
  inputs differ by up to about 1e-5, float32 inputs by float rounding.
- Images are 4-D (N, C, H, W) once size-1 dimensions after the channels are squeezed (as
  pytorch-msssim does); 5-D input (N, C, T, H, W) raises ValueError.
- Bad input raises ValueError, never an assertion: images smaller than the window
  (pytorch-msssim skips the blur along that side, with a warning), or, for ``ms_ssim``,
  sides under ``(win_size - 1) * 2 ** (len(weights) - 1) + 1`` (pytorch-msssim asks for more
  than ``(win_size - 1) * 16`` whatever the number of scales, so fewer scales serve smaller
  images here).
- The modules take any number of channels (``channel`` only shapes the ``win`` attribute).
- Half-type inputs are computed in float32; the result is returned in the input's dtype.

As pytorch-msssim, NaN or inf in the images give NaN (no finite check), and ``data_range``,
``win_sigma`` and ``K`` may be NumPy scalars or one-element tensors, ``win_size`` a NumPy integer.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from epban.ops._checks import check_image_pair, window_args
from epban.ops.ms_ssim import MS_SSIM_WEIGHTS, check_ms_ssim_args, ms_ssim_with_window, ssim_and_cs
from epban.ops.ms_ssim import ms_ssim as _epban_ms_ssim
from epban.ops.ssim import ssim as _epban_ssim

Constants = Union[Tuple[float, float], List[float]]


def _fspecial_gauss_1d(size: int, sigma: float) -> Tensor:
    """pytorch-msssim's window, (1, 1, size) in float32: the modules' ``win`` attribute."""
    coords = torch.arange(size, dtype=torch.float) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).view(1, 1, -1)


def _images(X: Tensor, Y: Tensor) -> Tuple[Tensor, Tensor]:
    """pytorch-msssim's input handling: same shape, size-1 dimensions after the channels
    squeezed; then (N, C, H, W) only."""
    if not X.shape == Y.shape:
        raise ValueError(f"Input images should have the same dimensions, but got {X.shape} and {Y.shape}.")
    for d in range(len(X.shape) - 1, 1, -1):
        X = X.squeeze(dim=d)
        Y = Y.squeeze(dim=d)
    if X.dim() == 5:
        raise ValueError(f"epban.compat serves 2-D images (N, C, H, W); got 5-D input {tuple(X.shape)} "
                         "(for volumes, use pytorch_msssim itself)")
    if X.dim() != 4:
        raise ValueError(f"Input images should be 4-d tensors, but got {X.shape}")
    check_image_pair(X, Y, name_x="X", name_y="Y")
    return X, Y


def _constants(K) -> tuple:
    """K unpacked as the pair (K1, K2); their values are checked with the other window arguments."""
    try:
        k1, k2 = K
    except (TypeError, ValueError):
        raise ValueError(f"K must be a pair (K1, K2), got {K!r}") from None
    return k1, k2


def _window_rows(win: Tensor, channels: int) -> Tensor:
    """A caller's ``win`` (pytorch-msssim's (C, 1, 1, K), or (1, 1, K), or (K,)) as rows (C or 1, K)."""
    shape = tuple(win.shape) if isinstance(win, Tensor) else None
    if shape is None or len(shape) == 0 or any(s != 1 for s in shape[1:-1]) or (
            len(shape) > 1 and shape[0] not in (1, channels)):
        raise ValueError(f"win must be a 1-D window of shape (C, 1, 1, K) with C = {channels} (or 1), got "
                         f"{shape if shape is not None else type(win).__name__}")
    if shape[-1] % 2 != 1:
        raise ValueError("Window size should be odd.")
    return win.reshape(1 if len(shape) == 1 else shape[0], shape[-1])


def _ssim_per_channel_with_window(X, Y, window, data_range, k1, k2) -> Tensor:
    """SSIM per image and channel (N, C) with the caller's window (the reference formula)."""
    h, w = X.shape[-2:]
    k = window.shape[-1]
    if min(h, w) < k:
        raise ValueError(f"images must be at least {k}x{k} (the window), got {h}x{w}")
    compute_dtype = torch.float32 if X.dtype in (torch.float16, torch.bfloat16) else X.dtype
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    with torch.autocast(X.device.type, enabled=False):
        window = window.to(device=X.device, dtype=compute_dtype)
        return ssim_and_cs(X.to(compute_dtype), Y.to(compute_dtype), window, c1, c2)[0]


def ssim(
    X: Tensor,
    Y: Tensor,
    data_range: float = 255,
    size_average: bool = True,
    win_size: int = 11,
    win_sigma: float = 1.5,
    win: Optional[Tensor] = None,
    K: Constants = (0.01, 0.03),
    nonnegative_ssim: bool = False,
) -> Tensor:
    """pytorch-msssim's ``ssim``: SSIM of (N, C, H, W) images, a scalar (``size_average``) or one
    value per image; ``nonnegative_ssim`` clamps each channel's SSIM at 0 before the means."""
    X, Y = _images(X, Y)
    k1, k2 = _constants(K)
    if win is not None:
        window = _window_rows(win, X.shape[1])
        data_range, _, _, k1, k2 = window_args(data_range=data_range, win_size=window.shape[-1], sigma=win_sigma, k1=k1,
                                               k2=k2)
        per_channel = _ssim_per_channel_with_window(X, Y, window, data_range, k1, k2)
    else:
        kwargs = dict(data_range=data_range, win_size=win_size, sigma=win_sigma, k1=k1, k2=k2, padding="valid")
        if not nonnegative_ssim:  # the mean over channels is the mean of the whole map
            return _epban_ssim(X, Y, reduction="mean" if size_average else "none", **kwargs).to(X.dtype)
        n, c, h, w = X.shape  # one image per channel: SSIM per channel
        per_channel = _epban_ssim(X.reshape(n * c, 1, h, w), Y.reshape(n * c, 1, h, w), reduction="none",
                                  **kwargs).view(n, c)
    if nonnegative_ssim:
        per_channel = torch.relu(per_channel)
    value = per_channel.mean() if size_average else per_channel.mean(1)
    return value.to(X.dtype)


def ms_ssim(
    X: Tensor,
    Y: Tensor,
    data_range: float = 255,
    size_average: bool = True,
    win_size: int = 11,
    win_sigma: float = 1.5,
    win: Optional[Tensor] = None,
    weights: Optional[Sequence[float]] = None,
    K: Constants = (0.01, 0.03),
) -> Tensor:
    """pytorch-msssim's ``ms_ssim``: MS-SSIM of (N, C, H, W) images over ``len(weights)``
    scales (default 5), a scalar (``size_average``) or one value per image."""
    X, Y = _images(X, Y)
    k1, k2 = _constants(K)
    weights = MS_SSIM_WEIGHTS if weights is None else weights
    reduction = "mean" if size_average else "none"
    if win is None:
        value = _epban_ms_ssim(X, Y, data_range=data_range, win_size=win_size, sigma=win_sigma, weights=weights,
                               k1=k1, k2=k2, reduction=reduction, check_finite=False)
    else:
        window = _window_rows(win, X.shape[1])
        args = check_ms_ssim_args(X, Y, data_range=data_range, win_size=window.shape[-1], sigma=win_sigma,
                                  weights=weights, k1=k1, k2=k2, reduction=reduction)
        value = ms_ssim_with_window(X, Y, window, data_range=args["data_range"], weights=weights, k1=args["k1"],
                                    k2=args["k2"], reduction=reduction)
    return value.to(X.dtype)


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ValueError(f"epban.compat serves 2-D images (spatial_dims=2), got spatial_dims={spatial_dims!r} "
                         "(for volumes, use pytorch_msssim itself)")


class _WindowModule(torch.nn.Module):
    """What pytorch-msssim's two modules share: the window (``win``, rebuilt as theirs) and the
    arguments of every call. While ``win`` is the window built here, unchanged, epban's own window
    serves (and with it the fused path); a window put in its place, or edited in place, is used as
    given."""

    def __init__(self, data_range, size_average, win_size, win_sigma, channel, spatial_dims, K) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        self.win_size = win_size
        self.win = _fspecial_gauss_1d(win_size, win_sigma).repeat([channel, 1] + [1] * spatial_dims)
        # The built window and a private copy of its values: ``win`` is a plain attribute that a
        # caller may replace or edit in place (``win.copy_``, ``win.data = ...``)
        self._built = (self.win, self.win.clone(), win_size, win_sigma)
        self.size_average = size_average
        self.data_range = data_range
        self.K = K

    def _window_args(self) -> dict:
        built_win, built_values, win_size, win_sigma = self._built
        unchanged = (self.win is built_win and self.win.device == built_values.device
                     and torch.equal(self.win, built_values))  # CPU tensors: no device sync
        return dict(data_range=self.data_range, size_average=self.size_average, win_size=win_size,
                    win_sigma=win_sigma, win=None if unchanged else self.win, K=self.K)


class SSIM(_WindowModule):
    """pytorch-msssim's ``SSIM`` module: ``ssim`` with the arguments given here."""

    def __init__(
        self,
        data_range: float = 255,
        size_average: bool = True,
        win_size: int = 11,
        win_sigma: float = 1.5,
        channel: int = 3,
        spatial_dims: int = 2,
        K: Constants = (0.01, 0.03),
        nonnegative_ssim: bool = False,
    ) -> None:
        super().__init__(data_range, size_average, win_size, win_sigma, channel, spatial_dims, K)
        self.nonnegative_ssim = nonnegative_ssim

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        return ssim(X, Y, nonnegative_ssim=self.nonnegative_ssim, **self._window_args())


class MS_SSIM(_WindowModule):
    """pytorch-msssim's ``MS_SSIM`` module: ``ms_ssim`` with the arguments given here."""

    def __init__(
        self,
        data_range: float = 255,
        size_average: bool = True,
        win_size: int = 11,
        win_sigma: float = 1.5,
        channel: int = 3,
        spatial_dims: int = 2,
        weights: Optional[Sequence[float]] = None,
        K: Constants = (0.01, 0.03),
    ) -> None:
        super().__init__(data_range, size_average, win_size, win_sigma, channel, spatial_dims, K)
        self.weights = weights

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        return ms_ssim(X, Y, weights=self.weights, **self._window_args())


__all__ = ["ssim", "ms_ssim", "SSIM", "MS_SSIM"]
