"""A SYNTHETIC SR-quality set from the photos scikit-image ships, for demos and tests.

Each HR photo gets a panel of "SR" versions — nearest, bilinear, bicubic and Lanczos
upsampling of a bicubic-downscaled copy, Gaussian blur, ringing, noise, JPEG,
over-sharpening, and mixtures — and a PSEUDO-SCORE computed from the degradation
parameters, not from any human judgement:

    score = 100 * exp(-D),  D = sum of the severities of the degradations applied:

    upsampling x s with kernel k   U[k] * log2(s),  U = nearest 0.55, bilinear 0.50,
                                                        bicubic 0.40, lanczos 0.35
    Gaussian blur, sigma (px)      0.45 * sigma
    ringing (ideal low-pass,       1.2 * (1 - c)
      keeping a fraction c of the spectrum)
    Gaussian noise, std n          12 * n                 (n on the [0, 1] scale)
    JPEG, quality q                1.2 * (1 - q / 100) ** 2
    over-sharpening, amount a      0.18 * a               (unsharp mask, radius 1.5 px)

The scores rank the panel plausibly, but they do not stand in for human opinion scores:
a metric trained on them learns this formula, nothing more.
"""
from __future__ import annotations

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

UPSAMPLE_WEIGHT = {"nearest": 0.55, "bilinear": 0.50, "bicubic": 0.40, "lanczos": 0.35}
BLUR_WEIGHT, RINGING_WEIGHT, NOISE_WEIGHT, JPEG_WEIGHT, SHARPEN_WEIGHT = 0.45, 1.2, 12.0, 1.2, 0.18


def severity(params: dict) -> float:
    """D of the module docstring for one SR version's parameters."""
    d = 0.0
    if "upsample" in params:
        d += UPSAMPLE_WEIGHT[params["upsample"]] * math.log2(params["scale"])
    if "blur" in params:
        d += BLUR_WEIGHT * params["blur"]
    if "ringing" in params:
        d += RINGING_WEIGHT * (1.0 - params["ringing"])
    if "noise" in params:
        d += NOISE_WEIGHT * params["noise"]
    if "jpeg" in params:
        d += JPEG_WEIGHT * (1.0 - params["jpeg"] / 100.0) ** 2
    if "sharpen" in params:
        d += SHARPEN_WEIGHT * params["sharpen"]
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


def degradation_panel(scales, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """(method, params) of the SR versions of one photo; strengths are drawn per photo."""
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 3)  # noqa: E731
    panel = [(f"{k}_x{s}", {"upsample": k, "scale": s}) for s in scales for k in UPSAMPLE_WEIGHT]
    hi_scale, lo_scale = max(scales), min(scales)
    panel += [
        ("blur", {"blur": u(0.6, 1.5)}),
        ("blur", {"blur": u(1.5, 3.5)}),
        ("ringing", {"ringing": u(0.25, 0.6)}),
        ("noise", {"noise": u(0.01, 0.04)}),
        ("noise", {"noise": u(0.04, 0.1)}),
        ("jpeg", {"jpeg": int(rng.integers(5, 25))}),
        ("jpeg", {"jpeg": int(rng.integers(40, 95))}),
        ("oversharpen", {"sharpen": u(1.0, 4.0)}),
        (f"bicubic_x{hi_scale}+noise", {"upsample": "bicubic", "scale": hi_scale, "noise": u(0.01, 0.05)}),
        (f"bicubic_x{lo_scale}+jpeg", {"upsample": "bicubic", "scale": lo_scale, "jpeg": int(rng.integers(10, 60))}),
        ("blur+noise", {"blur": u(0.8, 2.0), "noise": u(0.01, 0.04)}),
        (f"lanczos_x{lo_scale}+oversharpen", {"upsample": "lanczos", "scale": lo_scale, "sharpen": u(1.0, 3.0)}),
        (f"bilinear_x{hi_scale}+jpeg", {"upsample": "bilinear", "scale": hi_scale, "jpeg": int(rng.integers(20, 80))}),
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

    ``size`` is the side of the square HR images (default 128). The folder is built under a
    temporary name and renamed when complete. An existing ``out_dir`` is replaced only if
    it is an earlier toy set; any other existing non-empty folder is an error.
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
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"wrote {len(rows)} SR/HR pairs from {len(photos)} photos to {out_dir} "
              f"({', '.join(f'{k} {v}' for k, v in counts.items())}); SYNTHETIC scores", file=sys.stderr)
    return out_dir / "manifest.csv"
