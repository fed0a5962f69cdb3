"""Procedural images and degraded pairs for pretraining, with no photo in them.

``dead_leaves`` draws the classic occlusion model of natural images (Lee, Mumford & Huang
2001): opaque discs, radii from a power law p(r) ~ r^-3 between ``r_min`` and ``r_max``,
dropped until the canvas is covered; each disc carries a flat colour, a colour gradient or
an oriented grating, so the images have edges, flat areas and texture at every scale — the
statistics that blur, noise, ringing and JPEG damage — without any of the toy set's photos.

Photos are not drawn with a ruler: the canvas is anti-aliased with a slight blur (sigma
0.3-0.8 px), a third of the leaves are filled with 1/f noise texture instead, and a smooth
illumination field shades the whole image.

``degraded_pair`` applies a random mixture of the toy set's degradations (resampling, blur,
ringing, over-sharpening, noise, JPEG) with strengths drawn from continuous ranges. Its
target is SSIM between the pair, not the toy set's pseudo-score formula.
"""
from __future__ import annotations

import numpy as np


def dead_leaves(size: int, rng: np.random.Generator, r_min: float = 3.0, r_max: float | None = None,
                max_discs: int = 4000) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]."""
    r_max = size / 3 if r_max is None else r_max
    canvas = np.zeros((size, size, 3), np.float32)
    texture = _pink_noise(size, rng)
    covered = np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(max_discs):
        # Inverse CDF of p(r) ~ r^-3 on [r_min, r_max].
        u = rng.random()
        r = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
        cy, cx = rng.uniform(-r, size + r, 2)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, size)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, size)
        if y0 >= y1 or x0 >= x1:
            continue
        sy, sx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        inside = ((sy - cy) ** 2 + (sx - cx) ** 2 <= r * r) & ~covered[y0:y1, x0:x1]
        if not inside.any():
            continue
        colour = _colour(rng)
        kind = rng.random()
        if kind < 0.35:
            patch = np.broadcast_to(colour, inside.shape + (3,))
        elif kind < 0.65:  # textured leaf: 1/f noise of random contrast around the leaf's colour
            patch = colour + rng.uniform(0.05, 0.4) * texture[y0:y1, x0:x1, None]
        else:
            theta = rng.uniform(0, np.pi)
            phase = (np.cos(theta) * (sx - cx) + np.sin(theta) * (sy - cy))[..., None]
            other = _colour(rng)
            if kind < 0.75:  # linear colour gradient across the disc
                t = np.clip(0.5 + phase / (2 * r), 0, 1)
            else:  # oriented grating, period 2..16 px
                t = 0.5 + 0.5 * np.sin(2 * np.pi * phase / rng.uniform(2.0, 16.0))
            patch = colour * (1 - t) + other * t
        canvas[y0:y1, x0:x1][inside] = patch[inside]
        covered[y0:y1, x0:x1] |= inside
        if covered.all():
            break
    from scipy.ndimage import gaussian_filter

    canvas = gaussian_filter(canvas, sigma=(rng.uniform(0.3, 0.8),) * 2 + (0,))
    shade = 1.0 + rng.uniform(0.0, 0.3) * _pink_noise(size, rng, exponent=3.0)
    return np.clip(canvas * shade[..., None], 0.0, 1.0).astype(np.float32)


def _pink_noise(size: int, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """(size, size) noise with power spectrum ~ 1/f^(2 exponent), scaled to unit max |value|."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f ** exponent
    spectrum[0, 0] = 0.0
    field = np.real(np.fft.ifft2(spectrum))
    return (field / max(np.abs(field).max(), 1e-12)).astype(np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A luminance in [0, 1] with a moderate chroma offset (photos are rarely saturated)."""
    return np.clip(rng.random() + 0.35 * (rng.random(3) - 0.5), 0, 1).astype(np.float32)


def random_degradation(rng: np.random.Generator, scale_choices=(2, 3, 4)) -> dict:
    """A random mixture of one to three of the toy set's degradations, continuous strengths."""
    from epban.data.toy import UPSAMPLE_CURVES

    params: dict = {}
    kinds = ["upsample", "blur", "ringing", "sharpen", "noise", "jpeg"]
    for kind in rng.choice(kinds, size=int(rng.integers(1, 4)), replace=False):
        if kind == "upsample":
            params["upsample"] = str(rng.choice(sorted(UPSAMPLE_CURVES)))
            params["scale"] = int(rng.choice(scale_choices))
        elif kind == "blur":
            params["blur"] = float(rng.uniform(0.3, 4.0))
        elif kind == "ringing":
            params["ringing"] = float(rng.uniform(0.2, 0.9))
        elif kind == "sharpen":
            params["sharpen"] = float(rng.uniform(0.3, 6.0))
        elif kind == "noise":
            params["noise"] = float(np.exp(rng.uniform(np.log(0.003), np.log(0.15))))
        else:
            params["jpeg"] = int(rng.integers(4, 96))
    return params


def degraded_pair(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(sr, hr, params): a dead-leaves HR image and a degraded version, both (size, size, 3) float32."""
    from epban.data.toy import _to_float, _to_pil, apply_degradations

    hr = dead_leaves(size, rng)
    params = random_degradation(rng)
    sr = _to_float(apply_degradations(_to_pil(hr), params, rng))
    return sr.astype(np.float32), _to_float(_to_pil(hr)).astype(np.float32), params
