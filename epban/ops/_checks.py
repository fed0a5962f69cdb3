"""Input validation shared by the ops: users get ValueError saying what was expected."""
from __future__ import annotations

import torch

from epban._extension import check_backend, triton_available, triton_interpret

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Host-side grid arithmetic. triton.cdiv and triton.next_power_of_2 are Triton constexpr
# functions: called from Python they cost 3-5 us each (Triton 3.6-3.8), several per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length()


def check_nchw_float(name: str, t) -> None:
    """``t`` must be a 4-D (B, C, H, W) floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def fused_requested(backend: str, unavailable: str | None) -> bool:
    """Whether ``backend`` asks for the fused kernels, given why they cannot serve (None: they can).

    "reference" never does; "fused" does, or raises ValueError saying why it cannot;
    "auto" does where they can serve (an op may add its own rules on top).
    """
    if backend == "reference":
        return False
    if backend == "fused" and unavailable is not None:
        raise ValueError(f"backend='fused' is not available: {unavailable}")
    return unavailable is None


def check_image_pair(x: torch.Tensor, y: torch.Tensor, *, name_x: str = "x", name_y: str = "y",
                     same_dtype: bool = True) -> None:
    for name, t in ((name_x, x), (name_y, y)):
        check_nchw_float(name, t)
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{name_x} and {name_y} must be on the same device, got {x.device} and {y.device}")
    if same_dtype and x.dtype != y.dtype:
        raise ValueError(f"{name_x} and {name_y} must have the same dtype, got {x.dtype} and {y.dtype}")


def triton_unavailable_reason(what: str, device, dtype=None, *, interpreter_refuses=None,
                              interpreter_also=()) -> str | None:
    """Why the Triton kernels of ``what`` cannot serve ``dtype`` tensors on ``device`` (None when
    they can): CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests' way), float32,
    bfloat16 or float16. ``interpreter_refuses``: {dtype: reason} the interpreter gets wrong;
    ``interpreter_also``: more dtypes the kernels take under the interpreter (float64)."""
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


def fused_triton_available(what: str, device, dtype, backend="auto", **reason_kwargs) -> bool:
    """The rule of the loss mode's Triton ops (bias_act, the stem pool, the normalisation):
    "auto" takes the kernels on CUDA only (the interpreter is for tests, not speed), "fused"
    wherever ``triton_unavailable_reason`` allows, ValueError saying why not otherwise."""
    check_backend(backend)
    if backend == "auto" and torch.device(device).type != "cuda":
        return False
    return fused_requested(backend, triton_unavailable_reason(what, device, dtype, **reason_kwargs))


# ----------------------------------------------------------------------------- dense layouts


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether t is laid out channels_last (and not also plain contiguous: then NCHW serves)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def needs_int64_offsets(*tensors, slack: int = 0) -> bool:
    """Whether an element offset of these tensors (through their strides), plus ``slack``
    (a program's block past the end), may reach 2^31: the kernels then index in 64 bits."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + slack >= 2**31 for t in tensors)
