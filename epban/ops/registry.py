"""Which implementation serves an op: one availability rule and one registry of the ops.

Every op takes ``backend="auto" | "reference" | "fused"``:
- ``"reference"``: the plain PyTorch specification, always;
- ``"fused"``: the kernels, or a ``ValueError`` saying why they cannot serve these tensors;
- ``"auto"``: the kernels where they can serve and where the op's own rule says they pay off
  (``auto_ok``), the reference otherwise. Triton kernels run on CUDA; on the CPU they run only
  under ``TRITON_INTERPRET=1`` and only when asked for (``"fused"``): the interpreter is for
  tests, not speed.

Each op module registers itself (``register``); ``epban.info()`` reads ``REGISTRY``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from epban._extension import BACKENDS, check_backend, extension_has_cuda, extension_loaded, triton_available, triton_interpret

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_fused(backend: str, unavailable: Optional[str], *, auto_ok: bool = True) -> bool:
    """The rule: whether ``backend`` takes the kernels, given why they cannot serve (``None``:
    they can) and whether the op's ``auto`` rule wants them. ValueError for an unknown backend
    or an impossible ``"fused"``."""
    check_backend(backend)
    if backend == "reference":
        return False
    if unavailable is not None:
        if backend == "fused":
            raise ValueError(f"backend='fused' is not available: {unavailable}")
        return False
    return backend == "fused" or auto_ok


def triton_unavailable_reason(what: str, device, dtype=None, *, interpreter_refuses=None,
                              interpreter_also=()) -> Optional[str]:
    """Why the Triton kernels of ``what`` cannot serve ``dtype`` tensors on ``device`` (None when
    they can): CUDA, or CPU tensors under ``TRITON_INTERPRET=1``; float32, bfloat16 or float16.
    ``interpreter_refuses``: {dtype: reason} the interpreter gets wrong; ``interpreter_also``:
    more dtypes the kernels take under the interpreter (float64)."""
    device = torch.device(device)
    if not triton_available():
        return "Triton is not installed"
    dtypes = TRITON_DTYPES + (tuple(interpreter_also) if device.type == "cpu" else ())
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"{what} takes {names} on {device.type}, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not triton_interpret():
            return f"{what} runs on CPU tensors only under TRITON_INTERPRET=1"
        return (interpreter_refuses or {}).get(dtype)
    return f"no {what} for device type {device.type!r}"


def triton_auto_ok(device) -> bool:
    """The ``auto`` rule shared by the Triton ops: kernels on CUDA only."""
    return torch.device(device).type == "cuda"


def extension_unavailable_reason(what: str, device) -> Optional[str]:
    """Why the compiled extension (``epban._C``) cannot serve ``what`` on ``device``."""
    kind = torch.device(device).type
    if kind == "cpu" and extension_loaded():
        return None
    if kind == "cuda" and extension_has_cuda():
        return None
    return f"the compiled extension does not serve {what} on {kind} tensors (see epban.info())"


@dataclass(frozen=True)
class OpEntry:
    """An op as ``epban info`` shows it: ``kernels`` says what its fused path is built from;
    ``auto_backend(device)`` names what ``backend="auto"`` takes there for float32 inputs."""
    name: str
    kernels: str
    auto_backend: Callable[[torch.device], str]


REGISTRY: dict[str, OpEntry] = {}


def register(name: str, kernels: str, auto_backend: Callable[[torch.device], str]) -> None:
    REGISTRY[name] = OpEntry(name, kernels, auto_backend)


__all__ = ["BACKENDS", "use_fused", "triton_unavailable_reason", "triton_auto_ok",
           "extension_unavailable_reason", "register", "REGISTRY", "OpEntry"]
