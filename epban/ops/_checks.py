"""Input validation shared by the ops: users get ValueError saying what was expected."""
from __future__ import annotations

import torch


def check_image_pair(x: torch.Tensor, y: torch.Tensor, *, name_x: str = "x", name_y: str = "y",
                     same_dtype: bool = True) -> None:
    for name, t in ((name_x, x), (name_y, y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{name_x} and {name_y} must be on the same device, got {x.device} and {y.device}")
    if same_dtype and x.dtype != y.dtype:
        raise ValueError(f"{name_x} and {name_y} must have the same dtype, got {x.dtype} and {y.dtype}")
