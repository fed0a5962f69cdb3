"""A SYNTHETIC SR-quality set from the photos scikit-image ships, for demos and tests.

Each HR photo gets a panel of "SR" versions — nearest, bilinear, bicubic and Lanczos
upsampling of a bicubic-downscaled copy, Gaussian blur, ringing, noise, JPEG,
over-sharpening (each at several graded strengths) and mixtures — and a PSEUDO-SCORE
computed from the degradation parameters, not from any human judgement:

    score = 100 * exp(-D),  D = sum of the severities of the degradations applied.

Each severity is a piecewise-linear curve of its parameter through the knots below
(linear between knots, the end value beyond the last knot). The knots were calibrated
once, offline, as 3 x the median (1 - SSIM) over the 18 photos at 128x128, so that equal
D means comparable visible damage whatever the degradation; they are fixed constants:

    upsampling x s, kernel k        s = 1, 2, 3, 4, 8 (linear in log2 s):
                                      nearest  0, 0.44, 0.85, 1.11, 1.87
                                      bilinear 0, 0.45, 0.79, 1.08, 1.76
                                      bicubic  0, 0.35, 0.69, 0.98, 1.67
                                      lanczos  0, 0.32, 0.65, 0.95, 1.63
    Gaussian blur, sigma (px)       sigma = 0, 0.5, 0.75, 1, 1.5, 2, 3, 4
                                      D = 0, 0.05, 0.22, 0.39, 0.70, 0.99, 1.40, 1.66
    ringing (ideal low-pass         c = 1, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2
      keeping a fraction c of the     D = 0, 0.06, 0.15, 0.28, 0.54, 0.79, 1.23
      spectrum)
    Gaussian noise, std n           n = 0, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15  ([0, 1] scale)
                                      D = 0, 0.02, 0.09, 0.29, 0.71, 1.24, 1.62, 1.99
    JPEG, quality q                 q = 100, 95, 80, 60, 40, 25, 15, 8, 4
                                      D = 0.01, 0.05, 0.14, 0.23, 0.31, 0.40, 0.56, 0.85, 1.19
    over-sharpening, amount a       a = 0, 0.5, 1, 2, 3, 4, 6   (unsharp mask, radius 1.5 px)
                                      D = 0, 0.10, 0.28, 0.67, 0.92, 1.08, 1.33

The panel of each photo (42 versions with the default scales (2, 4)): the 4 kernels at
each scale; graded single degradations, one strength drawn per photo in each of these
disjoint ranges (so a type's levels are strictly ordered):

    blur sigma  0.5-0.8, 0.9-1.2, 1.3-1.7, 1.8-2.3, 2.5-3.0, 3.2-4.0
    ringing c   0.75-0.85, 0.6-0.7, 0.45-0.55, 0.33-0.4, 0.2-0.28
    noise n     0.005-0.01, 0.015-0.025, 0.03-0.045, 0.055-0.075, 0.085-0.11, 0.12-0.15
    JPEG q      80-95, 50-70, 30-45, 18-26, 10-15, 4-8
    sharpen a   0.4-0.8, 1.0-1.6, 1.9-2.6, 3.0-4.0, 4.5-6.0

and 6 mixtures (upsampling + noise or JPEG, blur + noise or JPEG), whose D is the sum.

The scores rank the panel plausibly, but they do not stand in for human opinion scores:
a metric trained on them learns this formula, nothing more.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

TOY_MARKER = ".epban-toy-dataset"
SYNTHETIC_WARNING = ("SYNTHETIC data: the toy set's scores are pseudo-scores computed from the degradation "
                     "parameters, not human opinion scores; use it for demos and tests only.")

# Severity curves (knots, values) of the module docstring; calibrated once, offline (3 x median 1 - SSIM).
UPSAMPLE_LOG2_SCALES = (0.0, 1.0, math.log2(3), 2.0, 3.0)
UPSAMPLE_CURVES = {
    "nearest": (0.0, 0.44, 0.85, 1.11, 1.87),
    "bilinear": (0.0, 0.45, 0.79, 1.08, 1.76),
    "bicubic": (0.0, 0.35, 0.69, 0.98, 1.67),
    "lanczos": (0.0, 0.32, 0.65, 0.95, 1.63),
}
BLUR_CURVE = ((0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0), (0.0, 0.05, 0.22, 0.39, 0.70, 0.99, 1.40, 1.66))
RINGING_CURVE = ((0.2, 0.3, 0.4, 0.55, 0.7, 0.85, 1.0), (1.23, 0.79, 0.54, 0.28, 0.15, 0.06, 0.0))
NOISE_CURVE = ((0.0, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15), (0.0, 0.02, 0.09, 0.29, 0.71, 1.24, 1.62, 1.99))
JPEG_CURVE = ((4, 8, 15, 25, 40, 60, 80, 95, 100), (1.19, 0.85, 0.56, 0.40, 0.31, 0.23, 0.14, 0.05, 0.01))
SHARPEN_CURVE = ((0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0), (0.0, 0.10, 0.28, 0.67, 0.92, 1.08, 1.33))


def is_toy(data) -> bool:
    """True when the manifest ``data`` (a file or a folder) belongs to a toy set: its scores are synthetic."""
    path = Path(data)
    return ((path if path.is_dir() else path.parent) / TOY_MARKER).exists()


def _curve(x: float, curve) -> float:
    knots, values = curve
    return float(np.interp(float(x), knots, values))


def severity(params: dict) -> float:
    """D of the module docstring for one SR version's parameters."""
    d = 0.0
    if "upsample" in params:
        d += _curve(math.log2(params["scale"]), (UPSAMPLE_LOG2_SCALES, UPSAMPLE_CURVES[params["upsample"]]))
    if "blur" in params:
        d += _curve(params["blur"], BLUR_CURVE)
    if "ringing" in params:
        d += _curve(params["ringing"], RINGING_CURVE)
    if "noise" in params:
        d += _curve(params["noise"], NOISE_CURVE)
    if "jpeg" in params:
        d += _curve(params["jpeg"], JPEG_CURVE)
    if "sharpen" in params:
        d += _curve(params["sharpen"], SHARPEN_CURVE)
    return d


