"""The CUDA SSIM kernels (csrc/ssim/ssim_cuda*.cu) run on the CPU by tests/cuda_emu.

CI has no GPU, so the CUDA tests of test_ssim.py skip there; these build the same .cu files
with g++ against a CPU emulation of the CUDA built-ins (a fiber per CUDA thread, barriers,
warp shuffles, NaN-filled dynamic shared memory) and check every entry point against the
PyTorch reference: forward (per image, map), the backward with every kind of upstream
gradient, the one-pass training op and its backward's in-place scaling, half types, and
under three thread schedules, so that a missing __syncthreads shows. What they cannot
check is speed, and hardware behaviour the emulator does not model (see cuda_emu.h).
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

import epban
from epban.testing import poisoned_allocations
from test_ssim import (CUDA_BACKWARD_KERNELS, assert_as_accurate, assert_close_rel, check_map_accuracy_on_photos,
                       check_scale_gradient, image_pair)

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"
C1, C2 = 0.01**2, 0.03**2
SHAPES = [(3, 1, 13, 29), (2, 4, 57, 31), (1, 3, 257, 131)]
PADDINGS = ("valid", "same")
LANE_ORDER, REVERSE, SHUFFLE = 0, 1, 2


@pytest.fixture(scope="module")
def emu():
    """torch.ops.epban_cuda_emu, built once into build/cuda_emu (about 10 s with g++)."""
    from torch.utils.cpp_extension import load

    # ninja from this Python's environment (make setup installs it there) when it is not on PATH
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")) and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    build = ROOT / "build" / "cuda_emu"
    build.mkdir(parents=True, exist_ok=True)
    load(
        name="epban_cuda_emu",
        sources=[str(EMU_DIR / "ssim_cuda_emu.cpp"), str(EMU_DIR / "emu_selftest.cpp"),
                 str(ROOT / "csrc" / "ssim" / "ssim_geometry.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMU_DIR)],
        extra_cflags=["-O2", "-DWITH_CUDA", "-DSSIM_CUDA_EMULATION", "-Wno-unknown-pragmas"],
        build_directory=str(build),
        is_python_module=False,
        with_cuda=False,
    )
    ops = torch.ops.epban_cuda_emu
    ops.set_schedule(LANE_ORDER, 0)
    yield ops
    ops.set_schedule(LANE_ORDER, 0)


@pytest.fixture
def kernel_choice(emu):
    """The emulated extension's backward kernel and strip plan, put back to its own choice
    (auto, the planner's plan) after the test."""
    yield emu
    emu.set_cuda_backward("auto")
    emu.force_strip_plan(0, 0, 0)


@pytest.fixture(params=[LANE_ORDER, REVERSE, SHUFFLE], ids=["lane-order", "reverse", "shuffle"])
def schedule(request, emu, rng_seed):
    emu.set_schedule(request.param, rng_seed)
    yield request.param
    emu.set_schedule(LANE_ORDER, 0)


# The block size each backward kernel of test_ssim.CUDA_BACKWARD_KERNELS must launch with
# (None: the strip plan's for the shape, from the extension's own planner under the same settings).
BLOCK_THREADS = {"tile-32x32": 256, "tile-32x64": 512, "strip": None, "strip-1col": None, "strip-32x7": 32}
TILE_THREADS = tuple(n for name, n in BLOCK_THREADS.items() if name.startswith("tile"))
EMULATED_SMS = 132  # cuda_emu.h's cudaDevAttrMultiProcessorCount


@pytest.fixture(params=list(CUDA_BACKWARD_KERNELS))
def backward_kernel(request, kernel_choice):
    setting, plan = CUDA_BACKWARD_KERNELS[request.param]
    kernel_choice.set_cuda_backward(setting)
    kernel_choice.force_strip_plan(*plan)
    return request.param


def reference(x, y, padding, reduction):
    return epban.ssim(x, y, data_range=1.0, padding=padding, reduction=reduction, backend="reference")


def assert_map_close(ours, x, y, padding):
    """The float32 map within 1e-5 of the float64 truth, or no less accurate than the
    reference run in float32 (test_ssim.check_fused's rule)."""
    exact = reference(x.double(), y.double(), padding, "map")
    assert ours.shape == exact.shape
    assert_as_accurate(ours, exact, reference(x.float(), y.float(), padding, "map"), 1e-5, "map")


def reference_grads(x, y, padding, reduction, upstream):
    x = x.detach().double().requires_grad_(True)
    y = y.detach().double().requires_grad_(True)
    out = reference(x, y, padding, reduction)
    return torch.autograd.grad(out, (x, y), upstream.double())


def ran_kernels(emu, fn, kernel=None, map_grad=False, shape=None):
    """fn() and a check that it launched emulated kernels (not a fallback), and when kernel
    (a CUDA_BACKWARD_KERNELS name) is given, that the backward ran with it: its block size (a
    strip kernel's: its plan's for the inputs' shape), or a tile's for a map gradient under the
    strip setting (map gradients take the tiles)."""
    before = emu.launches()
    emu.take_block_sizes()
    out = fn()
    assert emu.launches() > before, "no emulated kernel ran"
    if kernel is not None:
        # the gradient pass's kernel is the first launch (the one-pass mode adds a 256-thread sum)
        threads = emu.take_block_sizes()[0]
        expected = BLOCK_THREADS[kernel]
        if kernel.startswith("strip") and map_grad:
            assert threads in TILE_THREADS, "a map gradient must take the tiles"
        elif expected is None:
            b, c, h, w = shape
            planned = emu.strip_plan(b * c, h, w, EMULATED_SMS)[1]
            assert threads == planned, f"the backward ran with {threads} threads, not {kernel}'s plan ({planned})"
        else:
            assert threads == expected, f"the backward ran with {threads} threads, not {kernel}"
    return out


def assert_wanted_grads(grads, expected, wanted):
    """The wanted gradients within 1e-4 of the reference's; the others empty (0,) tensors."""
    for got, exp, want, name in zip(grads, expected, wanted, ("dL/dx", "dL/dy")):
        if want:
            assert_close_rel(got, exp, 1e-4, name)
        else:
            assert got.numel() == 0, name


# ----------------------------------------------------------------------------- the emulator itself


def test_emulator_catches_a_missing_syncthreads(emu):
    """A block reduction with a barrier left out reads neighbours' slots before they are
    written: right in one schedule at most, so some schedule gives a wrong sum. The same
    kernel with the barrier is right under all three."""
    values = torch.arange(1, 257, dtype=torch.float32)
    results = {}
    for order in (LANE_ORDER, REVERSE, SHUFFLE):
        emu.set_schedule(order, 1)
        results[order] = (emu.selftest_block_sum(values, True).item(), emu.selftest_block_sum(values, False).item())
    emu.set_schedule(LANE_ORDER, 0)
    assert all(with_barrier == 256 * 257 / 2 for with_barrier, _ in results.values()), results
    assert any(without != 256 * 257 / 2 for _, without in results.values()), results


def test_emulator_reports_a_barrier_that_cannot_open(emu):
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.selftest_divergent_barrier()


def test_emulator_refuses_a_launch_from_a_kernel(emu):
    with pytest.raises(RuntimeError, match="launch inside a kernel"):
        emu.selftest_nested_launch()
    emu.selftest_block_sum(torch.ones(256), True)  # and launches again afterwards


def test_emulator_warp_shuffle_and_dynamic_shared_poison(emu):
    """__shfl_down_sync and __shfl_xor_sync move lanes' values as on the GPU (own value past
    the warp's end); dynamic shared memory no thread wrote reads as NaN."""
    lanes = torch.arange(64, dtype=torch.float32)
    down, xor, unwritten = emu.selftest_shuffles(lanes, 3)
    lane = torch.arange(64) % 32
    expected_down = torch.where(lane + 3 < 32, lanes + 3, lanes)
    torch.testing.assert_close(down, expected_down, rtol=0, atol=0)
    torch.testing.assert_close(xor, lanes[(torch.arange(64) ^ 3)], rtol=0, atol=0)
    assert torch.isnan(unwritten).all()


# ----------------------------------------------------------------------------- the SSIM kernels


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_forward_matches_reference(emu, schedule, shape, padding):
    x, y = image_pair(shape, seed=sum(shape))
    same = padding == "same"
    per_image = ran_kernels(emu, lambda: emu.ssim_per_image(x, y, C1, C2, same))
    assert_close_rel(per_image, reference(x.double(), y.double(), padding, "none"), 1e-5, "per image")
    with poisoned_allocations():
        ssim_map = emu.ssim_map(x, y, C1, C2, same)
    assert_map_close(ssim_map, x, y, padding)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("upstream", ["per_image", "map", "map_expanded", "map_transposed"])
def test_backward_matches_reference(emu, backward_kernel, schedule, shape, padding, upstream):
    """Every kind of upstream gradient the backward reads through its strides: (B,), a
    contiguous map gradient, the stride-0 one of a .sum(), a non-contiguous view."""
    if backward_kernel.startswith("strip") and upstream in ("map_expanded", "map_transposed"):
        pytest.skip("map gradients take the tiles (tested under their names); 'map' checks the routing")
    x, y = image_pair(shape, seed=sum(shape) + 1)
    same = padding == "same"
    gen = torch.Generator().manual_seed(7)
    b, c, h, w = shape
    out_h, out_w = (h, w) if same else (h - 10, w - 10)
    if upstream == "per_image":
        grad, reduction = torch.randn(b, generator=gen), "none"
    elif upstream == "map":
        grad, reduction = torch.randn(b, c, out_h, out_w, generator=gen), "map"
    elif upstream == "map_expanded":
        grad, reduction = torch.tensor(0.75).expand(b, c, out_h, out_w), "map"
    else:
        grad, reduction = torch.randn(b, c, out_w, out_h, generator=gen).transpose(2, 3), "map"
    with poisoned_allocations():  # every gradient element must be written
        value, gx, gy = ran_kernels(emu, lambda: emu.gradient_pass(grad, x, y, C1, C2, same, True, True),
                                    backward_kernel, map_grad=upstream != "per_image", shape=shape)
    ex, ey = reference_grads(x, y, padding, reduction, grad)
    assert_close_rel(gx, ex, 1e-4, "dL/dx")
    assert_close_rel(gy, ey, 1e-4, "dL/dy")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("wanted", [(True, False), (False, True)])
@pytest.mark.parametrize("upstream", ["per_image", "map"])
def test_backward_of_one_input(emu, backward_kernel, padding, wanted, upstream):
    """One input's gradient (the SR loss: only the network's output requires grad): the
    kernel filters three partial planes instead of four; the other gradient is empty."""
    shape = (2, 3, 45, 70)
    x, y = image_pair(shape, seed=9)
    same = padding == "same"
    out_h, out_w = (45, 70) if same else (35, 60)
    gen = torch.Generator().manual_seed(4)
    if upstream == "per_image":
        grad, reduction = torch.randn(2, generator=gen), "none"
    else:
        grad, reduction = torch.randn(2, 3, out_h, out_w, generator=gen), "map"
    with poisoned_allocations():
        _, gx, gy = ran_kernels(emu, lambda: emu.gradient_pass(grad, x, y, C1, C2, same, *wanted), backward_kernel,
                                map_grad=upstream == "map", shape=shape)
    assert_wanted_grads((gx, gy), reference_grads(x, y, padding, reduction, grad), wanted)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("wanted", [(True, True), (True, False), (False, True)])
def test_one_pass_matches_reference(emu, backward_kernel, schedule, padding, wanted):
    """grad None: the per-image SSIM and the gradients of its sum from one kernel pass."""
    shape = (2, 3, 45, 70)
    x, y = image_pair(shape, seed=5)
    same = padding == "same"
    with poisoned_allocations():
        value, gx, gy = ran_kernels(emu, lambda: emu.gradient_pass(None, x, y, C1, C2, same, *wanted), backward_kernel,
                                    shape=shape)
    assert_close_rel(value, reference(x.double(), y.double(), padding, "none"), 1e-5, "value")
    assert_wanted_grads((gx, gy), reference_grads(x, y, padding, "none", torch.ones(shape[0])), wanted)


@pytest.mark.parametrize("padding", PADDINGS)
def test_one_pass_batch_mean(emu, backward_kernel, padding):
    """batch_mean: the pass gives the batch mean (one sum over every block) and the gradients
    of the mean (an upstream gradient of 1 / B per image)."""
    shape = (3, 2, 37, 45)
    x, y = image_pair(shape, seed=17)
    same = padding == "same"
    with poisoned_allocations():
        value, gx, gy = ran_kernels(emu, lambda: emu.gradient_pass(None, x, y, C1, C2, same, True, True, True),
                                    backward_kernel, shape=shape)
    assert value.shape == ()
    assert_close_rel(value, reference(x.double(), y.double(), padding, "mean"), 1e-5, "value")
    assert_wanted_grads((gx, gy), reference_grads(x, y, padding, "mean", torch.tensor(1.0)), (True, True))


@pytest.mark.parametrize("batch_mean", [False, True])
def test_one_pass_scale(emu, backward_kernel, batch_mean):
    """scale (ssim_loss's folded weight): the value and gradients of scale x the SSIM, from
    the same pass; scale 0 gives zero gradients."""
    shape = (2, 3, 31, 40)
    x, y = image_pair(shape, seed=21)
    reduction = "mean" if batch_mean else "none"
    upstream = torch.tensor(1.0) if batch_mean else torch.ones(shape[0])
    rx, ry = reference_grads(x, y, "valid", reduction, upstream)
    exact = reference(x.double(), y.double(), "valid", reduction)
    for scale in (-0.37, 0.0):
        with poisoned_allocations():
            value, gx, gy = ran_kernels(emu, lambda: emu.gradient_pass(None, x, y, C1, C2, False, True, True, batch_mean,
                                                                        scale), backward_kernel, shape=shape)
        assert value.shape == exact.shape
        assert torch.allclose(value.double(), scale * exact, atol=1e-6, rtol=0)
        if scale == 0:
            assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gy, torch.zeros_like(gy))
        else:
            assert_wanted_grads((gx, gy), (scale * rx, scale * ry), (True, True))
    with pytest.raises(RuntimeError, match="scale needs no upstream gradient"):
        emu.gradient_pass(torch.ones(2), x, y, C1, C2, False, True, True, False, 0.5)


