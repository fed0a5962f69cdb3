"""MS-SSIM (epban.ops.ms_ssim): against pytorch-msssim (values and gradients of both inputs,
several sizes, odd sides, weights given, photos with SR-like degradations), gradcheck, the fused
path against the reference (the SSIM kernels per scale: values, gradients of either or both
inputs, half types, poisoned outputs, opcheck), the MS-SSIM + L1 loss against PyTorch's l1_loss,
and bad inputs. On the CPU, float64 inputs with window 11 take the fused path by default; the
tests that name a backend compare the two."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epban.ops import registry
from epban.losses import MSSSIMLoss
from epban.ops.ms_ssim import (MS_SSIM_WEIGHTS, downsample, ms_ssim, ms_ssim_loss, ms_ssim_min_side,
                               ms_ssim_reference, ssim_and_cs)
from epban.ops.ssim import fused_unavailable_reason, gaussian_window_1d, ssim_reference
from epban.testing import poisoned_allocations

pytorch_msssim = pytest.importorskip("pytorch_msssim")
the_ssim_module = pytest.importorskip("pytorch_msssim.ssim")  # the package re-exports a function of that name


def image_pair(shape, *, dtype=torch.float64, seed=0, noise=0.1):
    """x in [0, 1] with some structure, y a noisy, slightly darkened copy."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    coarse = torch.rand((b, c, max(h // 8, 2), max(w // 8, 2)), generator=gen, dtype=torch.float64)
    x = 0.7 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    y = (0.9 * x + noise * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


def float64_window(channels, win_size=11, sigma=1.5):
    """Our float64 window in pytorch-msssim's layout (it builds its own in float32, about 1e-7
    away on MS-SSIM): with it, the comparison is of the formulas alone."""
    return gaussian_window_1d(win_size, sigma, torch.float64, "cpu").view(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def their_ms_ssim(x, y, *, weights=MS_SSIM_WEIGHTS, win_size=11, sigma=1.5, data_range=1.0, k=(0.01, 0.03)):
    """pytorch-msssim's ms_ssim loop on its own ``_ssim`` (per image, shape (B,)), without its
    fixed minimum side of (win_size - 1) * 16, so that fewer scales can run on smaller images."""
    win = float64_window(x.shape[1], win_size, sigma)
    weights = x.new_tensor(weights)
    mcs = []
    for i in range(len(weights)):
        ssim_per_channel, cs = the_ssim_module._ssim(x, y, data_range=data_range, win=win, size_average=False, K=k)
        if i < len(weights) - 1:
            mcs.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    levels = torch.stack(mcs + [torch.relu(ssim_per_channel)], dim=0)
    return torch.prod(levels ** weights.view(-1, 1, 1), dim=0).mean(1)


def grads(fn, x, y, seed=3):
    """fn's output and the gradients of <output, u> for a fixed random u, w.r.t. both inputs."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    out = fn(x, y)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    gx, gy = torch.autograd.grad((out * u).sum(), (x, y))
    return out.detach(), gx, gy


# ---------------------------------------------------------------- against pytorch-msssim


@pytest.mark.parametrize("shape", [(1, 2, 161, 161), (1, 1, 175, 213), (2, 1, 199, 162)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_pytorch_msssim(shape):
    x, y = image_pair(shape, seed=shape[-1])
    ours = ms_ssim(x, y, reduction="none")
    assert ours.shape == (shape[0],) and ours.dtype == torch.float64
    same_window = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False, win=float64_window(shape[1]))
    assert torch.allclose(ours, same_window, atol=1e-12, rtol=0)
    their_window = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    assert torch.allclose(ours, their_window, atol=1e-5, rtol=0)
    assert torch.allclose(ms_ssim(x, y), their_window.mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", [(0.2, 0.3, 0.5), (0.5, 0.5), (0.1, 0.2, 0.3, 0.4), (1.0,)])
def test_weights_given_on_pytorch_msssims_sizes(weights):
    x, y = image_pair((1, 1, 167, 181), seed=1)
    expected = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False, weights=list(weights),
                                      win=float64_window(1))
    assert torch.allclose(ms_ssim(x, y, weights=weights, reduction="none"), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape, win_size, weights", [
    ((2, 3, 41, 47), 11, (0.2, 0.3, 0.5)),         # 3 scales need 41 px
    ((1, 2, 26, 33), 7, (0.25, 0.25, 0.5)),
    ((2, 1, 50, 37), 5, (0.1, 0.2, 0.3, 0.4)),      # 4 scales of window 5 need 33 px
    ((1, 3, 11, 12), 11, (1.0,)),                   # one scale: relu(SSIM)
])
def test_weights_given_on_smaller_images(shape, win_size, weights):
    x, y = image_pair(shape, seed=2)
    assert min(shape[-2:]) >= ms_ssim_min_side(win_size, len(weights))
    expected = their_ms_ssim(x, y, weights=weights, win_size=win_size)
    ours = ms_ssim(x, y, win_size=win_size, weights=weights, reduction="none")
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)
    if len(weights) == 1:
        assert torch.allclose(ours, ssim_reference(x, y, reduction="none").clamp_min(0), atol=1e-12, rtol=0)


def test_the_minimum_side_is_pytorch_msssims():
    # pytorch-msssim: min(H, W) > (win_size - 1) * 2 ** 4 for its 5 scales.
    assert ms_ssim_min_side(11, 5) == 161
    assert ms_ssim_min_side(7, 5) == 97
    x, y = image_pair((1, 1, 161, 170))
    ms_ssim(x, y)
    with pytest.raises(ValueError, match="at least 161x161"):
        ms_ssim(x[..., :160, :], y[..., :160, :])
    with pytest.raises(ValueError, match="at least 41x41"):
        ms_ssim(x[..., :40, :40], y[..., :40, :40], weights=(0.3, 0.3, 0.4))


@pytest.mark.parametrize("data_range, k", [(255.0, (0.01, 0.03)), (1.0, (0.02, 0.4)), (2, (0.01, 0.03))])
def test_data_range_and_constants(data_range, k):
    x, y = image_pair((1, 1, 163, 170), seed=4)
    x, y = x * data_range, y * data_range
    expected = pytorch_msssim.ms_ssim(x, y, data_range=data_range, size_average=False, win=float64_window(1), K=k)
    ours = ms_ssim(x, y, data_range=data_range, k1=k[0], k2=k[1], reduction="none")
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)


def test_window_size_and_sigma():
    x, y = image_pair((2, 2, 120, 111), seed=5)
    expected = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False, win=float64_window(2, 7, 2.0))
    assert torch.allclose(ms_ssim(x, y, win_size=7, sigma=2.0, reduction="none"), expected, atol=1e-12, rtol=0)


def test_gradients_of_both_inputs_match_pytorch_msssim():
    x, y = image_pair((1, 2, 165, 171), seed=6)
    ours = grads(lambda a, b: ms_ssim(a, b, reduction="none"), x, y)
    theirs = grads(lambda a, b: pytorch_msssim.ms_ssim(a, b, data_range=1.0, size_average=False,
                                                       win=float64_window(2)), x, y)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("win_size, shape", [(5, (1, 2, 17, 19)), (7, (1, 1, 25, 28))])
def test_gradcheck_three_scales(win_size, shape):
    x, y = image_pair(shape, seed=7, noise=0.2)
    fn = lambda a, b: ms_ssim(a, b, win_size=win_size, weights=(0.3, 0.3, 0.4), reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), fast_mode=True)


def test_identical_images_score_one():
    x, _ = image_pair((2, 1, 161, 165))
    assert torch.allclose(ms_ssim(x, x, reduction="none"), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ms_ssim(x.float(), x.float()), torch.tensor(1.0), atol=1e-6)


def test_weights_may_be_a_tensor_and_take_gradients():
    x, y = image_pair((1, 2, 48, 50), seed=8)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    value = ms_ssim(x, y, weights=w)
    assert torch.allclose(value, ms_ssim(x, y, weights=(0.2, 0.3, 0.5)), atol=1e-15, rtol=0)
    value.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precisions(dtype):
    x, y = image_pair((1, 1, 170, 161), seed=9)
    value = ms_ssim(x.to(dtype), y.to(dtype))
    assert value.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert abs(value.item() - ms_ssim(x.to(dtype).double(), y.to(dtype).double()).item()) <= tolerance


def test_autocast_keeps_the_filters_in_float32():
    x, y = image_pair((1, 1, 161, 161), dtype=torch.float32, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ms_ssim(x, y)
    assert value.dtype == torch.float32
    assert abs(value.item() - ms_ssim(x, y).item()) <= 1e-6


# ---------------------------------------------------------------- photos


def degraded_photos():
    """Crops (161 x 169: the smallest the 5 scales take, one side odd) of scikit-image's photos,
    as one batch, and SR-like partners: noise, blur, JPEG."""
    skdata = pytest.importorskip("skimage.data")
    image_module = pytest.importorskip("PIL.Image")
    image_filter = pytest.importorskip("PIL.ImageFilter")
    to_tensor = lambda images: torch.stack([  # noqa: E731
        torch.tensor(np.asarray(image), dtype=torch.float64).permute(2, 0, 1) / 255 for image in images])
    photos = [image_module.fromarray(getattr(skdata, name)()[60:221, 90:259]) for name in ("astronaut", "coffee",
                                                                                            "chelsea")]
    jpegs = []
    for photo in photos:
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=15)
        jpegs.append(image_module.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    clean = to_tensor(photos)
    noise = 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return clean, {
        "noise": (clean + noise).clamp(0, 1),
        "blur": to_tensor([photo.filter(image_filter.GaussianBlur(radius=1.5)) for photo in photos]),
        "jpeg": to_tensor(jpegs),
    }


def test_photos_match_pytorch_msssim():
    clean, degraded = degraded_photos()
    assert clean.shape == (3, 3, 161, 169)
    for kind, other in degraded.items():
        ours = ms_ssim(clean, other, reduction="none")
        assert ((0.3 < ours) & (ours < 1.0)).all(), (kind, ours)
        same_window = pytorch_msssim.ms_ssim(clean, other, data_range=1.0, size_average=False, win=float64_window(3))
        assert torch.allclose(ours, same_window, atol=1e-12, rtol=0), kind
    # pytorch-msssim with its defaults (its float32 window, data_range 255) on 8-bit values
    their_defaults = pytorch_msssim.ms_ssim(clean * 255, degraded["jpeg"] * 255)
    assert abs(ms_ssim(clean * 255, degraded["jpeg"] * 255, data_range=255).item() - their_defaults.item()) <= 1e-5


def test_photo_gradients_match_pytorch_msssim():
    clean, degraded = degraded_photos()
    clean, jpeg = clean[:1], degraded["jpeg"][:1]
    ours = grads(lambda a, b: ms_ssim(a, b), jpeg, clean)
    theirs = grads(lambda a, b: pytorch_msssim.ms_ssim(a, b, data_range=1.0, win=float64_window(3)), jpeg, clean)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weight, l1", [(1.0, 0.0), (0.84, 0.16), (0.0, 2.0), (3.0, 1.0)])
def test_loss_matches_l1_plus_one_minus_ms_ssim(weight, l1, reduction):
    x, y = image_pair((2, 3, 44, 51), seed=12)
    kwargs = dict(weights=(0.2, 0.3, 0.5), reduction=reduction)

    def expected(a, b):
        l1_part = F.l1_loss(a, b) if reduction == "mean" else F.l1_loss(a, b, reduction="none").mean(dim=(1, 2, 3))
        return l1 * l1_part + weight * (1 - ms_ssim_reference(a, b, **kwargs))

    loss = MSSSIMLoss(weight=weight, l1=l1, **kwargs)
    ours, theirs = grads(loss, x, y), grads(expected, x, y)
    assert ours[0].shape == (() if reduction == "mean" else (2,))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-14, rtol=1e-12)


def test_loss_l1_part_against_pytorch_including_equal_images():
    x, y = image_pair((1, 2, 17, 17), seed=13)
    y[..., :5, :] = x[..., :5, :]  # x == y on some pixels: the L1 gradient there is 0, as PyTorch's
    for a, b in ((x, y), (x, x.clone())):
        ours = grads(lambda p, q: ms_ssim_loss(p, q, weight=0.0, l1=1.5, win_size=5, weights=(0.5, 0.5)), a, b)
        theirs = grads(lambda p, q: 1.5 * F.l1_loss(p, q), a, b)
        for u, v in zip(ours, theirs):
            assert torch.equal(u, v)
    _, gx, gy = grads(lambda p, q: ms_ssim_loss(p, q, weight=0.0, l1=1.0, win_size=5, weights=(1.0,)), x, y)
    assert (gx[..., :5, :] == 0).all() and (gy[..., :5, :] == 0).all()


def test_loss_at_equal_images_is_zero_with_zero_gradient():
    x, _ = image_pair((2, 3, 41, 45), seed=14)
    loss, gx, gy = grads(MSSSIMLoss(weight=0.8, l1=0.2, weights=(0.2, 0.3, 0.5)), x, x.clone())
    assert abs(loss.item()) <= 1e-12
    assert gx.abs().max() <= 1e-9 and gy.abs().max() <= 1e-9


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=-1.0), "weight"),
    (dict(weight=float("nan")), "weight"),
    (dict(l1=float("inf")), "l1"),
    (dict(l1=-0.5), "l1"),
    (dict(l1=True), "l1"),
    (dict(l1=np.float32(-1)), "l1"),
    (dict(weight=torch.tensor(1.0)), "weight"),
    (dict(reduction="sum"), "reduction"),
    (dict(backend="triton"), "backend"),
])
def test_loss_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSSSIMLoss(**kwargs)
    x, y = image_pair((1, 1, 161, 161))
    with pytest.raises(ValueError, match=match):
        ms_ssim_loss(x, y, **kwargs)


def test_loss_takes_numpy_weights():
    x, y = image_pair((1, 1, 161, 161))
    torch.testing.assert_close(ms_ssim_loss(x, y, weight=np.float32(0.5), l1=np.float64(0.25)),
                               ms_ssim_loss(x, y, weight=0.5, l1=0.25), rtol=0, atol=0)


def test_loss_checks_inputs_even_without_the_ms_ssim_term():
    x, y = image_pair((1, 1, 40, 40))
    with pytest.raises(ValueError, match="at least 161x161"):
        ms_ssim_loss(x, y, weight=0.0, l1=1.0)


# ---------------------------------------------------------------- backends and bad inputs


def test_backends():
    x, y = image_pair((1, 1, 161, 161))
    with pytest.raises(ValueError, match="backend"):
        ms_ssim(x, y, backend="triton")
    with pytest.raises(ValueError, match="not available.*win_size=11"):
        ms_ssim(x, y, win_size=7, backend="fused")
    with pytest.raises(ValueError, match="not available.*win_size=11"):
        ms_ssim_loss(x, y, sigma=1.2, backend="fused")
    expected = "fused" if fused_unavailable_reason("cpu") is None else "reference"
    assert registry.REGISTRY["ms_ssim"].auto_backend(torch.device("cpu")) == expected


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.rand(3, 170, 170), torch.rand(3, 170, 170)), "4-D"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 171)), "same shape"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170).double()), "dtype"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170, device="meta")), "device"),
    (lambda: (torch.randint(0, 255, (1, 3, 170, 170)),) * 2, "floating"),
    (lambda: (torch.rand(1, 3, 170, 160), torch.rand(1, 3, 170, 160)), "at least 161x161"),
    (lambda: (torch.rand(1, 3, 100, 170), torch.rand(1, 3, 100, 170)), "at least 161x161"),
    (lambda: (torch.full((1, 1, 170, 170), float("nan")), torch.rand(1, 1, 170, 170)), "finite"),
    (lambda: (torch.rand(1, 1, 170, 170), torch.full((1, 1, 170, 170), float("inf"))), "finite"),
    (lambda: (torch.rand(1, 0, 170, 170),) * 2, "at least one channel"),
    (lambda: (torch.rand(1, 3, 0, 170),) * 2, "at least one channel, row and column"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_inputs_raise_value_error(make, match, backend):
    x, y = make()
    with pytest.raises(ValueError, match=match):
        ms_ssim(x, y, backend=backend)
    with pytest.raises(ValueError, match=match):
        ms_ssim_loss(x, y, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_an_empty_batch_gives_empty_results(backend):
    """As epban.ssim: no values for no images, and their mean refused."""
    x, y = image_pair((0, 2, 161, 161))
    assert ms_ssim(x, y, reduction="none", backend=backend).shape == (0,)
    with pytest.raises(ValueError, match="batch size 0"):
        ms_ssim(x, y, backend=backend)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=()), "non-empty 1-D"),
    (dict(weights=[[0.5, 0.5]]), "non-empty 1-D"),
    (dict(weights=torch.ones(2, 2)), "non-empty 1-D"),
    (dict(weights=(0.5, float("nan"))), "finite"),
    (dict(weights=(0.5, float("inf"))), "finite"),
    (dict(weights=("a", "b")), "weights"),
    (dict(weights=(0.2,) * 6), "at least 321x321"),
    (dict(win_size=10), "win_size"),
    (dict(win_size=0), "win_size"),
    (dict(win_size=11.0), "win_size"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(data_range=0.0), "data_range"),
    (dict(data_range=-1.0), "data_range"),
    (dict(data_range=float("inf")), "data_range"),
    (dict(data_range=True), "data_range"),
    (dict(k1=-0.01), "k1"),
    (dict(k2=float("nan")), "k2"),
    (dict(reduction="map"), "reduction"),
    (dict(win_size=True), "win_size"),
    (dict(win_size=np.int64(10)), "win_size"),
    (dict(sigma=float("inf")), "sigma"),
    (dict(sigma=None), "sigma"),
    (dict(sigma=1e-200), "sigma"),  # 2 sigma^2 underflows to 0: a NaN window
    (dict(data_range=None), "data_range"),
    (dict(data_range=torch.tensor([1.0, 2.0])), "data_range"),
    (dict(k1=torch.tensor(0.01j)), "k1"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    x, y = image_pair((1, 1, 170, 170))
    with pytest.raises(ValueError, match=match):
        ms_ssim(x, y, **kwargs)
    with pytest.raises(ValueError, match=match):
        ms_ssim_reference(x, y, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(data_range=np.float32(2.0), k1=np.float32(0.25), k2=np.float64(0.5), sigma=np.float32(1.5),
         win_size=np.int64(11)),
    dict(data_range=torch.tensor([2.0]), k1=torch.tensor(0.25), win_size=np.int32(7)),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_numpy_and_tensor_arguments_are_numbers(kwargs, backend):
    """NumPy scalars and one-element tensors serve as the Python numbers they hold (as in ssim)."""
    x, y = image_pair((1, 2, 161, 165))
    numbers = {k: v.item() for k, v in kwargs.items()}
    assert torch.equal(ms_ssim(x, y, backend=backend, **kwargs), ms_ssim(x, y, backend=backend, **numbers))


def test_check_finite_false_lets_nan_through():
    x, y = image_pair((1, 1, 161, 161))
    x[0, 0, 80, 80] = float("nan")
    assert torch.isnan(ms_ssim(x, y, check_finite=False))


# ---------------------------------------------------------------- the fused path (the SSIM kernels per scale)

needs_cpu_kernel = pytest.mark.skipif(fused_unavailable_reason("cpu") is not None, reason="epban._C is not built")
FUSED_SHAPES = [((2, 3, 161, 173), MS_SSIM_WEIGHTS), ((1, 2, 175, 213), MS_SSIM_WEIGHTS),
                ((3, 1, 45, 52), (0.2, 0.3, 0.5)), ((1, 4, 22, 23), (0.6, 0.4))]


def both_backends(x, y, *, requires=(True, True), seed=3, **kwargs):
    """(value, grad x, grad y) of <ms_ssim(x, y, reduction="none"), u> by each backend."""
    out = []
    for backend in ("fused", "reference"):
        a = x.detach().clone().requires_grad_(requires[0])
        b = y.detach().clone().requires_grad_(requires[1])
        value = ms_ssim(a, b, reduction="none", backend=backend, **kwargs)
        u = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=value.dtype).to(value.device)
        wanted = [t for t in (a, b) if t.requires_grad]
        grads_ = list(torch.autograd.grad((value * u).sum(), wanted))
        gx = grads_.pop(0) if requires[0] else None
        gy = grads_.pop(0) if requires[1] else None
        out.append((value.detach(), gx, gy))
    return out


@needs_cpu_kernel
@pytest.mark.parametrize("shape, weights", FUSED_SHAPES, ids=lambda v: "x".join(map(str, v)) if len(v) == 4 else None)
def test_fused_matches_the_reference_float64(shape, weights):
    x, y = image_pair(shape, seed=sum(shape))
    (v, gx, gy), (rv, rgx, rgy) = both_backends(x, y, weights=weights)
    assert torch.allclose(v, rv, atol=1e-12, rtol=0)
    assert torch.allclose(gx, rgx, atol=1e-12, rtol=1e-9) and torch.allclose(gy, rgy, atol=1e-12, rtol=1e-9)


@needs_cpu_kernel
@pytest.mark.parametrize("requires", [(True, False), (False, True)], ids=["x", "y"])
def test_fused_gradient_of_one_input(requires):
    x, y = image_pair((2, 2, 47, 45), seed=21)
    (v, gx, gy), (rv, rgx, rgy) = both_backends(x, y, requires=requires, weights=(0.2, 0.3, 0.5))
    assert torch.allclose(v, rv, atol=1e-12, rtol=0)
    for ours, theirs in ((gx, rgx), (gy, rgy)):
        assert (ours is None) == (theirs is None)
        assert ours is None or torch.allclose(ours, theirs, atol=1e-12, rtol=1e-9)


@needs_cpu_kernel
def test_fused_float32_is_as_accurate_as_the_reference():
    x, y = image_pair((2, 3, 167, 161), seed=22)
    exact = both_backends(x, y)[1]
    fused, reference = both_backends(x.float(), y.float())
    for i in range(3):
        err_fused = (fused[i].double() - exact[i]).abs().max().item()
        err_reference = (reference[i].double() - exact[i]).abs().max().item()
        assert err_fused <= max(2 * err_reference, 1e-6), (i, err_fused, err_reference)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_inputs(dtype):
    x, y = image_pair((1, 2, 49, 53), seed=23)
    x, y = x.to(dtype), y.to(dtype)
    (v, gx, gy), (rv, rgx, rgy) = both_backends(x, y, weights=(0.2, 0.3, 0.5))
    assert v.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
    assert torch.allclose(v, rv, atol=1e-5, rtol=0)
    scale = rgx.float().abs().max()
    assert (gx.float() - rgx.float()).abs().max() <= 2e-2 * scale
    assert (gy.float() - rgy.float()).abs().max() <= 2e-2 * scale


@needs_cpu_kernel
def test_fused_gradcheck():
    x, y = image_pair((2, 1, 41, 44), seed=24, noise=0.2)
    fn = lambda a, b: ms_ssim(a, b, weights=(0.3, 0.3, 0.4), reduction="none", backend="fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), fast_mode=True)
    assert torch.autograd.gradcheck(fn, (x[:1, :, :41, :41].detach().requires_grad_(),
                                         y[:1, :, :41, :41].detach().requires_grad_()))


@needs_cpu_kernel
def test_fused_writes_every_element():
    """Outputs, kept gradient maps and gradients come from NaN-filled allocations."""
    x, y = image_pair((2, 3, 51, 47), seed=25)
    with poisoned_allocations():
        (v, gx, gy), (rv, rgx, rgy) = both_backends(x, y, weights=(0.2, 0.3, 0.5))
    assert torch.isfinite(v).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert torch.allclose(gx, rgx, atol=1e-12, rtol=1e-9)


@needs_cpu_kernel
def test_fused_scale_pass_gives_cs_and_ssim_per_plane():
    """The per-scale op: each plane's mean cs (luminance off) or SSIM, and their gradients."""
    x, y = image_pair((2, 3, 29, 33), seed=26)
    planes = lambda t: t.reshape(6, 1, 29, 33)  # noqa: E731
    window = gaussian_window_1d(11, 1.5, torch.float64, "cpu")
    c1, c2 = 0.01**2, 0.03**2
    for luminance, index in ((False, 1), (True, 0)):
        value, gx, gy = torch.ops.epban.ssim_level_and_grad(planes(x), planes(y), c1, c2, luminance, True, True)
        a, b = planes(x).requires_grad_(), planes(y).requires_grad_()
        expected = ssim_and_cs(a, b, window, c1, c2)[index].flatten()
        ex, ey = torch.autograd.grad(expected.sum(), (a, b))
        assert torch.allclose(value, expected, atol=1e-13, rtol=0)
        assert torch.allclose(gx, ex, atol=1e-13, rtol=1e-9) and torch.allclose(gy, ey, atol=1e-13, rtol=1e-9)
    value, gx, gy = torch.ops.epban.ssim_level_and_grad(planes(x), planes(y), c1, c2, False, False, False)
    assert torch.allclose(value, ssim_and_cs(planes(x), planes(y), window, c1, c2)[1].flatten(), atol=1e-13, rtol=0)
    assert gx.numel() == 0 and gy.numel() == 0


@pytest.mark.parametrize("h, w", [(9, 8), (8, 9), (7, 7), (10, 12), (1, 3), (2, 2)])
def test_fused_pyramid_steps_match_avg_pool2d(h, w):
    """The fused path's pooling and its backward (scaled map plus the coarser gradient through the
    pool) against avg_pool2d and its autograd, on every parity of the sides (odd sides pad by one)."""
    from epban.ops.ms_ssim import _downsample_fused, _scaled_plus_pool_backward

    t = torch.rand(3, 1, h, w, dtype=torch.float64, requires_grad=True)
    out = downsample(t)
    assert torch.allclose(_downsample_fused(t.detach()), out, atol=1e-15, rtol=0)
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, t, g)
    grad_map, factor = torch.randn(3, 1, h, w, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    combined = _scaled_plus_pool_backward(grad_map, factor, g)
    assert torch.allclose(combined, grad_map * factor.view(3, 1, 1, 1) + expected, atol=1e-15, rtol=0)


@needs_cpu_kernel
def test_fused_levels_op_passes_opcheck():
    x, y = image_pair((1, 2, 23, 25), seed=27)
    for grad_x, grad_y in ((True, True), (False, True), (False, False)):
        args = (x.clone().requires_grad_(grad_x), y.clone().requires_grad_(grad_y), 1e-4, 9e-4, 2, grad_x, grad_y)
        torch.library.opcheck(torch.ops.epban.ms_ssim_levels.default, args)
    args = (x.clone().requires_grad_(), y.clone().requires_grad_(), 1e-4, 9e-4, 2, True, True)
    torch.library.opcheck(torch.ops.epban.ms_ssim_levels.default, (x[:, :, :21, :22].clone().requires_grad_(),
                                                                   y[:, :, :21, :22].clone().requires_grad_(),
                                                                   1e-4, 9e-4, 2, True, True))
    torch.library.opcheck(torch.ops.epban.ssim_level_and_grad.default, (x, y, 1e-4, 9e-4, False, True, True))


@needs_cpu_kernel
def test_fused_without_gradients_and_loss_with_l1():
    x, y = image_pair((2, 3, 45, 46), seed=28)
    kwargs = dict(weights=(0.2, 0.3, 0.5))
    with torch.no_grad():
        assert torch.allclose(ms_ssim(x, y, backend="fused", **kwargs), ms_ssim(x, y, backend="reference", **kwargs),
                              atol=1e-12, rtol=0)
    losses = []
    for backend in ("fused", "reference"):
        losses.append(grads(MSSSIMLoss(weight=0.84, l1=0.16, backend=backend, **kwargs), x, y))
    for a, b in zip(*losses):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or fused_unavailable_reason("cuda") is not None,
                    reason="needs a CUDA GPU and epban._C with CUDA")
@pytest.mark.parametrize("shape", [(2, 3, 161, 173), (1, 3, 540, 967)], ids=lambda s: "x".join(map(str, s)))
def test_fused_cuda_matches_the_reference(shape):
    x, y = image_pair(shape, seed=sum(shape))
    exact = both_backends(x, y)[1]
    with poisoned_allocations():
        fused = both_backends(x.float().cuda(), y.float().cuda())[0]
    assert abs(fused[0].cpu().double() - exact[0]).max() <= 1e-5
    for i in (1, 2):
        assert (fused[i].cpu().double() - exact[i]).abs().max() <= 1e-4 * exact[i].abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or fused_unavailable_reason("cuda") is not None,
                    reason="needs a CUDA GPU and epban._C with CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["x", "y", "both"])
def test_fused_cuda_half_inputs_one_or_both_gradients(dtype, which):
    """Half inputs take float32 copies for the contrast-structure kernels; a gradient not asked
    for must stay absent (converting it back used to fail on the undefined tensor)."""
    x, y = image_pair((1, 2, 49, 53), seed=31)
    x, y = x.to(dtype), y.to(dtype)
    a, b = x.cuda().requires_grad_(which in ("x", "both")), y.cuda().requires_grad_(which in ("y", "both"))
    value = ms_ssim(a, b, weights=(0.2, 0.3, 0.5), backend="fused")
    value.backward()
    reference = ms_ssim(x.float(), y.float(), weights=(0.2, 0.3, 0.5), backend="reference")
    assert abs(value.item() - reference.item()) <= 1e-3
    for t, wanted in ((a, which in ("x", "both")), (b, which in ("y", "both"))):
        assert (t.grad is not None) == wanted and (t.grad is None or t.grad.dtype == dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("where", [(0, 0), (-1, -1), (40, 17)], ids=["first", "last", "inside"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_fused_refuses_non_finite_inputs(where, bad):
    """The fused path tests its levels (every pixel lies in some window) and only then the inputs."""
    x, y = image_pair((2, 2, 45, 46), dtype=torch.float32, seed=29)
    for target in (x, y):
        a, b = x.clone(), y.clone()
        (a if target is x else b)[1, 1, where[0], where[1]] = bad
        with pytest.raises(ValueError, match="must be finite"):
            ms_ssim(a, b, weights=(0.2, 0.3, 0.5), backend="fused")
        assert not torch.isfinite(ms_ssim(a, b, weights=(0.2, 0.3, 0.5), backend="fused", check_finite=False))
    # finite inputs whose squares overflow float32 give NaN levels, then pass the full test
    huge = torch.full((1, 1, 45, 46), 3e30)
    assert not torch.isfinite(ms_ssim(huge, huge * 0.5, weights=(0.2, 0.3, 0.5), backend="fused"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or fused_unavailable_reason("cuda") is not None,
                    reason="needs a CUDA GPU and epban._C with CUDA")
def test_fused_cuda_graph_capture():
    """The fused MS-SSIM without the finite check has no host sync: a CUDA graph of its forward
    and backward replays the eager gradient."""
    x, y = image_pair((2, 3, 170, 181), dtype=torch.float32, seed=30)
    x, y = x.cuda().requires_grad_(), y.cuda()
    step = lambda: ms_ssim(x, y, backend="fused", check_finite=False).backward()  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = x.grad.clone()
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.testing.assert_close(x.grad, eager)


@needs_cpu_kernel
def test_fused_traces_in_one_graph():
    """torch.compile captures the fused MS-SSIM (weights as numbers or a tensor, no finite check)
    without a graph break, forward and backward (aot_eager: the tracing, not Inductor's code)."""
    x, y = image_pair((1, 2, 41, 45), dtype=torch.float32, seed=31)
    for weights in ((0.2, 0.3, 0.5), torch.tensor([0.2, 0.3, 0.5])):
        torch.compiler.reset()
        fn = torch.compile(lambda a, b: ms_ssim(a, b, weights=weights, backend="fused", check_finite=False),
                           fullgraph=True, backend="aot_eager")
        (v, gx, gy), (rv, rgx, rgy) = grads(fn, x, y), grads(lambda a, b: ms_ssim(a, b, weights=weights), x, y)
        assert torch.allclose(v, rv, atol=1e-6) and torch.allclose(gx, rgx, atol=1e-7) and torch.allclose(gy, rgy, atol=1e-7)


@needs_cpu_kernel
def test_fused_refuses_double_backward_and_the_reference_allows_it():
    x, y = image_pair((1, 2, 41, 45), seed=32)
    x.requires_grad_()
    value = ms_ssim(x, y, weights=(0.3, 0.3, 0.4), backend="fused")
    with pytest.raises(RuntimeError, match="no double backward.*backend='reference'"):
        torch.autograd.grad(value, x, create_graph=True)
    y_small = y[:, :1, :41, :41]
    assert torch.autograd.gradgradcheck(lambda a: ms_ssim(a, y_small, weights=(0.3, 0.3, 0.4), backend="reference"),
                                        (x[:, :1, :41, :41].detach().requires_grad_(),), fast_mode=True)
