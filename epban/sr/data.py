"""SR training and validation data: an HR folder (LR made on the fly) or paired LR/HR folders.

LR images made on the fly are MATLAB bicubic downsamplings of the HR image, rounded to
8 bits (as the LR PNGs of DIV2K and friends are). A random crop is downsampled from the
HR crop plus a margin of 2 * scale pixels (the antialiased kernel's reach), so it equals
the same crop of the whole image's LR exactly, at a fraction of the cost.

Which image, crop and flip a training sample gets is a function of (seed, sample number)
only (:class:`StepSampler`): a resumed run sees the same batches as an uninterrupted one,
whatever the number of DataLoader workers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from epban.imageio import IMAGE_SUFFIXES, ImageReadError, list_images, read_image
from epban.sr.imresize import bicubic_downsample, quantize


def image_size(path: Path, *, verify: bool = False) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels.

    ``verify=True`` also reads the rest of the file through Pillow's ``verify`` (for PNG: every
    chunk and its checksum, so a truncated or damaged file is found; other formats are checked
    by their header only). Either way a file that cannot be read is an ``ImageReadError``
    naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if verify:
                im.verify()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read as an image ({exc})") from None
    return h, w


def _images_in(folder: str | Path, role: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{role} folder {folder} does not exist or is not a folder")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{role} folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def _pair_lr(hr_paths: list[Path], lr_folder: str | Path, scale: int, role: str = "LR") -> list[Path]:
    """The LR file of each HR file: the same stem, or the stem + 'x{scale}' (DIV2K's naming)."""
    by_stem = {p.stem: p for p in _images_in(lr_folder, role)}
    lr_paths = []
    for hr in hr_paths:
        lr = by_stem.get(hr.stem) or by_stem.get(f"{hr.stem}x{scale}")
        if lr is None:
            raise ValueError(f"no LR image for {hr} in {lr_folder} (expected {hr.stem}.* or {hr.stem}x{scale}.*)")
        lr_paths.append(lr)
    return lr_paths


def augment(lr: torch.Tensor, hr: torch.Tensor, rng: np.random.Generator):
    """The same random horizontal flip, vertical flip and transpose (the 8 dihedral symmetries) for both."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    for flag, fn in ((hflip, lambda t: t.flip(-1)), (vflip, lambda t: t.flip(-2)), (transpose, lambda t: t.transpose(-1, -2))):
        if flag:
            lr, hr = fn(lr), fn(hr)
    return lr.contiguous(), hr.contiguous()


class SRFolderDataset(Dataset):
    """HR images from ``hr_folder``, LR from ``lr_folder`` or made on the fly by bicubic downsampling.

    ``patch_size`` is the HR crop side (a multiple of ``scale``), or None for whole images
    (``--full-res``). ``modcrop`` trims each HR image to a multiple of ``scale`` instead of
    refusing it. ``names`` is how messages name the HR and the LR folder (the CLI: its
    options). Items are dicts with ``lr``, ``hr`` (float32, [0, 1]) and ``name``.

    Every image (HR and paired LR) is opened when the dataset is made (``image_size`` with
    ``verify``): a file that cannot be read, or sizes that do not fit, stop a run before its
    first step, with the file's name. ``sizes`` holds each HR image's (H, W) after ``modcrop``.

    The key is an image index (whole image, or a centre crop when ``patch_size`` is set,
    no augmentation) or ``(index, sample_seed)`` (a random crop and augmentation drawn
    from ``sample_seed``; what :class:`StepSampler` yields).
    """

    def __init__(self, hr_folder, scale: int, *, lr_folder=None, patch_size: int | None = None,
                 augment: bool = True, modcrop: bool = False, quantize_lr: bool = True,
                 names: tuple[str, str] = ("HR", "LR")):
        if scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {scale}")
        if patch_size is not None and (patch_size <= 0 or patch_size % scale):
            raise ValueError(f"the HR patch size must be a positive multiple of the scale {scale}, got {patch_size}")
        self.scale, self.patch_size, self.augment, self.modcrop, self.quantize_lr = scale, patch_size, augment, modcrop, quantize_lr
        self.hr_paths = _images_in(hr_folder, names[0])
        self.lr_paths = _pair_lr(self.hr_paths, lr_folder, scale, names[1]) if lr_folder is not None else None
        self.sizes = [self._check(i, hr) for i, hr in enumerate(self.hr_paths)]

    def _check(self, i: int, hr: Path) -> tuple[int, int]:
        """Open the i-th HR image (and its LR) and check their sizes; the HR (H, W) after ``modcrop``."""
        s = self.scale
        h, w = image_size(hr, verify=True)
        if (h % s or w % s) and not self.modcrop:
            raise ValueError(
                f"{hr} is {h}x{w}, not divisible by the scale {s}; pass --modcrop to trim it, or crop it yourself"
            )
        if self.lr_paths is not None:
            lh, lw = image_size(self.lr_paths[i], verify=True)
            if (lh * s, lw * s) != (h - h % s, w - w % s):
                raise ValueError(f"{self.lr_paths[i]} is {lh}x{lw} but its HR {hr} is {h}x{w}; at x{s} they do not pair")
        h, w = h - h % s, w - w % s
        p = self.patch_size
        if p is not None and (h < p or w < p):
            raise ValueError(f"{hr} is {h}x{w}, smaller than the {p}x{p} crop; lower --patch-size or drop the image")
        return h, w

    def __len__(self) -> int:
        return len(self.hr_paths)

    def limit(self, n: int) -> None:
        """Keep the first ``n`` images (by file name)."""
        self.hr_paths = self.hr_paths[:n]
        self.sizes = self.sizes[:n]
        if self.lr_paths is not None:
            self.lr_paths = self.lr_paths[:n]

    def _read_hr(self, i: int) -> torch.Tensor:
        hr = read_image(self.hr_paths[i])
        h, w = hr.shape[-2:]
        return hr[:, : h - h % self.scale, : w - w % self.scale]

    def _lr_of(self, hr_region: torch.Tensor) -> torch.Tensor:
        lr = bicubic_downsample(hr_region, self.scale)
        return quantize(lr) if self.quantize_lr else lr

    def _crop(self, i: int, hr: torch.Tensor, ly: int, lx: int):
        """LR crop at LR position (ly, lx) and the matching HR crop."""
        s, p = self.scale, self.patch_size
        lp = p // s
        hr_crop = hr[:, ly * s : ly * s + p, lx * s : lx * s + p]
        if self.lr_paths is not None:
            lr = read_image(self.lr_paths[i])
            return lr[:, ly : ly + lp, lx : lx + lp], hr_crop
        m = 2 * s  # the antialiased cubic reaches 2 * scale HR pixels from an LR pixel's centre
        h, w = hr.shape[-2:]
        top, left = max(ly * s - m, 0), max(lx * s - m, 0)
        region = hr[:, top : min(ly * s + p + m, h), left : min(lx * s + p + m, w)]
        lr = self._lr_of(region)
        oy, ox = ly - top // s, lx - left // s
        return lr[:, oy : oy + lp, ox : ox + lp], hr_crop

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        hr = self._read_hr(index)
        name = self.hr_paths[index].stem
        if self.patch_size is None:
            if self.lr_paths is not None:
                lr = read_image(self.lr_paths[index])
            else:
                lr = self._lr_of(hr)
            rng = np.random.default_rng(sample_seed) if sample_seed is not None else None
        else:
            lh, lw = hr.shape[-2] // self.scale, hr.shape[-1] // self.scale
            lp = self.patch_size // self.scale
            if sample_seed is None:
                rng = None
                ly, lx = (lh - lp) // 2, (lw - lp) // 2
            else:
                rng = np.random.default_rng(sample_seed)
                ly, lx = int(rng.integers(0, lh - lp + 1)), int(rng.integers(0, lw - lp + 1))
            lr, hr = self._crop(index, hr, ly, lx)
        if rng is not None and self.augment:
            lr, hr = augment(lr, hr, rng)
        return {"lr": lr, "hr": hr, "name": name}


def collate(items: list[dict]) -> dict:
    """Stack a batch; whole images of different sizes cannot share a batch."""
    sizes = {tuple(it["hr"].shape) for it in items}
    if len(sizes) > 1:
        raise ValueError(
            f"a batch mixes image sizes {sorted(sizes)}: with --full-res use --batch-size 1 "
            "or images of one size"
        )
    return {
        "lr": torch.stack([it["lr"] for it in items]),
        "hr": torch.stack([it["hr"] for it in items]),
        "name": [it["name"] for it in items],
    }


class StepSampler(Sampler):
    """Yields ``(image_index, sample_seed)`` for the samples of steps ``start_step .. num_steps - 1``.

    Sample n (counted over all ranks: n = (step * world_size + rank) * batch_size + k)
    uses image ``perm_e[n mod N]`` with ``perm_e`` a seeded permutation for epoch
    e = n // N, and draws its crop and flips from the seed ``[seed, n]``.
    """

    def __init__(self, num_images: int, batch_size: int, num_steps: int, *, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.num_steps = num_images, batch_size, num_steps
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size

    def __len__(self) -> int:
        return max(self.num_steps - self.start_step, 0) * self.batch_size

    def __iter__(self):
        perms: dict[int, np.ndarray] = {}
        for step in range(self.start_step, self.num_steps):
            for k in range(self.batch_size):
                n = (step * self.world_size + self.rank) * self.batch_size + k
                epoch, pos = divmod(n, self.n)
                if epoch not in perms:
                    perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
                yield int(perms[epoch][pos]), [self.seed, n]