def l1_reference(x, y, padding, batch_mean, scale, l1, wanted):
    """scale x SSIM + l1 x mean |x - y| (per image, or over the batch), its L1 part and the
    gradients of its sum (float64; PyTorch's l1_loss, whose gradient at x == y is 0)."""
    x = x.detach().double().requires_grad_(wanted[0])
    y = y.detach().double().requires_grad_(wanted[1])
    ssim = reference(x, y, padding, "mean" if batch_mean else "none")
    l1_part = (x - y).abs().mean() if batch_mean else (x - y).abs().flatten(1).mean(1)
    value = scale * ssim + l1 * l1_part
    inputs = [t for t, w in zip((x, y), wanted) if w]
    grads = iter(torch.autograd.grad(value.sum(), inputs))
    return value.detach(), l1_part.detach(), tuple(next(grads) if w else None for w in wanted)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("batch_mean", [False, True])
@pytest.mark.parametrize("wanted", [(True, True), (True, False), (False, True)])
def test_one_pass_l1(emu, backward_kernel, padding, batch_mean, wanted):
    """The L1 term in the backward kernels' combine step: value, L1 mean and gradients of
    scale x SSIM + l1 x mean |x - y|, with y equal to x on part of the image (sign(0) = 0)."""
    shape = (2, 3, 41, 67)
    x, y = image_pair(shape, seed=29)
    y = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.3, x, y)
    scale, l1 = -0.6, 1.7
    with poisoned_allocations():
        value, l1_value, gx, gy = ran_kernels(
            emu, lambda: emu.gradient_pass_l1(x, y, C1, C2, padding == "same", *wanted, batch_mean, scale, l1),
            backward_kernel, shape=shape)
    exact, exact_l1, grads = l1_reference(x, y, padding, batch_mean, scale, l1, wanted)
    assert value.shape == exact.shape and l1_value.shape == exact.shape
    assert torch.allclose(value.double(), exact, atol=2e-6, rtol=1e-5)
    assert torch.allclose(l1_value.double(), exact_l1, atol=1e-7, rtol=1e-5)
    assert_wanted_grads((gx, gy), grads, wanted)
    eq = x == y
    if wanted[0]:  # the SSIM part alone (scale 0) is 0: where x == y the gradient is 0 exactly
        _, _, gx0, _ = emu.gradient_pass_l1(x, y, C1, C2, padding == "same", True, False, batch_mean, 0.0, l1)
        assert (gx0[eq] == 0).all()
        torch.testing.assert_close(gx0, l1_reference(x, y, padding, batch_mean, 0.0, l1, (True, False))[2][0].float())


