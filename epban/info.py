"""``epban.info()``: versions, the extension's state, and which backend serves each op on each device."""
from __future__ import annotations

import platform

import torch

from epban import _extension


def _op_backends() -> dict:
    from epban.ops import axial_attention, deform_conv, ssim

    never = lambda device: False  # noqa: E731
    fused_ssim_available = getattr(ssim, "fused_ssim_available", never)
    fused_axial_available = getattr(axial_attention, "fused_axial_available", never)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    ops = (("ssim", fused_ssim_available), ("axial_attention", fused_axial_available))
    for op, available in ops:
        table[op] = {d: ("fused" if available(d) else "reference") for d in devices}
    # The deformable conv has three paths; deform_path is the rule the op itself follows.
    table["deform_conv"] = {d: deform_conv.deform_path(torch.empty(0, device=d), "auto") for d in devices}
    return table


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
        "backends": _op_backends(),
    }
    if not as_text:
        return data
    lines = [f"{k:18s} {v}" for k, v in data.items() if k != "backends"]
    lines.append("backends (op: device -> backend used by backend='auto')")
    for op, per_device in data["backends"].items():
        lines.append(f"  {op:16s} " + ", ".join(f"{d}: {b}" for d, b in per_device.items()))
    return "\n".join(lines)
