"""Weights shipped inside the package (nothing is ever downloaded).

``tiny-ssim``: the ``tiny`` EfficientPBAN pretrained to predict SSIM on procedural
dead-leaves pairs (``scripts/pretrain_tiny.py``; no photo of the toy set in its data, and
not the toy set's score formula). ``train-metric --config tiny`` starts from it by default,
as the full-size presets start from ImageNet. It is a starting point, not a quality metric:
its outputs are SSIM estimates. ``pretrain.json`` beside the weights records how it was made.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def names() -> list[str]:
    """The bundled weight sets."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "model.safetensors").exists())


def available(name: str) -> bool:
    return (ROOT / name / "model.safetensors").exists()


def path(name: str) -> Path:
    """The directory of bundled weights ``name`` (loadable by ``EfficientPBAN.from_checkpoint``)."""
    if not available(name):
        raise FileNotFoundError(f"no bundled weights {name!r} in {ROOT}; bundled: {names() or 'none'}")
    return ROOT / name


def resolve(text: str, option: str = "--weights") -> Path:
    """What a ``--weights``-like option names: an existing path, else bundled weights by name;
    ValueError (naming ``option``) when it is neither."""
    given = Path(text)
    if given.exists():
        return given
    if available(text):
        return ROOT / text
    raise ValueError(f"{option} {text}: no such checkpoint (a folder, an authors' .pth file, or the name of "
                     f"bundled weights: {', '.join(names()) or 'none'})")