@pytest.mark.parametrize("luminance", [False, True], ids=["cs", "ssim"])
@pytest.mark.parametrize("wanted", [(True, True), (False, True), (False, False)])
def test_ms_ssim_level_pass(emu, backward_kernel, luminance, wanted):
    """MS-SSIM's pass at one scale (ssim_level_and_grad): each plane's mean contrast-structure
    term (luminance off) or SSIM, and its gradients for an upstream gradient of 1, against
    epban.ops.ms_ssim's float64 reference; without gradients, the forward kernel's value."""
    from epban.ops.ms_ssim import ssim_and_cs

    shape = (6, 1, 41, 67)  # planes, as ms_ssim passes them
    x, y = image_pair(shape, seed=31)
    with poisoned_allocations():
        value, gx, gy = ran_kernels(emu, lambda: emu.level_and_grad(x, y, C1, C2, luminance, *wanted),
                                    backward_kernel if any(wanted) else None, shape=shape)
    a = x.double().requires_grad_(wanted[0])
    b = y.double().requires_grad_(wanted[1])
    window = epban.ops.ssim.gaussian_window_1d(11, 1.5, torch.float64, "cpu")
    exact = ssim_and_cs(a, b, window, C1, C2)[0 if luminance else 1].flatten()
    assert value.shape == exact.shape and torch.allclose(value.double(), exact.detach(), atol=2e-6, rtol=1e-5)
    if any(wanted):
        inputs = [t for t, w in zip((a, b), wanted) if w]
        grads = iter(torch.autograd.grad(exact.sum(), inputs))
        assert_wanted_grads((gx, gy), tuple(next(grads) if w else None for w in wanted), wanted)
    else:
        assert gx.numel() == 0 and gy.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ms_ssim_level_pass_half_inputs(emu, dtype):
    """The contrast-structure kernels are float32 instances: half inputs are converted first and
    their gradients returned in the input dtype."""
    shape = (3, 1, 37, 45)
    x, y = image_pair(shape, seed=32)
    xh, yh = x.to(dtype), y.to(dtype)
    value, gx, gy = emu.level_and_grad(xh, yh, C1, C2, False, True, True)
    expected = emu.level_and_grad(xh.float(), yh.float(), C1, C2, False, True, True)
    assert gx.dtype == dtype and gy.dtype == dtype and value.dtype == torch.float32
    assert torch.equal(value, expected[0])
    assert torch.equal(gx, expected[1].to(dtype)) and torch.equal(gy, expected[2].to(dtype))


