"""Options every compute command of ``epban`` shares: ``--device`` and ``--threads``.

``--threads`` (default ``auto``) sets PyTorch's intra-op thread count. On a machine whose
cores are already busy, PyTorch's default (one thread per core) is several times slower
than one thread: its threads wait at each operator's barrier for a thread the OS has not
scheduled (docs/performance.md, "CPU threads", has the measurements). ``auto`` keeps PyTorch's default unless
the 1-minute load average says that fewer cores than that are free; then it takes the free
cores, at least one. ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, when set, win over ``auto``.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def device_arg(text: str) -> str:
    """argparse ``type`` of ``--device``: a device PyTorch knows and this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (examples: cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda[:N] and mps are supported")
    return text


def int_at_least(minimum: int):
    """argparse ``type`` of an integer option that must be >= ``minimum`` (argparse names the
    option in its message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_finite_float(text: str) -> float:
    """argparse ``type`` of a float option that must be positive and finite (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def threads_arg(text: str) -> int:
    """argparse ``type`` of ``--threads``: ``auto`` (0) or a positive count."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' (or 0) or a thread count >= 1, got {text!r}")
    return value


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=threads_arg, default=0, metavar="N|auto",
                        help="PyTorch's intra-op threads (default auto: one per core, fewer when the "
                             "load average says the cores are busy; OMP_NUM_THREADS wins)")


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_threads(default: int, cpus: int, load: float | None) -> int:
    """PyTorch's ``default`` thread count, lowered to the free cores (``cpus - load``,
    rounded, at least 1) when the load average ``load`` says fewer are free."""
    if load is None:
        return default
    return max(1, min(default, round(cpus - load)))


def set_threads(requested: int) -> int:
    """Apply ``--threads`` (0: auto) to PyTorch; return the count in use."""
    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        load = None
    chosen = auto_threads(torch.get_num_threads(), usable_cpus(), load)
    if chosen != torch.get_num_threads():
        torch.set_num_threads(chosen)
    return chosen
