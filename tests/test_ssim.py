"""SSIM: the reference against scikit-image and pytorch-msssim, the fused kernels against the reference."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import epban
from epban import _extension
from epban.ops import ssim as ssim_module
from epban.ops.ssim import SSIM_FUSED_WINDOW, fused_unavailable_reason, gaussian_window_1d, ssim_reference
from epban.testing import poisoned_allocations

PADDINGS = ("valid", "same")
REDUCTIONS = ("mean", "none", "map")
ODD_SHAPES = [(3, 1, 13, 29), (2, 4, 57, 31), (1, 3, 257, 131)]

needs_cpu_kernel = pytest.mark.skipif(fused_unavailable_reason("cpu") is not None, reason="epban._C is not built")
needs_cuda_kernel = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and fused_unavailable_reason("cuda") is None),
        reason="needs a GPU and epban._C with CUDA",
    ),
]
DEVICES = [
    pytest.param("cpu", marks=needs_cpu_kernel),
    pytest.param("cuda", marks=needs_cuda_kernel),
]


@pytest.fixture(params=["one_pass", "two_pass"])
def ssim_path(request, monkeypatch):
    """Training with reduction mean/none runs either the one-pass op (value and gradient in
    one kernel pass) or the forward op and then the backward op: both must be right on every
    device, whatever the default policy of ssim_module.ONE_PASS_DEVICES."""
    devices = {"cpu", "cuda"} if request.param == "one_pass" else set()
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset(devices))
    return request.param


def image_pair(shape, *, dtype=torch.float32, device="cpu", seed=0):
    """x in [0, 1] with some structure, y a noisy, slightly darkened copy."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    coarse = torch.rand((b, c, max(h // 4, 2), max(w // 4, 2)), generator=gen, dtype=torch.float64)
    x = 0.7 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    y = (0.9 * x + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def photo_pairs():
    """Crops (192x256, to keep the suite fast) of scikit-image's photos and noisy copies."""
    skdata = pytest.importorskip("skimage.data")
    for name in ("astronaut", "coffee", "chelsea"):
        img = torch.from_numpy(getattr(skdata, name)()).to(torch.float64).div(255).permute(2, 0, 1)[None]
        img = img[..., 40:232, 40:296].contiguous()
        gen = torch.Generator().manual_seed(1)
        noisy = (img + 0.05 * torch.randn(img.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
        yield name, img, noisy


def value_and_grads(fn, x, y, reduction, upstream_seed=3):
    """fn's output and the gradients of <output, u> for a fixed random u, w.r.t. both inputs."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    out = fn(x, y)
    gen = torch.Generator().manual_seed(upstream_seed)
    u = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    gx, gy = torch.autograd.grad((out * u).sum(), (x, y))
    return out.detach(), gx, gy


def assert_close_rel(actual, expected, rel, what):
    """max |actual - expected| <= rel * max |expected| (gradients: scale-free)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


# The backward kernels of the CUDA extension (csrc/ssim/ssim_cuda.cuh) and how each is forced:
# the value of EPBAN_SSIM_CUDA_BACKWARD (which epban.ssim hands to the extension at each call),
# and the strip kernel's plan (centre columns a thread, threads, rows a band; 0: the planner's),
# forced through the extension's ssim_force_strip_plan. Both tiles (32 or 64 gradient rows a
# block; a tile setting selects the tiles also where the strip kernel is the default, on images
# of 512 x 512 and more), the strip kernel's two builds (two centre columns a thread, the
# default, and one) with their own plans (plan_strips), and a forced plan of 32 threads and
# 7-row bands (many strips and bands, a last band of fewer rows). Also used by
# test_ssim_cuda_emu.py.
CUDA_BACKWARD_KERNELS = {
    "tile-32x32": ("tile32", (0, 0, 0)),
    "tile-32x64": ("tile64", (0, 0, 0)),
    "strip": ("strip", (0, 0, 0)),
    "strip-1col": ("strip", (1, 0, 0)),
    "strip-32x7": ("strip", (0, 32, 7)),
}


@contextlib.contextmanager
def cuda_backward_forced(monkeypatch, kernel):
    """Within the block, epban.ssim's CUDA gradients run ``kernel`` (a CUDA_BACKWARD_KERNELS
    name, or None: the extension's own choice)."""
    setting, plan = CUDA_BACKWARD_KERNELS[kernel] if kernel else ("auto", (0, 0, 0))
    monkeypatch.setenv("EPBAN_SSIM_CUDA_BACKWARD", setting)
    _extension._C.ssim_force_strip_plan(*plan)
    try:
        yield
    finally:
        _extension._C.ssim_force_strip_plan(0, 0, 0)


def check_fused(x, y, padding, reduction, tols=(1e-5, 1e-4, 1e-4), grad_atol=0.0, **kw):
    """The fused kernel on x, y (float32 or a half type; it computes in float32) against the
    float64 reference on the same inputs upcast: forward within tols[0], gradients within
    tols[1:] of their largest value, or, where float32 arithmetic cannot reach that
    (per-pixel maps of nearly flat regions: E[x^2] - mu^2 cancels), no less accurate than
    the reference run in float32 on the same inputs (it upcasts half inputs as the kernel
    does, and its gradients are rounded to the input dtype as the kernel's are)."""
    out, gx, gy = value_and_grads(fused(padding, reduction, **kw), x, y, reduction)
    truth = value_and_grads(reference(padding, reduction, **kw), x.double(), y.double(), reduction)
    ref32 = value_and_grads(reference(padding, reduction, **kw), x, y, reduction)
    assert out.shape == truth[0].shape and out.dtype == ref32[0].dtype == torch.float32
    assert gx.dtype == gy.dtype == x.dtype
    for name, ours, exact, theirs, tol in zip(("forward", "grad x", "grad y"), (out, gx, gy), truth, ref32, tols):
        bound = tol if name == "forward" else max(tol * exact.abs().max().item(), grad_atol)
        assert_as_accurate(ours, exact, theirs, bound, name)


def assert_as_accurate(ours, exact, theirs, bound, name):
    """ours within ``bound`` of exact (max abs), or no less accurate than twice ``theirs``,
    the float32 reference (where float32 arithmetic cannot reach the bound)."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - exact).abs().max().item()
    ref_err = (theirs.double() - exact).abs().max().item()
    assert err <= max(bound, 2 * ref_err), f"{name}: error {err:.3g} > {bound:.3g} (float32 reference: {ref_err:.3g})"


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
def test_reference_matches_scikit_image_on_photos(photo):
    metrics = pytest.importorskip("skimage.metrics")
    _, x, y = next(p for p in photo_pairs() if p[0] == photo)
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0)
    expected, expected_map = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), full=True, **kwargs)
    ours = ssim_reference(x, y, reduction="mean")
    assert abs(ours.item() - expected) <= 1e-6
    ours_map = ssim_reference(x, y, reduction="map")[0]
    assert torch.allclose(ours_map, torch.from_numpy(expected_map)[:, 5:-5, 5:-5], atol=1e-6, rtol=0)


def test_reference_matches_scikit_image_on_random_images():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = image_pair((1, 2, 37, 45), dtype=torch.float64, seed=5)
    expected = metrics.structural_similarity(
        x[0].numpy(), y[0].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=2.0, channel_axis=0,
    )
    assert abs(ssim_reference(x, y, data_range=2.0).item() - expected) <= 1e-6


@pytest.mark.parametrize("source", ["photos", "random"])
def test_reference_matches_pytorch_msssim(source):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    if source == "photos":
        pairs = [(x, y) for _, x, y in photo_pairs()]
    else:
        pairs = [image_pair((4, 3, 64, 48), dtype=torch.float64, seed=s) for s in range(2)]
    for x, y in pairs:
        # pytorch-msssim builds its window in float32 (a 4e-6 difference on photos); give it
        # the same float64 window so that the comparison is of the formulas.
        win = gaussian_window_1d(11, 1.5, torch.float64, "cpu").view(1, 1, 1, 11).repeat(x.shape[1], 1, 1, 1)
        expected = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False, win=win)
        assert torch.allclose(ssim_reference(x, y, reduction="none"), expected, atol=1e-6, rtol=0)
        assert abs(ssim_reference(x, y).item() - expected.mean().item()) <= 1e-6


def test_reference_same_padding_is_zero_padding():
    x, y = image_pair((2, 3, 23, 31), dtype=torch.float64)
    padded = ssim_reference(F.pad(x, (5, 5, 5, 5)), F.pad(y, (5, 5, 5, 5)), reduction="map")
    assert torch.allclose(ssim_reference(x, y, padding="same", reduction="map"), padded, atol=1e-12, rtol=0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_reference_reductions_agree(padding):
    x, y = image_pair((3, 2, 20, 26), dtype=torch.float64)
    ssim_map = ssim_reference(x, y, padding=padding, reduction="map")
    per_image = ssim_reference(x, y, padding=padding, reduction="none")
    assert per_image.shape == (3,)
    assert torch.allclose(per_image, ssim_map.mean(dim=(1, 2, 3)))
    assert torch.allclose(ssim_reference(x, y, padding=padding), per_image.mean())
    assert torch.allclose(epban.ssim(x, y, padding=padding, backend="reference"), per_image.mean())


@pytest.mark.parametrize("padding", PADDINGS)
def test_reference_gradcheck(padding):
    x, y = image_pair((1, 2, 13, 14), dtype=torch.float64)
    fn = lambda a, b: ssim_reference(a, b, padding=padding, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), fast_mode=True)


def test_identical_images_score_one():
    x, _ = image_pair((2, 3, 24, 24))
    for padding in PADDINGS:
        for backend in ("reference", "auto"):
            assert torch.allclose(epban.ssim(x, x, padding=padding, backend=backend), torch.tensor(1.0), atol=1e-6)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.rand(3, 16, 16), torch.rand(3, 16, 16)), "4-D"),
        (lambda: (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17)), "same shape"),
        (lambda: (torch.randint(0, 255, (1, 3, 16, 16)), torch.randint(0, 255, (1, 3, 16, 16))), "floating"),
        (lambda: (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16).double()), "dtype"),
        (lambda: (torch.rand(1, 3, 10, 30), torch.rand(1, 3, 10, 30)), "at least 11x11"),
        (lambda: (torch.rand(1, 3, 30, 10), torch.rand(1, 3, 30, 10)), "at least 11x11"),
        (lambda: (torch.rand(1, 0, 16, 16), torch.rand(1, 0, 16, 16)), "at least one channel"),
        (lambda: (torch.rand(1, 3, 0, 16), torch.rand(1, 3, 0, 16)), "at least one channel, row and column"),
        (lambda: (torch.rand(1, 3, 16, 0), torch.rand(1, 3, 16, 0)), "at least one channel, row and column"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_inputs_raise_value_error(make, match, backend):
    x, y = make()
    with pytest.raises(ValueError, match=match):
        epban.ssim(x, y, backend=backend)
    with pytest.raises(ValueError, match=match):
        epban.ssim_loss(x, y, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_an_empty_batch_gives_empty_results(backend):
    """A batch of no images gives empty per-image values and maps, by both backends; their mean
    is refused (it would be NaN)."""
    x, y = image_pair((0, 3, 16, 16))
    assert epban.ssim(x, y, reduction="none", backend=backend).shape == (0,)
    assert epban.ssim(x, y, reduction="map", backend=backend).shape == (0, 3, 6, 6)
    with pytest.raises(ValueError, match="batch size 0"):
        epban.ssim(x, y, backend=backend)
    with pytest.raises(ValueError, match="batch size 0"):
        epban.ssim_loss(x, y, l1=0.5, backend=backend)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding="reflect"), "padding"),
        (dict(reduction="sum"), "reduction"),
        (dict(win_size=10), "win_size"),
        (dict(sigma=0.0), "sigma"),
        (dict(data_range=0.0), "data_range"),
        (dict(backend="triton"), "backend"),
        # the checks of epban.ops._checks.window_args, shared with ms_ssim
        (dict(win_size=True), "win_size"),
        (dict(win_size=11.0), "win_size"),
        (dict(sigma=float("inf")), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(sigma=None), "sigma"),
        (dict(sigma=1e-200), "sigma"),  # 2 sigma^2 underflows to 0: a NaN window
        (dict(sigma=1e200), "sigma"),  # 2 sigma^2 overflows
        (dict(data_range=float("inf")), "data_range"),
        (dict(data_range=True), "data_range"),
        (dict(data_range=None), "data_range"),
        (dict(data_range=torch.tensor([1.0, 2.0])), "data_range"),
        (dict(data_range=torch.tensor(True)), "data_range"),
        (dict(k1=float("nan")), "k1"),
        (dict(k1=-0.01), "k1"),
        (dict(k2=float("inf")), "k2"),
        (dict(k2="0.03"), "k2"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_arguments_raise_value_error(kwargs, match, backend):
    x, y = image_pair((1, 1, 16, 16))
    with pytest.raises(ValueError, match=match):
        epban.ssim(x, y, **{"backend": backend, **kwargs})
    with pytest.raises(ValueError, match=match):
        epban.ssim_loss(x, y, **{"backend": backend, **kwargs})


NUMPY_AND_TENSOR_ARGS = [
    dict(data_range=np.float32(2.0), k1=np.float32(0.25), k2=np.float64(0.5), sigma=np.float32(1.5),
         win_size=np.int64(11)),
    dict(data_range=torch.tensor(2.0), k1=torch.tensor([0.25]), k2=torch.tensor(0.5, dtype=torch.float64)),
    dict(data_range=torch.tensor([2]), win_size=np.int32(11)),
]


@pytest.mark.parametrize("kwargs", NUMPY_AND_TENSOR_ARGS)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_numpy_and_tensor_arguments_are_numbers(kwargs, backend):
    """NumPy scalars and one-element tensors serve as the Python numbers they hold."""
    x, y = image_pair((2, 3, 16, 17))
    numbers = {k: v.item() for k, v in kwargs.items()}
    assert torch.equal(epban.ssim(x, y, backend=backend, **kwargs), epban.ssim(x, y, backend=backend, **numbers))
    assert torch.equal(epban.ssim_loss(x, y, weight=np.float32(0.5), l1=np.float64(0.25), backend=backend, **kwargs),
                       epban.ssim_loss(x, y, weight=0.5, l1=0.25, backend=backend, **numbers))


@needs_cpu_kernel
@pytest.mark.parametrize("kwargs", NUMPY_AND_TENSOR_ARGS)
def test_numpy_and_tensor_arguments_take_the_fused_path(kwargs):
    """The fused kernels take the normalised numbers (they want a Python-number data_range)."""
    x, y = image_pair((2, 3, 16, 17))
    torch.testing.assert_close(epban.ssim(x, y, backend="fused", **kwargs),
                               ssim_reference(x, y, **{k: v.item() for k, v in kwargs.items()}))


def test_fused_backend_raises_when_it_cannot_serve():
    x, y = image_pair((1, 1, 16, 16))
    with pytest.raises(ValueError, match="fused"):
        epban.ssim(x, y, win_size=7, backend="fused")
    if fused_unavailable_reason("cpu") is not None:
        with pytest.raises(ValueError, match="fused"):
            epban.ssim(x, y, backend="fused")


# ---------------------------------------------------------------- dispatch


@needs_cpu_kernel
def test_auto_picks_the_fused_kernel_for_its_window(monkeypatch):
    calls = []
    real = ssim_module._ssim_fused
    monkeypatch.setattr(ssim_module, "_ssim_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = image_pair((1, 1, 16, 16))
    epban.ssim(x, y)
    assert len(calls) == 1
    epban.ssim(x, y, win_size=7)
    epban.ssim(x, y, backend="reference")
    assert len(calls) == 1
    assert SSIM_FUSED_WINDOW == (11, 1.5)


# ---------------------------------------------------------------- fused vs reference


def fused(padding, reduction, **kw):
    return lambda a, b: epban.ssim(a, b, padding=padding, reduction=reduction, backend="fused", **kw)


def reference(padding, reduction, **kw):
    return lambda a, b: ssim_reference(a, b, padding=padding, reduction=reduction, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_matches_reference(device, shape, padding, reduction, ssim_path):
    x, y = image_pair(shape, device=device, seed=sum(shape))
    check_fused(x, y, padding, reduction)


@needs_cuda_kernel[0]
@needs_cuda_kernel[1]
@pytest.mark.parametrize("kernel", list(CUDA_BACKWARD_KERNELS))
@pytest.mark.parametrize("shape", [(1, 3, 257, 131), (2, 2, 61, 95)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_backward_kernels(kernel, shape, ssim_path, monkeypatch):
    """Each CUDA backward kernel (CUDA_BACKWARD_KERNELS; map gradients stay on the tiles), on
    sizes that leave partial tiles, strips and bands, both training paths, from NaN-poisoned
    allocations."""
    x, y = image_pair(shape, device="cuda", seed=sum(shape))
    with cuda_backward_forced(monkeypatch, kernel), poisoned_allocations():
        check_fused(x, y, "valid", "mean")
        check_fused(x, y, "same", "none")


@needs_cuda_kernel[0]
@needs_cuda_kernel[1]
@pytest.mark.parametrize("shape", [(1, 2, 512, 517), (2, 1, 530, 1100)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_default_backward_on_large_images(shape, ssim_path, monkeypatch):
    """Images of 512 x 512 and more take the strip kernel with its own plan by default
    (the emulator tests check which kernel runs)."""
    x, y = image_pair(shape, device="cuda", seed=sum(shape))
    with cuda_backward_forced(monkeypatch, None), poisoned_allocations():
        check_fused(x, y, "valid", "mean")
        check_fused(x, y, "same", "none")


@needs_cuda_kernel[0]
@needs_cuda_kernel[1]
def test_cuda_backward_setting_is_checked(monkeypatch):
    """A value of EPBAN_SSIM_CUDA_BACKWARD outside auto|tile32|tile64|strip is refused when a
    CUDA call reads it; the extension refuses one too."""
    x, y = image_pair((1, 1, 16, 16), device="cuda")
    monkeypatch.setenv("EPBAN_SSIM_CUDA_BACKWARD", "tile")
    with pytest.raises(ValueError, match="EPBAN_SSIM_CUDA_BACKWARD"):
        epban.ssim(x, y, backend="fused")
    with pytest.raises(RuntimeError, match="auto, tile32, tile64, strip"):
        _extension._C.ssim_set_cuda_backward("tile")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_data_range_and_constants(device, ssim_path):
    x, y = image_pair((2, 3, 19, 23), device=device)
    check_fused(255 * x, 255 * y, "valid", "none", data_range=255.0, k1=0.02, k2=0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_half_types(device, dtype, padding, reduction):
    x, y = image_pair((2, 3, 37, 41), dtype=dtype, device=device)
    rel = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the gradients are rounded to the input dtype
    check_fused(x, y, padding, reduction, tols=(1e-5, rel, rel))


@needs_cpu_kernel
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_float64_gradcheck(padding, reduction, ssim_path):
    x, y = image_pair((2, 1, 12, 15), dtype=torch.float64)
    assert torch.autograd.gradcheck(fused(padding, reduction), (x.requires_grad_(), y.requires_grad_()), fast_mode=True)


@needs_cpu_kernel
@pytest.mark.parametrize("padding", PADDINGS)
def test_fused_float64_matches_reference_exactly(padding):
    x, y = image_pair((2, 3, 30, 27), dtype=torch.float64)
    out, gx, gy = value_and_grads(fused(padding, "map"), x, y, "map")
    ref, rgx, rgy = value_and_grads(reference(padding, "map"), x, y, "map")
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert_close_rel(gx, rgx, 1e-10, "grad x")
    assert_close_rel(gy, rgy, 1e-10, "grad y")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gradient_of_one_input(device, ssim_path):
    x, y = image_pair((2, 2, 25, 33), device=device)
    xr = x.clone().requires_grad_(True)
    epban.ssim(xr, y, backend="fused").backward()
    xr2 = x.double().requires_grad_(True)
    ssim_reference(xr2, y.double()).backward()
    assert_close_rel(xr.grad, xr2.grad, 1e-4, "grad x")
    yr = y.clone().requires_grad_(True)
    epban.ssim(x, yr, padding="same", reduction="none", backend="fused").sum().backward()
    yr2 = y.double().requires_grad_(True)
    ssim_reference(x.double(), yr2, padding="same", reduction="none").sum().backward()
    assert_close_rel(yr.grad, yr2.grad, 1e-4, "grad y")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "x_value, y_value", [(0.0, 0.0), (0.5, 0.5), (1.0, 0.25), (0.5, None)], ids=["zeros", "equal", "unequal", "one"]
)
@pytest.mark.parametrize("padding", PADDINGS)
def test_fused_constant_images_are_finite(device, x_value, y_value, padding, ssim_path):
    x, y = image_pair((2, 3, 21, 17), device=device)
    x = torch.full_like(x, x_value)
    if y_value is not None:
        y = torch.full_like(y, y_value)
    for reduction in REDUCTIONS:
        # The exact gradients are 0 or tiny here: the float32 rounding of the partials sets the
        # bar. For x = 1, y = 0.25 the three terms of dL/dx are ~4.5 (S / B2 with B2 ~ C2) and
        # cancel to ~3e-3: 2e-6 is 4 ulps of the terms.
        # The forward is ill-conditioned where the variance is zero: B2 = (E[u^2] - E[u]^2) / 2
        # + ... + C2 with B2 ~ C2 = 9e-4, so one ulp of E[u^2] (u = x + y ~ 1.25: 1.2e-7) moves
        # S by ~1e-4. The reference's five-moment form happens to be exact for these
        # power-of-two-friendly constants, so "no worse than the float32 reference" does not
        # apply; on photos the kernels' form is the more accurate (test_fused_map_accuracy_on_photos).
        # The gradients are as ill-conditioned: over constant pairs such as (0.8, 0.3), (0.37,
        # 0.81), (0.6, 0.55) both float32 forms are 1e-4 to 5e-3 off relative to the largest
        # gradient, the kernels' no worse than the reference's except on these constants.
        check_fused(x, y, padding, reduction, tols=(2e-4, 5e-4, 5e-4), grad_atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_writes_every_element(device, dtype, reduction, ssim_path):
    """Outputs and gradients come from NaN-filled allocations: any element not written stays NaN."""
    x, y = image_pair((2, 3, 45, 70), dtype=dtype, device=device)
    with poisoned_allocations():
        for padding in PADDINGS:
            out, gx, gy = value_and_grads(fused(padding, reduction), x, y, reduction)
            assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
            grads = torch.ops.epban.ssim_backward(
                torch.ones(2, device=device), x, y, 1e-4, 9e-4, padding == "same", True, True
            )
            assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_fused_non_contiguous_inputs(device, layout):
    x, y = image_pair((2, 3, 40, 36), device=device)
    if layout == "channels_last":
        xs, ys = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        xs, ys = x.transpose(2, 3).contiguous().transpose(2, 3), y.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        xs, ys = torch.stack((x, 0 * x), dim=-1)[..., 0], torch.stack((y, 0 * y), dim=-1)[..., 0]
    assert not xs.is_contiguous()
    for reduction in ("none", "map"):
        out, gx, gy = value_and_grads(fused("same", reduction), xs, ys, reduction)
        ref, rgx, rgy = value_and_grads(fused("same", reduction), x, y, reduction)
        assert torch.equal(out, ref)
        assert torch.equal(gx, rgx) and torch.equal(gy, rgy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_fused_upstream_gradient_strides(device, padding):
    """The backward reads the upstream gradient through its strides: expanded (from .sum()),
    transposed and strided gradients give the gradients of their contiguous copies."""
    x, y = image_pair((2, 3, 40, 36), device=device)
    same = padding == "same"
    ssim_map = torch.ops.epban.ssim_map(x, y, 1e-4, 9e-4, same)
    u = torch.randn(ssim_map.shape, generator=torch.Generator().manual_seed(4)).to(device)
    views = [
        torch.tensor(0.37, device=device).expand(ssim_map.shape),
        u.transpose(2, 3).contiguous().transpose(2, 3),
        torch.tensor(0.37, device=device).expand(2),
        torch.stack((u[:, 0, 0, 0], u[:, 1, 0, 0]), dim=-1)[:, 0],
    ]
    for grad in views:
        assert not grad.is_contiguous() or grad.stride()[0] == 0
        strided = torch.ops.epban.ssim_backward(grad, x, y, 1e-4, 9e-4, same, True, True)
        dense = torch.ops.epban.ssim_backward(grad.contiguous(), x, y, 1e-4, 9e-4, same, True, True)
        assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])
    xr = x.clone().requires_grad_(True)
    epban.ssim(xr, y, padding=padding, reduction="map", backend="fused").sum().backward()
    dense = torch.ops.epban.ssim_backward(torch.ones_like(ssim_map), x, y, 1e-4, 9e-4, same, True, False)[0]
    assert torch.equal(xr.grad, dense)


@needs_cpu_kernel
@pytest.mark.parametrize("padding", PADDINGS)
def test_opcheck(padding):
    x, y = image_pair((2, 2, 14, 17))
    same = padding == "same"
    args = (x.requires_grad_(True), y.requires_grad_(True), 1e-4, 9e-4, same)
    torch.library.opcheck(torch.ops.epban.ssim_per_image.default, args)
    torch.library.opcheck(torch.ops.epban.ssim_map.default, args)
    bx, by = x.detach(), y.detach()
    torch.library.opcheck(torch.ops.epban.ssim_backward.default, (torch.rand(2), bx, by, 1e-4, 9e-4, same, True, False))
    grad_map = torch.rand(torch.ops.epban.ssim_map(bx, by, 1e-4, 9e-4, same).shape)
    torch.library.opcheck(torch.ops.epban.ssim_backward.default, (grad_map, bx, by, 1e-4, 9e-4, same, True, True))
    torch.library.opcheck(torch.ops.epban.ssim_per_image_one_pass.default, args)
    torch.library.opcheck(torch.ops.epban.ssim_mean_one_pass.default, args)
    for grad_x, grad_y in ((True, True), (False, True), (False, False)):
        for batch_mean in (False, True):
            torch.library.opcheck(torch.ops.epban.ssim_per_image_and_grad.default,
                                  (bx, by, 1e-4, 9e-4, same, grad_x, grad_y, batch_mean))
    torch.library.opcheck(torch.ops.epban.ssim_per_image_and_grad.default,
                          (bx, by, 1e-4, 9e-4, same, True, True, True, -0.3))
    torch.library.opcheck(torch.ops.epban.ssim_per_image_one_pass.default, args + (-0.3,))
    torch.library.opcheck(torch.ops.epban.ssim_mean_one_pass.default, args + (2.5,))
    torch.library.opcheck(torch.ops.epban.ssim_scale_gradient_.default, (torch.rand(2, 2, 5, 7), torch.rand(2)))
    torch.library.opcheck(torch.ops.epban.ssim_scale_gradient_.default, (torch.rand(2, 2, 5, 7), torch.tensor(0.5)))


@needs_cpu_kernel
@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("weight", [None, 0.4])
def test_torch_compile_traces_the_fused_op(reduction, weight):
    """fullgraph torch.compile through the one-pass ops (ssim_per_image_one_pass for "none",
    ssim_mean_one_pass for "mean"): their fake kernels and C++ autograd, whose backward calls
    the in-place ssim_scale_gradient_; with a weight, through ssim_loss (the scale folded in).
    The upstream gradient is random, so the scaling runs."""
    x, y = image_pair((2, 3, 24, 20))
    if weight is None:
        fn = lambda a, b: epban.ssim(a, b, reduction=reduction)  # noqa: E731
        ref_fn = reference("valid", reduction)
    else:
        fn = lambda a, b: epban.ssim_loss(a, b, weight=weight, reduction=reduction)  # noqa: E731
        ref_fn = lambda a, b: weight * (1 - reference("valid", reduction)(a, b))  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    out, gx, _ = value_and_grads(compiled, x, y, reduction)
    ref, rgx, _ = value_and_grads(ref_fn, x.double(), y.double(), reduction)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)
    assert_close_rel(gx, rgx, 1e-4, "grad x")
    eager = value_and_grads(fn, x, y, reduction)
    assert torch.allclose(gx, eager[1])


@pytest.mark.parametrize(
    "device", [pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")])]
)
def test_cuda_float64_uses_the_reference(device):
    x, y = image_pair((1, 2, 16, 16), dtype=torch.float64, device=device)
    assert torch.allclose(epban.ssim(x, y), ssim_reference(x, y))
    with pytest.raises(ValueError, match="fused"):
        epban.ssim(x, y, backend="fused")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_photos(device):
    for _, x, y in photo_pairs():
        x32, y32 = x.float().to(device), y.float().to(device)
        assert abs(epban.ssim(x32, y32, backend="fused").item() - ssim_reference(x, y).item()) <= 1e-5


def natural_pairs():
    """128x128 crops of scikit-image photos (green channel) and SR-like partners: noisy,
    blurred, near-equal, and a flat image against the textured one."""
    skdata = pytest.importorskip("skimage.data")
    gen = torch.Generator().manual_seed(2)
    for name in ("astronaut", "camera", "coffee"):
        img = torch.from_numpy(getattr(skdata, name)()).to(torch.float64).div(255)
        img = (img[..., 1] if img.dim() == 3 else img)[100:228, 100:228][None, None].contiguous()
        noise = torch.randn(img.shape, generator=gen, dtype=torch.float64)
        blurred = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        yield name, img, {
            "noisy": (img + 0.01 * noise).clamp(0, 1),
            "blurred": blurred,
            "near-equal": (img + 1e-3 * noise).clamp(0, 1),
            "flat": torch.full_like(img, 0.5),
        }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_fused_map_accuracy_on_photos(device, padding):
    """Per-pixel SSIM of photo pairs in float32: the kernels filter u = x + y and v = x - y
    (ssim_math.h), whose local variances cancel less than those of x and y where the images
    are close. Their map must stay within 2.5e-4 of float64 everywhere and, on the pairs
    where x ~ y, beat the reference run in float32 (five moments of x, y) by 3x or more."""
    fused_map = lambda a, b: epban.ssim(a.to(device), b.to(device), padding=padding, reduction="map",  # noqa: E731
                                        backend="fused").cpu()
    check_map_accuracy_on_photos(fused_map, padding)


def check_map_accuracy_on_photos(ssim_map, padding):
    """ssim_map(x32, y32) (float32 photo pairs, natural_pairs) within 2.5e-4 of the float64
    map, and 3x or more closer than the float32 reference on the pairs where x ~ y."""
    for name, x, partners in natural_pairs():
        for kind, y in partners.items():
            exact = ssim_reference(x, y, padding=padding, reduction="map")
            x32, y32 = x.float(), y.float()
            err = (ssim_map(x32, y32).double() - exact).abs().max().item()
            ref_err = (ssim_reference(x32, y32, padding=padding, reduction="map").double() - exact).abs().max().item()
            assert err <= 2.5e-4, f"{name} {kind}: max error {err:.2e}"
            if kind in ("noisy", "near-equal"):
                assert 3 * err <= ref_err, f"{name} {kind}: max error {err:.2e}, float32 reference {ref_err:.2e}"


# ---------------------------------------------------------------- the one-pass training op


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_mean_matches_the_mean_of_per_image(device, monkeypatch):
    """ssim_mean_one_pass (reduction "mean": the pass sums over the batch and gives the
    gradients of the mean) matches the per-image op followed by .mean(), value and gradients,
    to float32 rounding (gradients within 1e-6 of their largest element: the 1 / B enters
    before the partials are summed instead of after), for any upstream gradient; a second
    backward through a retained graph gives bit-identical gradients."""
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset({device}))
    x, y = image_pair((3, 2, 21, 26), device=device, seed=11)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    mean = epban.ssim(xr, yr, backend="fused")
    assert mean.shape == () and "SsimOnePass" in mean.grad_fn.name()
    per_image = epban.ssim(xr, yr, reduction="none", backend="fused").mean()
    torch.testing.assert_close(mean, per_image, rtol=1e-6, atol=0)
    first = torch.autograd.grad(-0.7 * mean, (xr, yr), retain_graph=True)
    second = torch.autograd.grad(-0.7 * mean, (xr, yr))
    expected = torch.autograd.grad(-0.7 * per_image, (xr, yr))
    for a, b, c in zip(first, second, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6 * c.abs().max().item())  # float32 rounding


def _grad_fn_name(out):
    return type(out.grad_fn).__name__ + " " + out.grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_serves_training_only(device, monkeypatch):
    """Mean/none with an input that requires grad (float32/64) take the one-pass op on the
    devices of the policy; no grad, reduction map and half types take the two-pass ops."""
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset({device}))
    x, y = image_pair((2, 3, 20, 24), device=device)
    xr = x.clone().requires_grad_(True)
    for reduction in ("mean", "none"):
        out = epban.ssim(xr, y, reduction=reduction, backend="fused")
        assert "SsimOnePass" in out.grad_fn.name()  # for mean too: no MeanBackward node after it
        assert out.shape == (() if reduction == "mean" else (2,))
    assert "SsimOnePass" not in epban.ssim(xr, y, reduction="map", backend="fused").grad_fn.name()
    assert "SsimOnePass" not in epban.ssim(xr.bfloat16(), y.bfloat16(), reduction="none", backend="fused").grad_fn.name()
    with torch.no_grad():
        assert epban.ssim(xr, y, backend="fused").grad_fn is None
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset())
    assert "SsimOnePass" not in epban.ssim(xr, y, reduction="none", backend="fused").grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_one_pass_op_matches_the_two_pass_ops(device, padding):
    """ssim_per_image_and_grad: the value of ssim_per_image and the gradient ssim_backward
    gives for an upstream gradient of ones, on an odd shape, each input alone and both."""
    x, y = image_pair((3, 2, 29, 43), device=device, seed=5)
    same = padding == "same"
    value = torch.ops.epban.ssim_per_image(x, y, 1e-4, 9e-4, same)
    ones = torch.ones(3, device=device)
    gx, gy = torch.ops.epban.ssim_backward(ones, x, y, 1e-4, 9e-4, same, True, True)
    for grad_x, grad_y in ((True, True), (True, False), (False, True), (False, False)):
        with poisoned_allocations():
            v, ox, oy = torch.ops.epban.ssim_per_image_and_grad(x, y, 1e-4, 9e-4, same, grad_x, grad_y)
        assert torch.allclose(v, value, atol=2e-6, rtol=0)
        assert ox.shape == (x.shape if grad_x else (0,)) and oy.shape == (y.shape if grad_y else (0,))
        if grad_x:
            assert torch.allclose(ox, gx, atol=1e-10, rtol=1e-5)
        if grad_y:
            assert torch.allclose(oy, gy, atol=1e-10, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_backward_twice_and_one_input(device, monkeypatch):
    """The backward scales the kept gradient in place; a second backward through a retained
    graph recomputes it (same answer), and asking for one input's gradient is served."""
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset({device}))
    x, y = image_pair((2, 3, 23, 19), device=device, seed=7)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = epban.ssim(xr, yr, reduction="none", backend="fused")
    weights = torch.tensor([0.3, -2.0], device=device)
    first = torch.autograd.grad((out * weights).sum(), (xr, yr), retain_graph=True)
    second = torch.autograd.grad((out * weights).sum(), (xr, yr))
    for a, b in zip(first, second):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-5)
    out = epban.ssim(xr, yr, reduction="none", backend="fused")
    (only_x,) = torch.autograd.grad((out * weights).sum(), (xr,))
    assert torch.allclose(only_x, first[0], atol=1e-10, rtol=1e-5)
    xd, yd = x.double().requires_grad_(True), y.double().requires_grad_(True)
    ref = ssim_reference(xd, yd, reduction="none")
    rgx, rgy = torch.autograd.grad((ref * weights.double()).sum(), (xd, yd))
    assert torch.allclose(out.double().detach(), ref.detach(), atol=1e-5, rtol=0)
    assert_close_rel(first[0], rgx, 1e-4, "grad x")
    assert_close_rel(first[1], rgy, 1e-4, "grad y")


# ---------------------------------------------------------------- ssim_loss: the weight folded in


def signalling_nans(shape, device):
    """float32 signalling NaNs (0x7f800001): any arithmetic on one returns a quiet NaN (a
    multiply by 1 included), so an element that still holds the pattern was never multiplied."""
    return torch.full(shape, 0x7F800001, dtype=torch.int32).view(torch.float32).to(device)


def is_signalling_nan(t):
    return t.cpu().view(torch.int32) == 0x7F800001


def check_scale_gradient(scale_gradient_, device, *, per_image_skip):
    """grad *= upstream, in place, for every upstream layout the one-pass backward gets: 0-dim,
    (B,), expanded (from .sum()), strided; grads whose images are dense runs of any length
    (multiples of 4 or not), channels_last, and a strided view (no dense run). Factors of
    exactly 1 leave their elements unwritten: on CUDA (per_image_skip) per image, on the CPU
    when every factor is 1."""
    gen = torch.Generator().manual_seed(8)
    grads = {
        "odd": torch.randn((3, 2, 13, 17), generator=gen),
        "vec4": torch.randn((3, 2, 8, 12), generator=gen),
        "channels_last": torch.randn((3, 2, 9, 11), generator=gen).to(memory_format=torch.channels_last),
        "strided": torch.randn((3, 2, 9, 22), generator=gen)[..., ::2],
    }
    wide = torch.tensor([1.0, 7.0, 2.5, 7.0, 1.0, 7.0])
    upstreams = {
        "0-dim": torch.tensor(-0.7),
        "0-dim one": torch.tensor(1.0),
        "per image": torch.tensor([1.0, 2.5, -3.0]),
        "mixed ones": wide[::2],
        "expanded ones": torch.tensor(1.0).expand(3),
        "all ones": torch.ones(3),
    }
    for gname, grad in grads.items():
        for uname, upstream in upstreams.items():
            g = grad.to(device)
            expected = g * (upstream if upstream.dim() == 0 else upstream.view(3, 1, 1, 1)).to(device)
            scale_gradient_(g, upstream.to(device))
            assert torch.equal(g, expected), f"{gname}, {uname}"
    # Unwritten where the factor is 1: signalling NaNs survive only where nothing multiplied.
    for uname, upstream, kept in (("all ones", torch.ones(3), [True] * 3),
                                  ("0-dim one", torch.tensor(1.0), [True] * 3),
                                  ("mixed", torch.tensor([1.0, 2.0, 1.0]), [per_image_skip, False, per_image_skip]),
                                  ("none", torch.tensor([2.0, 2.0, 2.0]), [False] * 3)):
        g = signalling_nans((3, 2, 13, 17), device)
        scale_gradient_(g, upstream.to(device))
        assert torch.isnan(g).all()
        for image in range(3):
            assert bool(is_signalling_nan(g[image]).all()) == kept[image], f"{uname}, image {image}"
    with pytest.raises(RuntimeError, match="upstream must be"):
        scale_gradient_(torch.zeros((3, 2, 13, 17), device=device), torch.ones(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_scale_gradient_op(device):
    check_scale_gradient(torch.ops.epban.ssim_scale_gradient_, device, per_image_skip=device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_ssim_loss_matches_weighted_one_minus_ssim(device, reduction, padding, ssim_path):
    """ssim_loss(weight=w) = w (1 - SSIM): value and the gradients of both inputs against the
    float64 reference, for a random upstream gradient (the scaling runs) and for .backward()
    of its sum (an upstream of 1: the scaling is skipped), on both paths; weight 0 too."""
    x, y = image_pair((2, 3, 29, 17), device=device, seed=9)
    for weight in (1.0, 0.37, 0.0):
        fn = lambda a, b: epban.ssim_loss(a, b, weight=weight, padding=padding, reduction=reduction)  # noqa: E731
        ref_fn = lambda a, b: weight * (1 - reference(padding, reduction)(a, b))  # noqa: E731
        out, gx, gy = value_and_grads(fn, x, y, reduction)
        ref, rgx, rgy = value_and_grads(ref_fn, x.double(), y.double(), reduction)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0), weight
        for ours, exact, name in ((gx, rgx, "grad x"), (gy, rgy, "grad y")):
            if weight == 0:
                assert torch.equal(ours, torch.zeros_like(ours))
            else:
                assert_close_rel(ours, exact, 1e-4, f"{name}, weight {weight}")
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        fn(xr, yr).sum().backward()
        xd, yd = x.double().requires_grad_(True), y.double().requires_grad_(True)
        ref_fn(xd, yd).sum().backward()
        if weight != 0:
            assert_close_rel(xr.grad, xd.grad, 1e-4, "grad x, upstream 1")
            assert_close_rel(yr.grad, yd.grad, 1e-4, "grad y, upstream 1")


@pytest.mark.parametrize("device", DEVICES)
def test_ssim_loss_hands_the_op_an_upstream_of_one(device, monkeypatch):
    """On the one-pass path ssim_loss is (-w SSIM) + w: the add passes a loss's upstream
    gradient of 1 to the op unchanged, and its backward then multiplies nothing. On the CPU
    that shows in the profile: no aten::mul_ in the backward of ssim_loss, one in that of
    w * (1 - ssim) (the control: the scaling runs there)."""
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset({device}))
    x, y = image_pair((2, 3, 24, 20), device=device)
    xr = x.clone().requires_grad_(True)
    loss = epban.ssim_loss(xr, y, weight=0.3)
    assert loss.grad_fn.name() == "AddBackward0"
    assert "SsimOnePass" in loss.grad_fn.next_functions[0][0].name()
    if device != "cpu":
        return

    def backward_ops(make_loss):
        xr.grad = None
        loss = make_loss()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
        return {e.key: e.count for e in prof.key_averages()}

    folded = backward_ops(lambda: epban.ssim_loss(xr, y, weight=0.3))
    outside = backward_ops(lambda: 0.3 * (1 - epban.ssim(xr, y)))
    assert folded.get("epban::ssim_scale_gradient_") == 1 and outside.get("epban::ssim_scale_gradient_") == 1
    assert "aten::mul_" not in folded
    assert outside.get("aten::mul_") == 1


def test_ssim_loss_bad_arguments():
    x, y = image_pair((1, 1, 16, 16))
    for weight in (float("nan"), float("inf"), "1", True, torch.tensor(1.0), -1, -0.5, np.float32(-1)):
        with pytest.raises(ValueError, match="weight"):
            epban.ssim_loss(x, y, weight=weight)
    for l1 in (-1.0, -1, float("nan"), np.bool_(True), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="l1"):
            epban.ssim_loss(x, y, l1=l1)
    with pytest.raises(ValueError, match="reduction"):
        epban.ssim_loss(x, y, reduction="map")
    with pytest.raises(ValueError, match="at least 11x11"):
        epban.ssim_loss(x[..., :9, :], y[..., :9, :])


def test_ssim_loss_reference_backend():
    """backend="reference" (and the fallback without the extension): w (1 - the reference)."""
    x, y = image_pair((2, 1, 16, 19), dtype=torch.float64)
    for reduction in ("mean", "none"):
        loss = epban.ssim_loss(x, y, weight=0.25, reduction=reduction, backend="reference")
        torch.testing.assert_close(loss, 0.25 * (1 - ssim_reference(x, y, reduction=reduction)), rtol=0, atol=1e-15)