def test_one_pass_l1_zero_is_the_plain_pass(emu):
    """l1 0: the same bits as the pass without an L1 term, and an empty L1 part."""
    x, y = image_pair((2, 2, 30, 33), seed=8)
    value, l1_value, gx, gy = emu.gradient_pass_l1(x, y, C1, C2, False, True, True, True, -0.5, 0.0)
    plain = emu.gradient_pass(None, x, y, C1, C2, False, True, True, True, -0.5)
    assert l1_value.numel() == 0
    for got, want in zip((value, gx, gy), plain):
        assert torch.equal(got, want)


def test_scale_gradient_kernel(emu, schedule):
    """ssim_scale_gradient_'s CUDA kernel (float4 and scalar paths, 0-dim and per-image
    factors of any strides) and its ATen fallback for grads without dense images: in-place
    products, and elements of images whose factor is exactly 1 left unwritten."""
    launched = []

    def scale_gradient_(grad, upstream):
        before = emu.launches()
        emu.scale_gradient_(grad, upstream)
        dense = grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
        launched.append((dense, emu.launches() - before))

    check_scale_gradient(scale_gradient_, "cpu", per_image_skip=True)
    assert {n for dense, n in launched if dense} == {1}, "dense grads take the kernel, one launch each"
    assert {n for dense, n in launched if not dense} == {0}, "a strided grad takes the ATen multiply"


