"""Helpers shared by the ops: input checks (users get a ValueError saying what was expected),
dense layouts, and the grid arithmetic of the launchers.

Which implementation serves a call is decided in ``epban.ops.registry``, not here.
"""
from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as ``triton.cdiv`` (which is not importable without Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def check_nchw_float(name: str, t) -> None:
    """``t`` must be a 4-D (B, C, H, W) floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
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

