"""Loading of the optional compiled extension ``epban._C``, and whether Triton is there.

Nothing here raises: a package without its kernels still imports, and every op falls back to
its PyTorch reference. Which implementation serves a call is decided in one place,
``epban.ops.registry.use_fused``, from what this module reports.
"""
from __future__ import annotations

import importlib.util
import os

import torch  # loaded before the extension, which links against it

BACKENDS = ("auto", "reference", "fused")

_C = None
if importlib.util.find_spec("epban._C") is None:
    EXTENSION_ERROR: str | None = "not built (installed with EPBAN_BUILD_EXT=0, or no compiler)"
else:
    try:
        from epban import _C  # noqa: F401  (registers the torch.ops.epban.* operators)

        EXTENSION_ERROR = None
    except Exception as exc:  # an undefined symbol from a torch mismatch, a missing CUDA runtime...
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

# The ops this package version calls; an extension built from older sources lacks some.
REQUIRED_OPS = ("ssim_per_image", "ssim_per_image_one_pass", "ssim_mean_one_pass", "ssim_scale_gradient_",
                "ssim_per_image_and_grad", "ssim_map", "ssim_backward", "ssim_l1_and_grad", "ssim_l1_one_pass",
                "ssim_level_and_grad")
if _C is not None:
    _missing = [name for name in REQUIRED_OPS if not hasattr(torch.ops.epban, name)]
    if _missing:
        _C = None
        EXTENSION_ERROR = (f"epban._C was built from older sources (no {', '.join(_missing)}); "
                           "rebuild it: pip install --no-build-isolation -e .")


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