def test_map_accuracy_on_photos(emu):
    """The CUDA kernels' moments of u = x + y and v = x - y (ssim_math.h): within 2.5e-4 of
    float64 on photo pairs, and 3x or more closer than the float32 reference where x ~ y."""
    check_map_accuracy_on_photos(lambda x, y: emu.ssim_map(x, y, C1, C2, True), "same")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding", PADDINGS)
def test_half_inputs(emu, backward_kernel, dtype, padding):
    """Half inputs, float32 accumulation: against the reference on the rounded inputs;
    the gradients are stored in the input dtype."""
    x, y = image_pair((2, 3, 41, 53), dtype=dtype, seed=11)
    same = padding == "same"
    per_image = emu.ssim_per_image(x, y, C1, C2, same)
    assert per_image.dtype == torch.float32
    assert_close_rel(per_image, reference(x.double(), y.double(), padding, "none"), 1e-5, "per image")
    value, gx, gy = emu.gradient_pass(None, x, y, C1, C2, same, True, True)
    assert gx.dtype == dtype and gy.dtype == dtype
    ex, ey = reference_grads(x, y, padding, "none", torch.ones(2))
    bound = 1e-2 if dtype == torch.float16 else 2e-2
    assert_close_rel(gx, ex, bound, "dL/dx")
    assert_close_rel(gy, ey, bound, "dL/dy")


