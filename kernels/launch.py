"""``launch(kernel, grid, *args, **meta)``: ``kernel[grid](*args, **meta)`` without Triton's per-call binding.

Why: ``kernel[grid](...)`` spends ~30 us of Python per call before the driver sees the launch
(Triton 3.6 and 3.8 on the 2-core CI machine, ``python benches/bench_launch.py``). It binds every
argument to the signature, specialises each one in C++ (26 calls for an axial-attention kernel),
hashes the result with the options into a cache key, and looks the compiled kernel up. An eager
forward + backward of the axial attention makes 7 to 12 launches; a loss step about 80. On small
inputs that Python, not the GPU, sets the time.

How: ``launch`` forms its own key from what Triton specialises on, in one pass over the
arguments (~5 us for 26 of them): for a tensor, its dtype and whether its pointer is 16-byte
aligned; for an int, its value (small ints) or whether it divides by 16 and fits 32 or 64 bits;
for a float, nothing; anything else by value; plus the keyword arguments (constexprs and launch
options, e.g. num_warps), the kernel and the current device. The first call with a key goes
through Triton (compiling if needed) and keeps the compiled kernel that Triton returns. Later
calls with that key hand the arguments straight to that kernel's launcher
(``CompiledKernel.run``), the call in which Triton's own path ends. The key is at least as fine
as Triton's specialisation, so Triton would pick the same kernel; ``EPBAN_TRITON_FAST_LAUNCH=verify``
asks Triton for its kernel on every call as well and raises if they differ (the GPU check runs
the CUDA tests that way; ``tests/test_launch.py`` checks it on the CPU with a stand-in driver).

What the fast path leaves out: Triton's check that the kernel's global constants have not
changed since compilation (epban's kernels read none that change), ``TRITON_DEBUG`` switched on
after the first launch, and launch hooks: while one is set (a profiler such as proton), every
call takes Triton's path. So do calls that torch.compile traces (the axial attention's
autograd.Function): Dynamo records ``kernel[grid](...)`` in its graph. ``EPBAN_TRITON_FAST_LAUNCH=0`` takes Triton's path every time. Under
``TRITON_INTERPRET=1`` kernels are interpreted functions, not compiled ones: Triton's path.
"""
from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

FAST_LAUNCH_VARIABLE = "EPBAN_TRITON_FAST_LAUNCH"  # "1" (default), "0", or "verify"

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_MAX_SITES = 4096  # distinct keys kept; beyond that the cache starts again
_sites: dict = {}


class FastLaunchMismatch(RuntimeError):
    """Under EPBAN_TRITON_FAST_LAUNCH=verify: Triton picked another compiled kernel than the fast path."""


def _arg_key(args) -> list:
    """What Triton's specialisation of ``args`` depends on (see the module docstring), flat."""
    key = []
    add = key.append
    for a in args:
        if type(a) is int:
            # small values exactly (Triton makes 1 a constant); others by divisibility and width
            add(a if -16 < a < 4096 else (a & 15 == 0, -0x80000000 <= a <= 0x7FFFFFFF, a > 0x7FFFFFFFFFFFFFFF))
        elif isinstance(a, _Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        elif type(a) is float:
            add(float)
        else:
            add(type(a))
            add(a)
    return key


def _hooks_idle() -> bool:
    """No launch hook is set (Triton 3.6-3.8 keep empty hook chains rather than None)."""
    rt = knobs.runtime
    return all(h is None or not getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


class _Site:
    """A compiled kernel and how to call its launcher: the positional arguments followed by the
    values of the remaining parameters (constexprs given by keyword or left at their default)."""

    __slots__ = ("kernel", "compiled", "run", "function", "metadata", "tail")

    def __init__(self, kernel, compiled, tail):
        self.kernel = kernel
        self.compiled = compiled
        self.run = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.tail = tail


def _site_for(kernel: JITFunction, compiled, args, meta):
    """The _Site of ``compiled``, or None when the call's layout does not allow it (a
    non-constexpr parameter passed by keyword)."""
    params = kernel.params
    tail = []
    for p in params[len(args):]:
        if not p.is_constexpr:
            return None
        name = p.name
        if name in meta:
            tail.append(meta[name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None
    return _Site(kernel, compiled, tuple(tail))


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, from the second call with the same specialisation on
    without Triton's binding and lookup (module docstring)."""
    if _is_compiling():  # torch.compile traces kernel[grid](...) into its graph, not this function
        return kernel[grid](*args, **meta)
    mode = os.environ.get(FAST_LAUNCH_VARIABLE, "1")
    if mode == "0" or not isinstance(kernel, JITFunction) or not _hooks_idle():
        return kernel[grid](*args, **meta)
    device = driver.active.get_current_device()
    # id(kernel): hashing a JITFunction costs microseconds; the site keeps the kernel, compared below
    key = _arg_key(args)
    key.append(id(kernel))
    key.append(device)
    key += meta.items()
    key = tuple(key)
    try:
        site = _sites.get(key)
    except TypeError:  # an unhashable argument (a list): no key, Triton's path
        return kernel[grid](*args, **meta)
    if site is None or site.kernel is not kernel:
        compiled = kernel[grid](*args, **meta)
        if hasattr(compiled, "result"):  # an asynchronous compilation's future
            compiled = compiled.result()
        site = _site_for(kernel, compiled, args, meta) if compiled is not None else None
        if site is not None:
            if len(_sites) >= _MAX_SITES:
                _sites.clear()
            _sites[key] = site
        return compiled
    if mode == "verify":
        expected = kernel.run(*args, grid=grid, warmup=True, **meta)
        if expected is not site.compiled:
            raise FastLaunchMismatch(f"{kernel.__name__}: Triton picked {getattr(expected, 'hash', expected)}, "
                                     f"the fast launch {site.compiled.hash}")
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    rt = knobs.runtime
    site.run(grid[0], grid_1, grid_2, driver.active.get_current_stream(device), site.function, site.metadata, None,
             rt.launch_enter_hook, rt.launch_exit_hook, *args, *site.tail)
    return site.compiled