def pseudo_score(params: dict) -> float:
    return 100.0 * math.exp(-severity(params))


# --------------------------------------------------------------------------- photos
def _photos() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) for each photo of skimage.data available offline (no download)."""
    from skimage import data

    def motorcycle():
        return data.stereo_motorcycle()[0]

    loaders = {
        "astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "camera": data.camera,
        "rocket": data.rocket, "hubble_deep_field": data.hubble_deep_field,
        "immunohistochemistry": data.immunohistochemistry, "motorcycle": motorcycle, "retina": data.retina,
        "coins": data.coins, "moon": data.moon, "clock": data.clock, "brick": data.brick, "grass": data.grass,
        "gravel": data.gravel, "colorwheel": data.colorwheel, "page": data.page, "text": data.text,
    }
    photos = []
    for name, load in loaders.items():
        try:
            arr = np.asarray(load())
        except Exception:  # a photo that needs the network (pooch) is skipped
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        photos.append((name, np.ascontiguousarray(arr[..., :3]).astype(np.uint8)))
    return photos


def _square(arr: np.ndarray, size: int):
    from PIL import Image

    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return Image.fromarray(arr[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)


# --------------------------------------------------------------------------- degradations
def _to_float(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64) / 255.0


def _to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8))


def _upsample(img, scale: int, kernel: str):
    from PIL import Image

    filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS}
    w, h = img.size
    lr = img.resize((w // scale, h // scale), Image.BICUBIC)
    return lr.resize((w, h), filters[kernel])


def _blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(arr, sigma=(sigma, sigma, 0), mode="reflect")


def _ringing(arr: np.ndarray, keep: float) -> np.ndarray:
    """Ideal (box) low-pass in the Fourier domain: the Gibbs phenomenon rings at every edge."""
    h, w = arr.shape[:2]
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    mask = (np.abs(fy) <= 0.5 * keep) & (np.abs(fx) <= 0.5 * keep)
    spec = np.fft.fft2(arr, axes=(0, 1)) * mask[..., None]
    return np.real(np.fft.ifft2(spec, axes=(0, 1)))


def _jpeg(img, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def apply_degradations(hr, params: dict, rng: np.random.Generator):
    """The SR version of PIL image ``hr`` described by ``params`` (applied in a fixed order)."""
    img = hr
    if "upsample" in params:
        img = _upsample(img, params["scale"], params["upsample"])
    arr = _to_float(img)
    if "blur" in params:
        arr = _blur(arr, params["blur"])
    if "ringing" in params:
        arr = _ringing(arr, params["ringing"])
    if "sharpen" in params:
        arr = arr + params["sharpen"] * (arr - _blur(arr, 1.5))
    if "noise" in params:
        arr = arr + rng.normal(0.0, params["noise"], size=arr.shape)
    img = _to_pil(arr)
    if "jpeg" in params:
        img = _jpeg(img, params["jpeg"])
    return img


# Graded strengths of each single degradation: one value is drawn per photo in each range,
# so the levels of a type are strictly ordered within every photo's panel.
BLUR_LEVELS = ((0.5, 0.8), (0.9, 1.2), (1.3, 1.7), (1.8, 2.3), (2.5, 3.0), (3.2, 4.0))
RINGING_LEVELS = ((0.75, 0.85), (0.6, 0.7), (0.45, 0.55), (0.33, 0.4), (0.2, 0.28))
NOISE_LEVELS = ((0.005, 0.01), (0.015, 0.025), (0.03, 0.045), (0.055, 0.075), (0.085, 0.11), (0.12, 0.15))
JPEG_LEVELS = ((80, 95), (50, 70), (30, 45), (18, 26), (10, 15), (4, 8))
SHARPEN_LEVELS = ((0.4, 0.8), (1.0, 1.6), (1.9, 2.6), (3.0, 4.0), (4.5, 6.0))


def degradation_panel(scales, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """(method, params) of the SR versions of one photo; strengths are drawn per photo."""
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 3)  # noqa: E731
    q = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    panel = [(f"{k}_x{s}", {"upsample": k, "scale": s}) for s in scales for k in UPSAMPLE_CURVES]
    hi_scale, lo_scale = max(scales), min(scales)
    panel += [("blur", {"blur": u(*r)}) for r in BLUR_LEVELS]
    panel += [("ringing", {"ringing": u(*r)}) for r in RINGING_LEVELS]
    panel += [("noise", {"noise": u(*r)}) for r in NOISE_LEVELS]
    panel += [("jpeg", {"jpeg": q(*r)}) for r in JPEG_LEVELS]
    panel += [("oversharpen", {"sharpen": u(*r)}) for r in SHARPEN_LEVELS]
    panel += [
        (f"bicubic_x{hi_scale}+noise", {"upsample": "bicubic", "scale": hi_scale, "noise": u(0.01, 0.04)}),
        (f"bicubic_x{lo_scale}+jpeg", {"upsample": "bicubic", "scale": lo_scale, "jpeg": q(15, 60)}),
        ("blur+noise", {"blur": u(0.8, 2.0), "noise": u(0.01, 0.04)}),
        ("blur+jpeg", {"blur": u(0.6, 1.5), "jpeg": q(15, 60)}),
        (f"bilinear_x{hi_scale}+jpeg", {"upsample": "bilinear", "scale": hi_scale, "jpeg": q(20, 80)}),
        (f"nearest_x{lo_scale}+noise", {"upsample": "nearest", "scale": lo_scale, "noise": u(0.01, 0.04)}),
    ]
    return panel


def _split_photos(names: list[str], rng: np.random.Generator) -> dict[str, str]:
    """Whole photos to splits (about 4/6 train, 1/6 val, 1/6 test; at least 2 photos in val and test)."""
    order = [names[i] for i in rng.permutation(len(names))]
    n_test = n_val = max(2, len(names) // 6)
    split = {}
    for i, name in enumerate(order):
        split[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


# What a toy set writes in its folder; replacing a set replaces these and keeps anything else.
# Swapped in this order: the marker first (an interrupted swap still reads as a toy set, which
# the next run may replace), the manifest, through which a set is read, last.
TOY_ENTRIES = (TOY_MARKER, "HR", "SR", "degradations.json", "README.md", "manifest.csv")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _swap_in(new: Path, out_dir: Path) -> None:
    """Move the ``TOY_ENTRIES`` of folder ``new`` into ``out_dir``, replacing the ones there.

    The old entries are moved aside (renames, no copying) and removed only when every new one
    is in place; if a move fails, those already made are undone, so ``out_dir`` keeps the old
    set whole.
    """
    old = out_dir / f".epban-toy.old-{uuid.uuid4().hex[:8]}"
    old.mkdir()
    placed = []
    try:
        for name in TOY_ENTRIES:
            if os.path.lexists(out_dir / name):
                os.replace(out_dir / name, old / name)
            os.replace(new / name, out_dir / name)
            placed.append(name)
    except BaseException:
        for name in TOY_ENTRIES:
            if name in placed:
                _remove(out_dir / name)
            if os.path.lexists(old / name):
                os.replace(old / name, out_dir / name)
        with contextlib.suppress(OSError):
            old.rmdir()  # empty unless an old entry could not be put back
        raise
    shutil.rmtree(old, ignore_errors=True)


README = """# SYNTHETIC SR-quality toy set (epban)