@pytest.mark.parametrize("padding", PADDINGS)
def test_constant_images_are_finite(emu, backward_kernel, padding):
    x = torch.full((1, 2, 23, 19), 0.5)
    y = torch.full((1, 2, 23, 19), 0.25)
    value, gx, gy = emu.gradient_pass(None, x, y, C1, C2, padding == "same", True, True)
    assert torch.isfinite(value).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert_close_rel(value, reference(x.double(), y.double(), padding, "none"), 1e-5, "value")


def test_non_contiguous_inputs(emu):
    x, y = image_pair((2, 3, 40, 33), seed=13)
    xt, yt = x.transpose(2, 3).contiguous().transpose(2, 3), y.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xt.is_contiguous()
    torch.testing.assert_close(emu.ssim_per_image(xt, yt, C1, C2, False), emu.ssim_per_image(x, y, C1, C2, False),
                               rtol=0, atol=0)


def test_bad_inputs(emu):
    x, y = image_pair((1, 1, 16, 16))
    with pytest.raises(RuntimeError, match="dtype"):
        emu.ssim_per_image(x.double(), y.double(), C1, C2, False)
    with pytest.raises(RuntimeError, match="at least 11x11"):
        emu.ssim_per_image(x[..., :10], y[..., :10], C1, C2, False)
    with pytest.raises(RuntimeError, match="per-image gradient"):
        emu.gradient_pass(torch.ones(3), x, y, C1, C2, False, True, True)


