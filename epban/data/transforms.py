"""Paired transforms: SR and HR always get the same crop box and the same flip.

Randomness comes from an explicit ``numpy.random.Generator`` per item (seeded by the
sampler from the run seed, the epoch and the item), so augmentations do not depend on the
number of DataLoader workers or ranks, and a resumed run draws exactly what the
uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size), bilinear with antialiasing (as torchvision's Resize)."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    size: int

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return image[..., self.top:self.top + self.size, self.left:self.left + self.size]


@dataclass(frozen=True)
class PairedTrainTransform:
    """Random square crop (size drawn from ``crop_sizes``, clipped to the image) resized to
    ``out_size``, then a horizontal flip with probability 1/2 when ``hflip``."""

    crop_sizes: tuple[int, ...]
    out_size: int
    hflip: bool = True

    def draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[CropBox, bool]:
        size = min(int(rng.choice(self.crop_sizes)), height, width)
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
        flip = bool(self.hflip and rng.random() < 0.5)
        return CropBox(top, left, size), flip

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor, rng: np.random.Generator):
        if sr.shape != hr.shape:
            raise ValueError(f"SR and HR sizes differ: {tuple(sr.shape)} and {tuple(hr.shape)}")
        box, flip = self.draw(sr.shape[-2], sr.shape[-1], rng)
        out = []
        for image in (sr, hr):
            image = resize(box.apply(image), self.out_size)
            out.append(image.flip(-1) if flip else image)
        return out[0].contiguous(), out[1].contiguous()


@dataclass(frozen=True)
class PairedEvalTransform:
    """Resize both to ``size`` x ``size`` (the authors' protocol: 512), or keep full resolution (``None``)."""

    size: int | None = None

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor, rng=None):
        if sr.shape != hr.shape:
            raise ValueError(f"SR and HR sizes differ: {tuple(sr.shape)} and {tuple(hr.shape)}")
        if self.size is None:
            return sr, hr
        return resize(sr, self.size), resize(hr, self.size)


@dataclass(frozen=True)
class DataPolicy:
    """How images are fed to the metric in training and evaluation; saved with a run."""

    crop_sizes: tuple[int, ...]
    train_size: int
    hflip: bool = True
    eval_size: int | None = None  # None: full resolution

    @classmethod
    def authors(cls) -> "DataPolicy":
        """The authors' recipe (docs/architecture.md): random 768/900/1080 crops resized to 768,
        flips; evaluation at 512x512."""
        return cls(crop_sizes=(768, 900, 1080), train_size=768, hflip=True, eval_size=512)

    @classmethod
    def crop(cls, size: int, eval_size: int | None = None) -> "DataPolicy":
        """Plain random ``size`` crops with flips; evaluation at full resolution by default."""
        return cls(crop_sizes=(size,), train_size=size, hflip=True, eval_size=eval_size)

    @classmethod
    def for_config(cls, config_name: str) -> "DataPolicy":
        """The default for a model preset: the authors' recipe, or small crops for ``tiny``."""
        return cls.crop(96) if config_name == "tiny" else cls.authors()

    def train_transform(self) -> PairedTrainTransform:
        return PairedTrainTransform(tuple(self.crop_sizes), self.train_size, self.hflip)

    def eval_transform(self) -> PairedEvalTransform:
        return PairedEvalTransform(self.eval_size)

    def to_dict(self) -> dict:
        return {"crop_sizes": list(self.crop_sizes), "train_size": self.train_size, "hflip": self.hflip,
                "eval_size": self.eval_size}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPolicy":
        return cls(crop_sizes=tuple(d["crop_sizes"]), train_size=int(d["train_size"]), hflip=bool(d["hflip"]),
                   eval_size=None if d.get("eval_size") is None else int(d["eval_size"]))
