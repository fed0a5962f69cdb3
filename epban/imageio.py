"""Reading images for the CLI and the datasets: Pillow, RGB, float32 in [0, 1], at the file's precision.

Samples are scaled by their type's full range: 8-bit by 255, 16-bit by 65535, whatever
Pillow's mode. Pillow itself keeps only the high byte of 16-bit colour samples (a 16-bit RGB
PNG or TIFF opens as mode ``RGB``), and its ``convert("RGB")`` clips 16-bit grey to 255
(most of a 16-bit grey image would read as white), so neither is used for those:

    mode                          read as
    1, L, P, RGB, RGBA, CMYK, ... ``convert("RGB")`` / 255 (alpha dropped, palette applied)
    LA, La, PA                    the grey (or palette) channel, alpha dropped
    I;16, I;16B, I;16L, I;16N     16-bit grey / 65535
    I (32-bit integer)            / 65535: 16-bit samples held in 32 bits (a value beyond
                                  0..65535 has no known scale and is refused)
    F (32-bit float)              as stored, which must lie in [0, 1] (else refused)
    16-bit RGB, RGBA, LA          every bit: the file is decoded a second time for the low
                                  bytes (``_sixteen_bit_colour``)

Every problem is an ``ImageReadError`` naming the file.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Pillow's raw modes of 16-bit colour samples, which it unpacks to 8 bits (the high byte).
_SIXTEEN_BIT_COLOUR = re.compile(r"^(RGB|RGBA|RGBX);16([BLN])$")


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


def read_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], at the file's precision (see the module docstring)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = _rgb_array(im, path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read as an image ({exc})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def probe_image(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, after checking the file's structure without decoding its
    pixels (Pillow's ``verify``: a truncated or corrupted PNG fails here). Cheap enough to
    run on every file of a data set before any work starts."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            size = im.height, im.width
            im.verify()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from None
    return size


def _rgb_array(im, path: Path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from an open Pillow image."""
    rawmodes = {_rawmode(tile) for tile in im.tile}
    if len(rawmodes) == 1:
        rawmode = rawmodes.pop()
        if isinstance(rawmode, str) and (_SIXTEEN_BIT_COLOUR.match(rawmode) or rawmode == "LA;16B"):
            return _sixteen_bit_colour(im, path, rawmode)
    mode = im.mode
    if mode.startswith("I;16"):
        grey = np.asarray(im).astype(np.float32) / 65535.0
    elif mode == "I":
        values = np.asarray(im)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageReadError(f"{path}: 32-bit integer samples in [{lo}, {hi}] have no known scale "
                                 "(16-bit samples, 0..65535, are read); save it with 8 or 16 bits per sample")
        grey = values.astype(np.float32) / 65535.0
    elif mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        lo, hi = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
            raise ImageReadError(f"{path}: floating-point samples in [{lo:.4g}, {hi:.4g}]; expected [0, 1]")
    elif mode in ("LA", "La"):
        grey = np.asarray(im.getchannel(0), dtype=np.float32) / 255.0
    else:
        if mode == "PA":
            im = im.convert("RGBA")
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(grey[:, :, None], 3, axis=2)


def _rawmode(tile):
    """The raw mode of a Pillow tile: its ``args``, or their first entry."""
    args = tile[3]
    return args if isinstance(args, str) or not args else args[0]


def _with_rawmode(tile, raw: str):
    """``tile`` (codec, extents, offset, args) with raw mode ``raw``."""
    args = raw if isinstance(tile[3], str) else (raw, *tile[3][1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _sixteen_bit_colour(im, path: Path, rawmode: str) -> np.ndarray:
    """Every bit of a 16-bit RGB, RGBA or grey + alpha image, as (H, W, 3) float32 in [0, 1].

    Pillow unpacks such samples to their high byte. Its decoder does the file's own work
    (inflating, PNG row filters, TIFF compression) on the whole 16-bit sample whatever raw
    mode then unpacks it, so the file is decoded twice: once with its own raw mode (the high
    bytes) and once with the opposite byte order (the low bytes). Grey + alpha (4 bytes a
    pixel) is decoded once, its 4 bytes unpacked as the 8-bit RGBA raw mode. The raw mode is
    each tile's (``Image.tile``, Pillow's documented interface for image plugins).
    """
    from PIL import Image

    tiles = list(im.tile)

    def decode(raw: str) -> np.ndarray:
        with Image.open(path) as again:
            again.tile = [_with_rawmode(tile, raw) for tile in tiles]
            again.load()
            return np.asarray(again, dtype=np.uint16)

    if rawmode == "LA;16B":
        grey_hi, grey_lo = np.moveaxis(decode("RGBA")[:, :, :2], 2, 0)
        grey = (grey_hi * 256 + grey_lo).astype(np.float32) / 65535.0
        return np.repeat(grey[:, :, None], 3, axis=2)
    mode, order = _SIXTEEN_BIT_COLOUR.match(rawmode).groups()
    native = "B" if sys.byteorder == "big" else "L"
    big = (order if order != "N" else native) == "B"
    high = np.asarray(im, dtype=np.uint16)  # Pillow's own decode: the high bytes
    low = decode(f"{mode};16{'L' if big else 'B'}")
    if high.shape != low.shape:
        raise ImageReadError(f"{path}: cannot read the 16-bit samples (decoded shapes {high.shape}, {low.shape})")
    return ((high[:, :, :3] * 256 + low[:, :, :3]).astype(np.float32) / 65535.0)


def write_image(path: str | Path, image: torch.Tensor) -> None:
    """Write (3, H, W) in [0, 1] as an 8-bit image (format from the suffix)."""
    from PIL import Image

    arr = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