@pytest.mark.parametrize("kernel", ["tile", "stripe", ""])
def test_bad_backward_kernel(kernel_choice, kernel):
    with pytest.raises(RuntimeError, match="must be one of auto, tile32, tile64, strip"):
        kernel_choice.set_cuda_backward(kernel)


@pytest.mark.parametrize("plan, message", [
    ((3, 0, 0), "columns must be 0 .the planner's., 1 or 2"),
    ((-1, 0, 0), "columns must be"),
    ((0, 48, 0), r"multiple of 32 in \[32, 128\] with 2 column"),
    ((2, 256, 0), r"multiple of 32 in \[32, 128\] with 2 column"),
    ((1, 32, 0), r"\[64, 256\] with 1 column"),
    ((0, 0, -1), "rows must be 0 .the planner's. or positive"),
])
def test_bad_strip_plans(kernel_choice, plan, message):
    with pytest.raises(RuntimeError, match=message):
        kernel_choice.force_strip_plan(*plan)


@pytest.mark.parametrize("columns, threads, rows", [(2, 32, 1), (2, 64, 3), (2, 128, 200), (1, 64, 3),
                                                    (1, 256, 200)])
def test_strip_plans_partition_the_image(kernel_choice, columns, threads, rows):
    """Forced strip plans of both builds: bands of one row, of three over a height that leaves
    a shorter last band, and one band taller than the image; strips narrower and wider than it.
    Every gradient pixel is written (poisoned allocations) and every centre summed once."""
    emu = kernel_choice
    emu.set_cuda_backward("strip")
    emu.force_strip_plan(columns, threads, rows)
    x, y = image_pair((2, 2, 23, 131), seed=threads + rows)
    for padding in PADDINGS:
        with poisoned_allocations():
            value, gx, gy = ran_kernels(emu, lambda: emu.gradient_pass(None, x, y, C1, C2, padding == "same", True,
                                                                        True))
        assert_close_rel(value, reference(x.double(), y.double(), padding, "none"), 1e-5, "value")
        assert_wanted_grads((gx, gy), reference_grads(x, y, padding, "none", torch.ones(2)), (True, True))


def test_empty_batch(emu, backward_kernel):
    """No planes: empty values and gradients, no launch (the strip planner is not asked)."""
    x, y = torch.rand(0, 3, 20, 20), torch.rand(0, 3, 20, 20)
    value, gx, gy = emu.gradient_pass(None, x, y, C1, C2, False, True, True)
    assert value.shape == (0,) and gx.shape == x.shape and gy.shape == y.shape
    _, gx, _ = emu.gradient_pass(torch.ones(0), x, y, C1, C2, False, True, False)
    assert gx.shape == x.shape


