"""Helpers shared by the tests, benchmarks and GPU checks."""
from __future__ import annotations

import contextlib
import os

import torch



@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, new tensors' memory (torch.empty and its kin, the kernels' outputs
    included) is filled with NaN, so every output element a kernel leaves unwritten shows."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill

def randomise_inference_state(model: torch.nn.Module, *, seed: int = 1, affine: bool = False) -> torch.nn.Module:
    """Give a freshly initialised model non-trivial BatchNorm statistics (and, with
    ``affine=True``, BatchNorm scales and shifts) and non-zero GMDC offsets, so that
    comparisons exercise real values rather than identities. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or "param_generators" in name:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
            elif affine and ".bn" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif affine and ".bn" in name and name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def ssim_implementations(on_missing=None) -> dict:
    """SSIM callables ``f(x, y) -> mean SSIM`` for side-by-side comparisons: epban's two
    backends and the libraries users would otherwise pick, each when installed.
    ``on_missing(name)`` is called for each library that is absent."""
    from epban.ops.ssim import ssim

    impls = {
        "epban fused": lambda x, y: ssim(x, y, backend="fused"),
        "epban reference": lambda x, y: ssim(x, y, backend="reference"),
    }
    try:
        import pytorch_msssim

        impls["pytorch-msssim"] = lambda x, y: pytorch_msssim.ssim(x, y, data_range=1.0)
    except ImportError:
        on_missing and on_missing("pytorch-msssim")
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure

        impls["torchmetrics"] = lambda x, y: structural_similarity_index_measure(x, y, data_range=1.0)
    except ImportError:
        on_missing and on_missing("torchmetrics")
    try:
        import kornia

        impls["kornia"] = lambda x, y: kornia.metrics.ssim(x, y, window_size=11, max_val=1.0).mean()
    except ImportError:
        on_missing and on_missing("kornia")
    return impls


def ssim_loss_forms(weight: float = 0.5) -> dict:
    """A training loss's SSIM term ``weight * (1 - SSIM)`` two ways, for side-by-side timings:
    ``epban.ssim_loss`` (the weight folded into the one pass: its backward's in-place scaling
    is skipped) and the weight applied outside ``ssim`` (the scaling runs)."""
    from epban.ops.ssim import ssim, ssim_loss

    return {
        f"epban ssim_loss(w={weight:g})": lambda x, y: ssim_loss(x, y, weight=weight),
        f"epban {weight:g} * (1 - ssim)": lambda x, y: weight * (1 - ssim(x, y, backend="fused")),
    }


class StandInCudaDriver:
    """A Triton driver for machines without a GPU: kernels compile for an H100 (sm_90) through
    Triton's whole pipeline, and each launch is handed to ``record(function, grid, args)``
    instead of the GPU (``function`` is a distinct object per compiled kernel). Lets the CPU
    test and time everything Triton does on the host around a launch."""

    def __init__(self, record=None):
        self.record = record
        driver = self

        class Utils:
            def load_binary(self, name, kernel, shared, device):
                return object(), object(), 0, 0, 1024  # module, function, registers, spills, max threads

            def get_device_properties(self, device):
                return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                        "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

        class Launcher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter_hook,
                         exit_hook, *args):
                if driver.record is not None:
                    driver.record(function, (grid_x, grid_y, grid_z), args)

        self.utils = Utils()
        self.launcher_cls = Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


KERNEL_MODULES = ("layout", "bias_act", "max_pool", "normalise", "deform_conv", "axial_attention")


@contextlib.contextmanager
def compiled_kernels_without_gpu(record=None):
    """Inside: ``epban.kernels.*`` are compiled (not interpreted) Triton kernels on the
    ``StandInCudaDriver``; CPU tensors stand for the GPU's (the ops' availability checks take
    them as CUDA tensors). The modules are fresh copies loaded
    with TRITON_INTERPRET=0 (Triton decides interpretation when a kernel is defined); on exit the
    interpreted modules, the environment and Triton's driver are put back. Compiling needs no
    GPU: the first launch of each kernel takes seconds, later runs read Triton's cache."""
    import importlib
    import importlib.util
    import sys
    from unittest import mock

    import triton.language as tl
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import epban.ops._checks as checks

    if not isinstance(tl.standard.sigmoid, JITFunction):
        raise RuntimeError("Triton was imported under TRITON_INTERPRET=1 in this process, so its own library "
                           "functions are interpreted and nothing can be compiled: use a process without it")
    package = importlib.import_module("epban.kernels")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(driver, "_active", StandInCudaDriver(record)))
        stack.enter_context(mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}))
        # the ops' availability checks take CPU tensors as they take CUDA ones (they stand for them)
        stack.enter_context(mock.patch.object(checks, "triton_interpret", lambda: True))
        for short in KERNEL_MODULES:
            name = f"epban.kernels.{short}"
            spec = importlib.util.find_spec(name)
            module = importlib.util.module_from_spec(spec)
            # sys.modules entry by entry: modules imported meanwhile (Triton's own) stay imported
            previous = sys.modules.get(name)
            stack.callback(lambda n=name, m=previous: sys.modules.__setitem__(n, m) if m else sys.modules.pop(n, None))
            sys.modules[name] = module  # the next modules' imports of it find this copy
            spec.loader.exec_module(module)
            stack.enter_context(mock.patch.object(package, short, module, create=True))
        yield
