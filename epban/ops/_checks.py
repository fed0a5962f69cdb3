"""Helpers shared by the ops: input checks (users get a ValueError saying what was expected),
dense layouts, and the grid arithmetic of the launchers.

Which implementation serves a call is decided in ``epban.ops.registry``, not here.
"""
from __future__ import annotations

import math
import numbers

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as ``triton.cdiv`` (which is not importable without Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def check_nchw_float(name: str, t) -> None:
    """``t`` must be a 4-D (B, C, H, W) floating-point tensor with at least one channel, row and
    column (an empty batch passes: B = 0 gives empty results)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if 0 in t.shape[1:]:
        raise ValueError(f"{name} must have at least one channel, row and column, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_image_pair(x: torch.Tensor, y: torch.Tensor, *, name_x: str = "x", name_y: str = "y",
                     same_dtype: bool = True) -> None:
    for name, t in ((name_x, x), (name_y, y)):
        check_nchw_float(name, t)
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{name_x} and {name_y} must be on the same device, got {x.device} and {y.device}")
    if same_dtype and x.dtype != y.dtype:
        raise ValueError(f"{name_x} and {name_y} must have the same dtype, got {x.dtype} and {y.dtype}")


def check_batch_for_mean(x: torch.Tensor, reduction: str) -> None:
    """A batch mean needs at least one image (the mean of none would be NaN)."""
    if reduction == "mean" and x.shape[0] == 0:
        raise ValueError(f"the inputs hold no image (batch size 0, shape {tuple(x.shape)}): their mean is undefined "
                         "(reduction='none' gives an empty result)")


# ----------------------------------------------------------------------------- numeric arguments


def _real(value) -> float | None:
    """``value`` as a float when it is one real number (a Python or NumPy number, bool refused,
    or a one-element real tensor, read with a host sync), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_loss_weight(name: str, value) -> float:
    """A loss term's weight: a finite non-negative real number, as a float. Not a tensor: the
    weight is used as a float, so a tensor's autograd (a learnt weight) would be dropped."""
    weight = None if isinstance(value, torch.Tensor) else _real(value)
    if weight is None or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return weight


def window_args(*, data_range, win_size, sigma, k1, k2) -> tuple[float, int, float, float, float]:
    """The SSIM window and constants checked (ValueError naming the argument) and normalised to
    Python numbers: ``(data_range, win_size, sigma, k1, k2)``. data_range, sigma, k1 and k2 are
    real numbers (NumPy scalars and one-element tensors too, as pytorch-msssim takes them),
    win_size an integer (NumPy's too)."""
    if isinstance(win_size, bool) or not isinstance(win_size, numbers.Integral) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size!r}")
    range_ = _real(data_range)
    if range_ is None or not (0 < range_ < math.inf):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    sigma_ = _real(sigma)
    # The window is exp(-d^2 / (2 sigma^2)): 2 sigma^2 must be a positive finite float (an
    # underflow to 0 makes the window NaN, an overflow breaks its computation)
    if sigma_ is None or not (0 < 2 * sigma_ * sigma_ < math.inf):
        raise ValueError(f"sigma must be a positive finite number whose Gaussian window is finite "
                         f"(2 sigma^2 neither 0 nor inf in float64), got {sigma!r}")
    ks = []
    for name, k in (("k1", k1), ("k2", k2)):
        value = _real(k)
        if value is None or not (0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite non-negative number, got {k!r}")
        ks.append(value)
    return range_, int(win_size), sigma_, ks[0], ks[1]


# ----------------------------------------------------------------------------- dense layouts


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether t is laid out channels_last (and not also plain contiguous: then NCHW serves)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def needs_int64_offsets(*tensors, slack: int = 0) -> bool:
    """Whether an element offset of these tensors (through their strides), plus ``slack``
    (a program's block past the end), may reach 2^31: the kernels then index in 64 bits."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + slack >= 2**31 for t in tensors)