@pytest.mark.parametrize("shape, kernel, expected", [
    ((1, 1, 512, 520), "auto", "strip"),
    ((1, 1, 511, 600), "auto", "tile-32x64"),
    ((1, 1, 600, 511), "auto", "tile-32x64"),
    ((1, 1, 512, 520), "tile64", "tile-32x64"),
    ((1, 1, 512, 520), "tile32", "tile-32x32"),
    ((1, 1, 13, 29), "strip", "strip"),
])
def test_backward_kernel_by_image_size(kernel_choice, shape, kernel, expected):
    """With auto (the default) a per-image gradient takes the strip kernel on images of at
    least 512 x 512 and the tiles below (ssim_cuda.cu kStripMinSide); a choice forces either;
    a map gradient takes the tiles at any size. Each run against the reference, from
    poisoned allocations."""
    emu = kernel_choice
    emu.set_cuda_backward(kernel)
    x, y = image_pair(shape, seed=shape[2])
    b, c, h, w = shape
    with poisoned_allocations():
        value, gx, _ = ran_kernels(emu, lambda: emu.gradient_pass(None, x, y, C1, C2, False, True, False))
    threads = emu.take_block_sizes()[0]
    if expected == "strip":
        assert threads not in TILE_THREADS and threads == emu.strip_plan(b * c, h, w, EMULATED_SMS)[1]
    else:
        assert threads == BLOCK_THREADS[expected]  # tile_rows_for: the tall tile at 511 to 600 rows
    assert_close_rel(value, reference(x.double(), y.double(), "valid", "none"), 1e-5, "value")
    assert_wanted_grads((gx, torch.empty(0)), reference_grads(x, y, "valid", "none", torch.ones(b)), (True, False))
    # a map gradient: the tiles, whatever the size and the setting
    emu.gradient_pass(torch.ones(b, c, h - 10, w - 10), x, y, C1, C2, False, True, False)
    assert emu.take_block_sizes()[0] in TILE_THREADS


@pytest.mark.parametrize("height, threads", [(32, 256), (64, 512), (96, 256), (128, 512), (160, 256),
                                            (192, 512), (256, 512)])
def test_tile_rows_by_image_height(kernel_choice, height, threads):
    """tile_rows_for (auto, below 512 rows): the tile with fewer warp instructions in all (~15 K
    per 32-row tile, ~26 K per 64-row one), so 32 rows (256 threads) where 64-row tiles would
    leave half a tile outside the image (96, 160 rows) and 64 rows (512 threads) on multiples of
    64 (SR crops; 16x3x256x256). Each run against the reference, from poisoned allocations."""
    emu = kernel_choice
    emu.set_cuda_backward("auto")
    x, y = image_pair((1, 1, height, 23), seed=height)
    with poisoned_allocations():
        value, gx, _ = ran_kernels(emu, lambda: emu.gradient_pass(None, x, y, C1, C2, True, True, False))
    assert emu.take_block_sizes()[0] == threads
    assert_close_rel(value, reference(x.double(), y.double(), "same", "none"), 1e-5, "value")
    assert_wanted_grads((gx, torch.empty(0)), reference_grads(x, y, "same", "none", torch.ones(1)), (True, False))


@pytest.mark.parametrize("shape, plan, halo", [
    ((16, 3, 256, 256), [2, 64, 86, 3, 3], 1.34),
    ((1, 3, 1080, 1920), [2, 128, 99, 8, 11], 1.25),
    ((1, 3, 2160, 3840), [2, 128, 197, 16, 11], 1.15),
])
def test_strip_plans_of_the_benchmark_shapes(kernel_choice, shape, plan, halo):
    """The plans the kernel's comments quote for 132 SMs (columns a thread, threads, rows a
    band, strips, bands), and the halo factor each costs: a gradient pixel's column-steps,
    (rows + 20) / rows x centres / (centres - 10)."""
    emu = kernel_choice
    emu.force_strip_plan(0, 0, 0)
    b, c, h, w = shape
    got = emu.strip_plan(b * c, h, w, 132)
    assert got == plan
    columns, threads, rows, strips, bands = got
    centres = columns * threads
    assert strips * (centres - 10) >= w > (strips - 1) * (centres - 10) and bands * rows >= h
    assert (rows + 20) / rows * centres / (centres - 10) == pytest.approx(halo, abs=0.005)
    emu.force_strip_plan(1, 0, 0)
    assert emu.strip_plan(b * c, h, w, 132)[0] == 1