**The scores in this folder are SYNTHETIC.** They are pseudo-scores computed from the
degradation parameters by a fixed formula, not opinions of human observers. A metric
trained on them learns that formula; use the set for demos, tests and smoke runs only,
never to claim perceptual quality.

- `HR/`: {n_photos} photos from scikit-image's sample data (`skimage.data`), centre-cropped
  and resized to {size}x{size}.
- `SR/`: {n_pairs} degraded versions (the panel below), the same size as their HR.
- `manifest.csv`: `sr_path,hr_path,score,method,split`; split by photo (no photo is in two
  splits): {split_counts}.
- `degradations.json`: the parameters and the severity D of every SR image.

Made by `epban make-dataset --toy` (seed {seed}, scales {scales}).

## The pseudo-score
{formula}
"""


def make_toy_dataset(out_dir, *, seed: int = 0, scales=(2, 4), size: int | None = None,
                     quiet: bool = False) -> Path:
    """Write the SYNTHETIC toy SR-quality set to ``out_dir``; return the path of its manifest.csv.

    ``size`` is the side of the square HR images (default 128). The set is built under a
    temporary name and moved into place when complete. An existing non-empty ``out_dir`` must
    be an earlier toy set (else FileExistsError): only the entries the set owns
    (``TOY_ENTRIES``) are replaced, anything else in the folder is kept.
    """
    size = 128 if size is None else int(size)
    scales = tuple(int(s) for s in scales)
    if not scales or min(scales) < 2:
        raise ValueError(f"scales must be integers >= 2, got {scales!r}")
    if size < 32 or any(size % s for s in scales):
        raise ValueError(f"size must be >= 32 and divisible by every scale {scales}, got {size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / TOY_MARKER).exists():
        raise FileExistsError(f"{out_dir} exists and is not an epban toy set; choose another folder")
    if not quiet:
        print(f"warning: {SYNTHETIC_WARNING}", file=sys.stderr)

    rng = np.random.default_rng(seed)
    photos = _photos()
    if len(photos) < 8:
        raise RuntimeError(f"only {len(photos)} scikit-image photos are available offline; the toy set needs 8")
    splits = _split_photos([name for name, _ in photos], rng)

    # A new folder is built beside it and renamed in one step; an existing one gets its owned
    # entries swapped in (_swap_in), from a temporary folder inside it (same file system).
    replace = out_dir.is_dir()
    if replace:
        tmp = out_dir / f".epban-toy.tmp-{uuid.uuid4().hex[:8]}"
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "HR").mkdir(parents=True)
    (tmp / "SR").mkdir()
    rows, records = [], []
    try:
        for name, arr in photos:
            hr = _square(arr, size)
            hr_rel = f"HR/{name}.png"
            hr.save(tmp / hr_rel)
            for j, (method, params) in enumerate(degradation_panel(scales, rng)):
                sr = apply_degradations(hr, params, rng)
                sr_rel = f"SR/{name}_{j:02d}_{method.replace('+', '-')}.png"
                sr.save(tmp / sr_rel)
                score = round(pseudo_score(params), 4)
                rows.append((sr_rel, hr_rel, f"{score:.4f}", method, splits[name]))
                records.append({"sr_path": sr_rel, "hr_path": hr_rel, "method": method, "params": params,
                                "severity": round(severity(params), 6), "score": score})
        counts = {s: sum(r[4] == s for r in rows) for s in ("train", "val", "test")}
        with open(tmp / "manifest.csv", "w", newline="") as f:
            f.write(f"# {SYNTHETIC_WARNING}\n")
            f.write("# score = 100 * exp(-D), D from the degradation parameters: see README.md\n")
            writer = csv.writer(f)
            writer.writerow(["sr_path", "hr_path", "score", "method", "split"])
            writer.writerows(rows)
        (tmp / "degradations.json").write_text(json.dumps(
            {"synthetic": True, "note": SYNTHETIC_WARNING, "seed": seed, "scales": list(scales), "size": size,
             "images": records}, indent=1) + "\n")
        formula = __doc__.split("parameters, not from any human judgement:")[1].split("The scores rank")[0]
        (tmp / "README.md").write_text(README.format(
            n_photos=len(photos), size=size, n_pairs=len(rows), seed=seed, scales=list(scales),
            split_counts=", ".join(f"{k} {v}" for k, v in counts.items()),
            formula="```" + formula.rstrip() + "\n```"))
        (tmp / TOY_MARKER).write_text(SYNTHETIC_WARNING + "\n")
        if replace:
            _swap_in(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    if not quiet:
        print(f"wrote {len(rows)} SR/HR pairs from {len(photos)} photos to {out_dir} "
              f"({', '.join(f'{k} {v}' for k, v in counts.items())}); SYNTHETIC scores", file=sys.stderr)
    return out_dir / "manifest.csv"
