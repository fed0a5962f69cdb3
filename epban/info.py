"""``epban.info()``: versions, the extension's state, and for each op what its fused path is
built from and which backend ``backend="auto"`` takes on each device (``epban.ops.registry``)."""
from __future__ import annotations

import importlib
import platform

import torch

from epban import _extension

# The op modules; each registers its op with epban.ops.registry when imported.
OP_MODULES = ("ssim", "axial_attention", "deform_conv", "bias_act", "max_pool", "normalise")
# The order ops are listed in (registry names; the stem pool lives in max_pool).
OP_ORDER = ("ssim", "ms_ssim", "axial_attention", "deform_conv", "bias_act", "stem_pool", "normalise")


def _ops() -> dict:
    """{op: {"kernels": what the fused path is, "auto": {device: backend}}} for every registered op."""
    from epban.ops.registry import REGISTRY

    for module in OP_MODULES:
        importlib.import_module(f"epban.ops.{module}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    names = sorted(REGISTRY, key=lambda n: (OP_ORDER.index(n) if n in OP_ORDER else len(OP_ORDER), n))
    return {name: {"kernels": REGISTRY[name].kernels,
                   "auto": {d.type: REGISTRY[name].auto_backend(d) for d in devices}}
            for name in names}


def info(as_text: bool = False):
    """A dict (or, with ``as_text=True``, a printable report) describing this installation."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    data = {
        "epban": __import__("epban").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version,
        "triton_interpret": _extension.triton_interpret(),
        "extension_built": _extension.extension_loaded(),
        "extension_cuda": _extension.extension_has_cuda(),
        "extension_error": _extension.EXTENSION_ERROR,
        "ops": _ops(),
    }
    if not as_text:
        return data
    lines = [f"{k:18s} {v}" for k, v in data.items() if k != "ops"]
    lines.append("ops (backend='auto' takes, per device; the fused path's kernels)")
    autos = {name: ", ".join(f"{d}: {b}" for d, b in op["auto"].items()) for name, op in data["ops"].items()}
    width = max(map(len, autos.values()), default=0)
    for name, op in data["ops"].items():
        lines.append(f"  {name:16s} {autos[name]:{width}s}  {op['kernels']}")
    return "\n".join(lines)
