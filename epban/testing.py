"""Helpers shared by the tests, benchmarks and GPU checks."""
from __future__ import annotations

import torch


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
