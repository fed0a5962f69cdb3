"""Every ``EPBAN_*`` environment variable, read here and nowhere else (``docs/settings.md``).

This module imports nothing but the standard library, so that ``setup.py`` can load it by
path before torch or the extension exist. Each setting is read when asked for (a function
call), so tests may change the environment between calls.
"""
from __future__ import annotations

import os

FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")
SSIM_CUDA_BACKWARDS = ("auto", "tile32", "tile64", "strip")

# name -> (default, one-line meaning); docs/settings.md lists the same table.
SETTINGS = {
    "EPBAN_BUILD_EXT": ("1", "build time: 0 skips the C++/CUDA extension (every op then runs its reference)"),
    "EPBAN_BUILD_CUDA": ("1", "build time: 0 builds the extension for the CPU only, even where nvcc is found"),
    "EPBAN_FP32_PRECISION": ("", "float32 dots of the Triton kernels: ieee, tf32x3 or tf32 (unset: each op's default)"),
    "EPBAN_SSIM_CUDA_BACKWARD": ("auto", "the SSIM CUDA backward kernel: auto, tile32, tile64 or strip (for GPU checks)"),
    "EPBAN_TEST_COMPILE": ("0", "tests and benches: 1 runs the torch.compile (Inductor) cases, which take minutes"),
}


def _get(name: str) -> str:
    return os.environ.get(name, SETTINGS[name][0])


def _choice(name: str, choices: tuple) -> str:
    value = _get(name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def build_extension() -> bool:
    return _get("EPBAN_BUILD_EXT") != "0"


def build_cuda() -> bool:
    return _get("EPBAN_BUILD_CUDA") != "0"


def fp32_precision(default: str) -> str:
    """The float32 dot precision of a Triton op whose own default is ``default``."""
    value = _get("EPBAN_FP32_PRECISION") or default
    if value not in FP32_PRECISIONS:
        raise ValueError(f"EPBAN_FP32_PRECISION must be one of {', '.join(FP32_PRECISIONS)}, got {value!r}")
    return value


def ssim_cuda_backward() -> str:
    return _choice("EPBAN_SSIM_CUDA_BACKWARD", SSIM_CUDA_BACKWARDS)


def test_compile() -> bool:
    return _get("EPBAN_TEST_COMPILE") == "1"
