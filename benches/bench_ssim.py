"""SSIM benchmarks: epban fused vs epban reference vs pytorch-msssim, torchmetrics, kornia.

    pytest benches/bench_ssim.py --benchmark-only --benchmark-group-by=group

float32, reduction mean, window 11 / sigma 1.5; "fwd" runs under no_grad, "fwd+bwd"
takes the gradient w.r.t. x through each library's own API. "epban fused" follows the
package's policy (the one-pass training op on the devices in ONE_PASS_DEVICES); "epban
fused two-pass" forces the forward op then the backward op, for comparison. The two loss
rows (fwd+bwd only) time a training loss's SSIM term, 0.5 (1 - SSIM): ``epban.ssim_loss``
folds the weight into the pass (its backward's in-place scaling is skipped), the other
applies it outside (the scaling runs). CPU skips the 4K shape and keeps rounds few; CUDA
timings synchronise inside the timed call.

``test_ssim_l1`` times an SR loss's pixel terms, ``a * L1 + w * (1 - SSIM)``, fwd+bwd: the L1
term in the SSIM kernel pass (``ssim_loss(..., l1=a)``), the fused SSIM term alone, and the
SSIM kernel plus PyTorch's ``l1_loss`` (the images read twice).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epban.ops import ssim as ssim_module
from epban.ops.ssim import fused_unavailable_reason, ssim_loss
from epban.testing import ssim_implementations, ssim_loss_forms
from timing import loss_step

SHAPES = [(16, 3, 256, 256), (1, 3, 1080, 1920), (1, 3, 2160, 3840)]
MODES = ("fwd", "fwd+bwd")


def _two_pass_ssim(x, y):
    with ssim_module.one_pass_devices(()):
        return ssim_module.ssim(x, y, backend="fused")


LOSSES = ssim_loss_forms(0.5)
IMPLS = ssim_implementations()
IMPLS = {"epban fused": IMPLS.pop("epban fused"), "epban fused two-pass": _two_pass_ssim, **LOSSES, **IMPLS}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("impl", list(IMPLS), ids=lambda name: name.replace(" ", "-"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_ssim(benchmark, device, shape, mode, impl):
    if device == "cpu" and shape[-1] > 2000:
        pytest.skip("4K is a GPU shape")
    if impl in LOSSES and mode == "fwd":
        pytest.skip("the loss rows are training's")
    if (impl.startswith("epban fused") or impl in LOSSES) and fused_unavailable_reason(device) is not None:
        pytest.skip(f"epban._C does not serve {device}")
    benchmark.group = f"ssim {device} {_shape_id(shape)} {mode}"
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, device=device, shape=_shape_id(shape), mode=mode)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen).to(device)
    y = (x + 0.1 * torch.randn(shape, generator=gen).to(device)).clamp(0, 1)
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(x, y)
            sync()

    else:
        xg = x.clone().requires_grad_(True)

        def run():
            xg.grad = None
            fn(xg, y).backward()
            sync()

    if device == "cuda":
        benchmark.pedantic(run, rounds=10 if shape[-1] > 2000 else 20, warmup_rounds=3)
    else:
        # The competitors take seconds per call here: two rounds, no warm-up (nothing to compile).
        fast = impl.startswith("epban fused") or impl in LOSSES
        benchmark.pedantic(run, rounds=5 if fast else 2, warmup_rounds=1 if fast else 0)


L1_WEIGHT, SSIM_WEIGHT = 1.0, 0.5
L1_IMPLS = {
    "L1+SSIM fused": lambda x, y: ssim_loss(x, y, weight=SSIM_WEIGHT, l1=L1_WEIGHT),
    "SSIM fused alone": lambda x, y: ssim_loss(x, y, weight=SSIM_WEIGHT),
    "SSIM kernel + torch l1_loss": lambda x, y: ssim_loss(x, y, weight=SSIM_WEIGHT) + L1_WEIGHT * F.l1_loss(x, y),
}


@pytest.mark.parametrize("impl", list(L1_IMPLS), ids=lambda name: name.replace(" ", "-"))
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_ssim_l1(benchmark, device, shape, impl):
    if fused_unavailable_reason(device) is not None:
        pytest.skip(f"epban._C does not serve {device}")
    benchmark.group = f"ssim+l1 {device} {_shape_id(shape)} fwd+bwd"
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, device=device, shape=_shape_id(shape), mode="fwd+bwd")
    run = loss_step(L1_IMPLS[impl], shape, device)
    # Each row takes tens of ms on a CPU: 20 rounds keep a shared machine's load swings from
    # deciding the ratios.
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
