"""Procedural images and degraded pairs for pretraining, with no photo in them.

``dead_leaves`` draws the classic occlusion model of natural images (Lee, Mumford & Huang
2001): opaque discs, radii from a power law p(r) ~ r^-3 between ``r_min`` and ``r_max``,
dropped until the canvas is covered; each disc carries a flat colour, a colour gradient or
an oriented grating, so the images have edges, flat areas and texture at every scale — the
statistics that blur, noise, ringing and JPEG damage — without any of the toy set's photos.

Photos are not drawn with a ruler: the canvas is anti-aliased with a slight blur (sigma
0.3-0.8 px), a third of the leaves are filled with 1/f noise texture instead, and a smooth
illumination field shades the whole image.

``leaf_scene`` varies the scene from image to image the way photos vary (scale and
clutter, key and contrast, grey-level or colour, straight-edged shapes, depth-of-field
softness). A network pretrained on it predicts SSIM on photos far better than one
pretrained on ``dead_leaves``, yet it is a worse starting point for fine-tuning on the toy
set's pseudo-scores; the bundled weights stay on ``dead_leaves``.

``degraded_pair`` applies a random mixture of the toy set's degradations (resampling, blur,
ringing, over-sharpening, noise, JPEG) with strengths drawn from continuous ranges. Its
target is SSIM between the pair, not the toy set's pseudo-score formula.
"""
from __future__ import annotations

import numpy as np


def _random_leaf(rng: np.random.Generator, size: int, r_min: float, r_max: float):
    """Radius (inverse CDF of p(r) ~ r^-3 on [r_min, r_max]), centre, and its clipped bounding box."""
    u = rng.random()
    r = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
    cy, cx = rng.uniform(-r, size + r, 2)
    box = (max(int(cy - r), 0), min(int(cy + r) + 2, size), max(int(cx - r), 0), min(int(cx + r) + 2, size))
    return r, cy, cx, box


def _two_tone(rng, dx, dy, r, colour, other, *, gradient: bool, theta: float):
    """A leaf blending two colours along direction theta: a linear gradient across the leaf,
    or an oriented grating of period 2..16 px (drawn from ``rng``)."""
    phase = (np.cos(theta) * dx + np.sin(theta) * dy)[..., None]
    if gradient:
        t = np.clip(0.5 + phase / (2 * r), 0, 1)
    else:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * phase / rng.uniform(2.0, 16.0))
    return colour * (1 - t) + other * t


def _paint(canvas, covered, box, inside, patch) -> bool:
    """Paint a leaf's visible pixels (leaves in front come first); True once the canvas is full."""
    y0, y1, x0, x1 = box
    canvas[y0:y1, x0:x1][inside] = patch[inside]
    covered[y0:y1, x0:x1] |= inside
    return bool(covered.all())


