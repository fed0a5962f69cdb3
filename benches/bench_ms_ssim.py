"""MS-SSIM benchmarks: epban vs pytorch-msssim, fwd+bwd.

    pytest benches/bench_ms_ssim.py --benchmark-only --benchmark-group-by=group

float32, data_range 1, the default 5 scales with window 11 / sigma 1.5, batch mean; the
gradient is taken w.r.t. x through each library's own API. epban's rows run the fused path (the
SSIM kernels per scale) and the reference, with the default input check (``check_finite=True``);
"epban ssim fused" is SSIM alone at the same shape, the yardstick of the fused MS-SSIM's cost.
The loss rows time 0.84 (1 - MS-SSIM) + 0.16 L1, Zhao et al.'s mix: ``MSSSIMLoss`` against
pytorch-msssim's ``ms_ssim`` plus PyTorch's ``l1_loss``. The CPU keeps rounds few
(the rows take seconds per call there); CUDA timings synchronise inside the timed call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import epban
from epban.losses import MSSSIMLoss
from epban.ops.ms_ssim import ms_ssim
from epban.ops.ssim import fused_unavailable_reason
from timing import loss_step

pytorch_msssim = pytest.importorskip("pytorch_msssim")

SHAPES = [(16, 3, 256, 256), (1, 3, 1080, 1920)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SSIM_WEIGHT, L1_WEIGHT = 0.84, 0.16

_epban_loss = MSSSIMLoss(weight=SSIM_WEIGHT, l1=L1_WEIGHT)
_epban_loss_reference = MSSSIMLoss(weight=SSIM_WEIGHT, l1=L1_WEIGHT, backend="reference")


def _their_loss(x, y):
    return SSIM_WEIGHT * (1 - pytorch_msssim.ms_ssim(x, y, data_range=1.0)) + L1_WEIGHT * F.l1_loss(x, y)


IMPLS = {
    "epban ssim fused": lambda x, y: epban.ssim(x, y, backend="fused"),
    "epban ms_ssim fused": lambda x, y: ms_ssim(x, y, backend="fused"),
    "epban ms_ssim reference": lambda x, y: ms_ssim(x, y, backend="reference"),
    "pytorch-msssim ms_ssim": lambda x, y: pytorch_msssim.ms_ssim(x, y, data_range=1.0),
    "epban MSSSIMLoss l1 fused": _epban_loss,
    "epban MSSSIMLoss l1 reference": _epban_loss_reference,
    "pytorch-msssim ms_ssim + l1_loss": _their_loss,
}


def _shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("impl", list(IMPLS), ids=lambda name: name.replace(" ", "-"))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_ms_ssim(benchmark, device, shape, impl):
    if "fused" in impl and fused_unavailable_reason(device) is not None:
        pytest.skip(f"epban._C does not serve {device}")
    benchmark.group = f"ms_ssim {device} {_shape_id(shape)} fwd+bwd"
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, device=device, shape=_shape_id(shape), mode="fwd+bwd")
    run = loss_step(IMPLS[impl], shape, device)
    if device == "cuda":
        benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    elif "fused" in impl:
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(run, rounds=2, warmup_rounds=0)
