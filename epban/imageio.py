"""Reading images for the CLI and the datasets: Pillow, RGB, float32 in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


def read_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read as an image ({exc})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def write_image(path: str | Path, image: torch.Tensor) -> None:
    """Write (3, H, W) in [0, 1] as an 8-bit image (format from the suffix)."""
    from PIL import Image

    arr = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
