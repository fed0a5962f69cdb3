"""Helpers shared by the tests, benchmarks and GPU checks."""
from __future__ import annotations

import contextlib

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