def dead_leaves(size: int, rng: np.random.Generator, r_min: float = 3.0, r_max: float | None = None,
                max_discs: int = 4000) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]."""
    r_max = size / 3 if r_max is None else r_max
    canvas = np.zeros((size, size, 3), np.float32)
    texture = _pink_noise(size, rng)
    covered = np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(max_discs):
        r, cy, cx, (y0, y1, x0, x1) = _random_leaf(rng, size, r_min, r_max)
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
            patch = _two_tone(rng, sx - cx, sy - cy, r, colour, _colour(rng), gradient=kind < 0.75, theta=theta)
        if _paint(canvas, covered, (y0, y1, x0, x1), inside, patch):
            break
    from scipy.ndimage import gaussian_filter

    canvas = gaussian_filter(canvas, sigma=(rng.uniform(0.3, 0.8),) * 2 + (0,))
    shade = 1.0 + rng.uniform(0.0, 0.3) * _pink_noise(size, rng, exponent=3.0)
    return np.clip(canvas * shade[..., None], 0.0, 1.0).astype(np.float32)


def leaf_scene(size: int, rng: np.random.Generator, max_leaves: int = 4000) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: a dead-leaves scene with photo-like variety between images.

    ``dead_leaves`` makes every image alike: busy, saturated, sharp, all of it covered by
    small leaves. Photos differ from one another far more, and a metric must judge damage
    on all of them. Each scene draws its own:

    - scale and clutter: the smallest leaf (1.5-16 px, log-uniform), the largest, and how
      many leaves fall (30 to ``max_leaves``, log-uniform) on a smooth background: from
      wide empty areas (sky, walls) to dense fine clutter;
    - tonality: a key luminance and a spread (dark, bright, low-contrast scenes), and a
      chroma from none (a grey-level image, 40 %) to moderate;
    - shapes: discs, ellipses and rotated rectangles (straight edges and corners);
    - fills: flat, 1/f or fine-grain texture of random contrast, gradients, gratings;
    - optics: anti-aliasing to depth-of-field softness (sigma 0.3-2 px), smooth shading,
      and sometimes a little sensor noise.

    Kept for experiments: see the module docstring for how it compared.
    """
    from scipy.ndimage import gaussian_filter

    key, spread = rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.35)
    chroma = 0.0 if rng.random() < 0.4 else rng.uniform(0.05, 0.5)

    def colour():
        lum = np.clip(key + spread * rng.normal(), 0.0, 1.0)
        return np.clip(lum + chroma * (rng.random(3) - 0.5), 0.0, 1.0).astype(np.float32)

    r_min = float(np.exp(rng.uniform(np.log(1.5), np.log(16.0))))
    r_max = max(r_min * 1.5, size * rng.uniform(0.2, 0.8))
    n_leaves = int(np.exp(rng.uniform(np.log(30), np.log(max_leaves))))
    p_texture = rng.uniform(0.0, 0.7)
    textures = [_pink_noise(size, rng, exponent=1.0), _pink_noise(size, rng, exponent=0.5)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: a smooth field between two colours (sky, wall, a blurred distance).
    t = 0.5 + 0.5 * _pink_noise(size, rng, exponent=2.0)
    canvas = colour() * (1 - t[..., None]) + colour() * t[..., None]
    covered = np.zeros((size, size), bool)
    for _ in range(n_leaves):
        r, cy, cx, (y0, y1, x0, x1) = _random_leaf(rng, size, r_min, r_max)
        if y0 >= y1 or x0 >= x1:
            continue
        sy, sx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        shape = rng.random()
        if shape < 0.5:
            inside = sy * sy + sx * sx <= r * r
        else:
            theta = rng.uniform(0, np.pi)
            a, b = np.cos(theta) * sx + np.sin(theta) * sy, -np.sin(theta) * sx + np.cos(theta) * sy
            aspect = float(np.exp(rng.uniform(np.log(0.06), 0.0)))  # down to thin strokes
            if shape < 0.75:
                inside = (a / r) ** 2 + (b / (r * aspect)) ** 2 <= 1.0
            else:
                inside = (np.abs(a) <= r * 0.8) & (np.abs(b) <= r * 0.8 * aspect)
        inside &= ~covered[y0:y1, x0:x1]
        if not inside.any():
            continue
        c = colour()
        kind = rng.random()
        if kind < p_texture:
            tex = textures[int(rng.integers(2))][y0:y1, x0:x1, None]
            patch = c + rng.uniform(0.02, 0.4) * tex
        elif kind < p_texture + (1 - p_texture) * 0.6:
            patch = np.broadcast_to(c, inside.shape + (3,))
        else:
            theta = rng.uniform(0, np.pi)
            other = colour()
            patch = _two_tone(rng, sx, sy, r, c, other, gradient=rng.random() < 0.6, theta=theta)
        if _paint(canvas, covered, (y0, y1, x0, x1), inside, patch):
            break
    sigma = rng.uniform(0.3, 0.8) if rng.random() < 0.7 else rng.uniform(0.8, 2.0)
    canvas = gaussian_filter(canvas, sigma=(sigma, sigma, 0))
    canvas = canvas * (1.0 + rng.uniform(0.0, 0.3) * _pink_noise(size, rng, exponent=3.0))[..., None]
    if rng.random() < 0.3:
        canvas = canvas + rng.uniform(0.002, 0.01) * rng.normal(size=(size, size, 1 if chroma == 0 else 3))
    return np.clip(canvas, 0.0, 1.0).astype(np.float32)


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


GENERATORS = {"scenes": leaf_scene, "leaves": dead_leaves}


def degraded_pair(size: int, rng: np.random.Generator, images: str = "leaves") -> tuple[np.ndarray, np.ndarray, dict]:
    """(sr, hr, params): a procedural HR image and a degraded version, both (size, size, 3) float32.

    ``images``: ``"leaves"`` (``dead_leaves``, what the bundled weights were pretrained on)
    or ``"scenes"`` (``leaf_scene``).
    """
    return degrade(GENERATORS[images](size, rng), rng)


def degrade(hr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(sr, hr, params): ``hr`` (quantised to 8 bits, as a saved image) and a randomly degraded version."""
    from epban.data.toy import _to_float, _to_pil, apply_degradations

    params = random_degradation(rng)
    sr = _to_float(apply_degradations(_to_pil(hr), params, rng))
    return sr.astype(np.float32), _to_float(_to_pil(hr)).astype(np.float32), params
