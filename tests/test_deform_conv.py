"""The fused multi-branch deformable convolution against torchvision's deform_conv2d, forward and gradients.

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py before anything imports triton): small shapes only.
"""
import pytest
import torch
import torch.nn.functional as F

from epban import settings
from epban.models.pban import GMDC
from epban.ops import deform_conv as ops
from epban.ops.deform_conv import (
    deform_path,
    multi_branch_deform_conv,
    multi_branch_deform_conv_gather,
    multi_branch_deform_conv_reference,
)
from epban.ops.registry import REGISTRY, triton_unavailable_reason

needs_fused = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_unavailable_reason("deform_conv", "cpu", torch.float32) is None),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 before triton is imported",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: OpenMP workers spinning on a busy machine cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(b, c, h, w, ob, kernel_sizes, offset_scale, device=DEVICE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    offsets = [offset_scale * torch.randn(b, 2 * k * k, h, w, generator=g) for k in kernel_sizes]
    weights = [torch.randn(ob, c, k, k, generator=g) / (c * k) for k in kernel_sizes]
    biases = [torch.randn(ob, generator=g) for _ in kernel_sizes]
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in [x, *offsets, *weights, *biases]]
    n = len(kernel_sizes)
    return leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n], leaves[1 + 2 * n:]


def _check_against_reference(x, offsets, weights, biases, atol=2e-5, rtol=2e-5, backend="fused"):
    ref = multi_branch_deform_conv_reference(x, offsets, weights, biases)
    out = multi_branch_deform_conv(x, offsets, weights, biases, backend=backend)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    leaves = [x, *offsets, *weights, *biases]
    names = ["x"] + [f"offsets[{i}]" for i in range(len(offsets))] + [f"weights[{i}]" for i in range(len(weights))] \
        + [f"biases[{i}]" for i in range(len(biases))]
    expected = torch.autograd.grad(ref, leaves, grad)
    got = torch.autograd.grad(out, leaves, grad)
    for name, e, g in zip(names, expected, got):
        torch.testing.assert_close(g, e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, msg=lambda m: f"{name}: {m}")


@needs_fused
def test_matches_torchvision_odd_sizes_samples_outside():
    # Offsets of std 2.5 on a 7x9 map send many samples partly or wholly outside the image.
    _check_against_reference(*_inputs(2, 6, 7, 9, 3, (3, 5), offset_scale=2.5))


@needs_fused
def test_matches_torchvision_official_kernel_sizes():
    _check_against_reference(*_inputs(1, 5, 6, 5, 2, (3, 5, 7, 9), offset_scale=1.5, seed=1))


@needs_fused
def test_more_output_channels_than_one_tile():
    # OB = 72 > 64: several output-channel tiles in the forward and the weight gradient,
    # and the backward's loop over them.
    _check_against_reference(*_inputs(1, 3, 4, 5, 72, (3,), offset_scale=1.0, seed=11))


@needs_fused
def test_integer_offsets_on_the_border():
    # Integer offsets put samples exactly on the border rows/columns and on -1 and H:
    # torchvision's per-corner validity decides both the values and the offset gradients.
    x, offsets, weights, biases = _inputs(1, 4, 5, 6, 2, (3,), offset_scale=0.0, seed=2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        offsets[0].copy_(torch.randint(-3, 4, offsets[0].shape, generator=g).float().to(offsets[0]))
    _check_against_reference(x, offsets, weights, biases)


@needs_fused
def test_samples_all_outside_give_bias_and_zero_gradients():
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3, 5), offset_scale=0.0, seed=4)
    with torch.no_grad():
        for off in offsets:
            off.fill_(-100.0)
    out = multi_branch_deform_conv(x, offsets, weights, biases, backend="fused")
    expected = torch.cat(biases).detach().view(1, -1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected)
    gx, *goffs = torch.autograd.grad(out.sum(), [x, *offsets])
    assert not gx.any() and not any(g.any() for g in goffs)


@needs_fused
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in the interpreter
def test_nan_offset_makes_its_pixel_nan_without_wild_reads():
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3,), offset_scale=1.0, seed=12)
    with torch.no_grad():
        offsets[0][0, 4, 1, 2] = float("nan")
        offsets[0][0, 7, 2, 3] = float("inf")
    out = multi_branch_deform_conv(x, offsets, weights, biases, backend="fused")
    assert out[0, :, 1, 2].isnan().all() and out.isfinite().sum() >= out.numel() - 2 * out.shape[1]


@needs_fused
def test_zero_offsets_are_a_plain_convolution():
    x, offsets, weights, biases = _inputs(1, 4, 6, 7, 3, (3, 5), offset_scale=0.0, seed=5)
    out = multi_branch_deform_conv(x, offsets, weights, biases, backend="fused")
    conv = torch.cat([F.conv2d(x, w, b, padding=w.shape[-1] // 2) for w, b in zip(weights, biases)], dim=1)
    torch.testing.assert_close(out, conv, atol=2e-5, rtol=2e-5)


@needs_fused
def test_channels_last_in_channels_last_out():
    x, offsets, weights, biases = _inputs(2, 4, 5, 6, 2, (3,), offset_scale=1.0, seed=6)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = multi_branch_deform_conv(xl, offsets, weights, biases, backend="fused")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, multi_branch_deform_conv_reference(x, offsets, weights, biases),
                               atol=2e-5, rtol=2e-5)
    (gx,) = torch.autograd.grad(out.square().sum(), [xl])
    (ex,) = torch.autograd.grad(multi_branch_deform_conv_reference(x, offsets, weights, biases).square().sum(), [x])
    torch.testing.assert_close(gx, ex, atol=1e-4, rtol=1e-4)


@needs_fused
def test_bfloat16_within_1e2_of_float32():
    x, offsets, weights, biases = _inputs(1, 16, 5, 6, 16, (3, 5), offset_scale=1.0, seed=7)
    ref = multi_branch_deform_conv_reference(x, offsets, weights, biases)
    cast = [t.detach().bfloat16().requires_grad_() for t in [x, *offsets, *weights, *biases]]
    xb, ob, wb, bb = cast[0], cast[1:3], cast[3:5], cast[5:]
    out = multi_branch_deform_conv(xb, ob, wb, bb, backend="fused")
    assert out.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= 1e-2 * scale
    gx, gw = torch.autograd.grad(out.float().sum(), [xb, wb[1]])
    ex, ew = torch.autograd.grad(ref.sum(), [x, weights[1]])
    assert (gx.float() - ex).abs().max() <= 2e-2 * ex.abs().max()
    assert (gw.float() - ew).abs().max() <= 2e-2 * ew.abs().max()


@needs_fused
def test_gmdc_fused_backend_matches_reference():
    torch.manual_seed(8)
    block = GMDC(8, (3, 5)).to(DEVICE)
    with torch.no_grad():
        for gen in block.param_generators:
            gen.weight.normal_(0, 0.1)
            gen.bias.normal_(0, 0.5)
    x = torch.randn(1, 8, 5, 6, device=DEVICE)
    block.backend = "reference"
    ref = block(x)
    block.backend = "fused"
    torch.testing.assert_close(block(x), ref, atol=2e-5, rtol=2e-5)


@needs_fused
def test_opcheck_of_the_registered_op():
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3,), offset_scale=1.0, seed=9)
    args = (x, torch.cat(offsets, 1).detach().requires_grad_(), ops.pack_weights(weights).detach().requires_grad_(),
            torch.cat(biases).detach().requires_grad_(), [3], "ieee")
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.epban.multi_branch_deform_conv.default, args, test_utils=utils)
    grad = torch.randn(1, 2, 4, 5, device=DEVICE)
    backward_args = (grad, x.detach(), args[1].detach(), args[2].detach(), [3], "ieee")
    torch.library.opcheck(torch.ops.epban.multi_branch_deform_conv_backward_data.default, backward_args,
                          test_utils=utils)
    torch.library.opcheck(torch.ops.epban.multi_branch_deform_conv_backward_weight.default, backward_args,
                          test_utils=utils)


@needs_fused
def test_no_grad_and_inference_mode_give_the_same_values():
    x, offsets, weights, biases = _inputs(1, 3, 5, 6, 2, (1, 3), offset_scale=0.7, seed=13)
    expected = multi_branch_deform_conv(x, offsets, weights, biases, backend="fused").detach()
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            out = multi_branch_deform_conv(x, offsets, weights, biases, backend="fused")
        assert out.grad_fn is None and torch.equal(out, expected)


def test_which_path_serves(monkeypatch):
    x = torch.empty(1, 3, 4, 5)
    assert deform_path(x, "auto") == "gather" and REGISTRY["deform_conv"].auto_backend(torch.device("cpu")) == "gather"
    assert deform_path(x, "gather") == "gather" and deform_path(x, "reference") == "reference"
    assert deform_path(torch.empty(0, device="meta"), "auto") == "reference"  # no kernels for that device
    if triton_unavailable_reason("deform_conv", "cpu", torch.float32) is None:
        assert deform_path(x, "fused") == "fused"
        with pytest.raises(ValueError, match="float16"):
            deform_path(x.half(), "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        deform_path(x, "fused")


def test_auto_is_the_gather_path_on_cpu():
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3, 5), offset_scale=1.0, device="cpu", seed=10)
    out = multi_branch_deform_conv(x, offsets, weights, biases)
    assert torch.equal(out, multi_branch_deform_conv_gather(x, offsets, weights, biases))
    ref = multi_branch_deform_conv(x, offsets, weights, biases, backend="reference")
    assert torch.equal(ref, multi_branch_deform_conv_reference(x, offsets, weights, biases))
    assert not torch.equal(out, ref)  # two computations (a test that could not tell them apart proves nothing)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------------ the gather (grid_sample) path
@pytest.mark.parametrize("b,c,h,w,ob,kernel_sizes,offset_scale", [
    (2, 5, 7, 13, 3, (3, 5), 3.0),        # odd sizes, H != W, many samples outside the image
    (3, 4, 1, 9, 2, (3,), 1.5),           # H = 1
    (1, 3, 11, 1, 2, (5,), 1.5),          # W = 1
    (1, 4, 6, 5, 2, (3, 5, 7, 9), 0.7),   # the model's four branches
])
def test_gather_matches_torchvision_float64(b, c, h, w, ob, kernel_sizes, offset_scale):
    x, offsets, weights, biases = _inputs(b, c, h, w, ob, kernel_sizes, offset_scale, device="cpu",
                                          dtype=torch.float64, seed=h * 31 + w)
    _check_against_reference(x, offsets, weights, biases, atol=1e-10, rtol=1e-10, backend="gather")


def test_gather_matches_torchvision_float32():
    x, offsets, weights, biases = _inputs(2, 6, 9, 8, 3, (3, 5, 7), 2.0, device="cpu", seed=21)
    _check_against_reference(x, offsets, weights, biases, backend="gather")


def test_gather_gradcheck_float64():
    x, offsets, weights, biases = _inputs(1, 2, 4, 5, 2, (3,), 0.8, device="cpu", dtype=torch.float64, seed=22)
    # Keep samples off integer coordinates, where bilinear sampling has no derivative.
    with torch.no_grad():
        offsets[0].add_(0.37)
    assert torch.autograd.gradcheck(
        lambda *t: multi_branch_deform_conv(t[0], [t[1]], [t[2]], [t[3]], backend="gather"),
        (x, offsets[0], weights[0], biases[0]))


def test_gather_bfloat16_within_1e2_of_float32():
    x, offsets, weights, biases = _inputs(1, 4, 6, 7, 2, (3, 5), 1.0, device="cpu", seed=23)
    ref = multi_branch_deform_conv_reference(x, offsets, weights, biases)
    half = [t.detach().bfloat16() for t in (x, *offsets, *weights, *biases)]
    out = multi_branch_deform_conv(half[0], half[1:3], half[3:5], half[5:], backend="gather")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)


def test_gather_nan_offset_makes_its_pixel_nan():
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3,), 1.0, device="cpu", seed=24)
    with torch.no_grad():
        offsets[0][0, 4, 1, 2] = float("nan")
    out = multi_branch_deform_conv(x, offsets, weights, biases, backend="gather")
    assert out[0, :, 1, 2].isnan().all() and out.isfinite().sum() == out.numel() - out.shape[1]


def test_gmdc_gather_and_reference_backends_agree():
    torch.manual_seed(25)
    gmdc = GMDC(8, (3, 5)).double()
    with torch.no_grad():
        for gen in gmdc.param_generators:
            gen.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64, requires_grad=True)
    out = gmdc(x)
    (gx,) = torch.autograd.grad(out.square().sum(), [x])
    gmdc.backend = "reference"
    ref = gmdc(x)
    (rx,) = torch.autograd.grad(ref.square().sum(), [x])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gx, rx, atol=1e-9, rtol=1e-9)


def test_fused_on_cpu_without_interpreter_is_a_value_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3,), offset_scale=1.0, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        multi_branch_deform_conv(x, offsets, weights, biases, backend="fused")


def test_unknown_fp32_precision_is_a_value_error(monkeypatch):
    x, offsets, weights, biases = _inputs(1, 3, 4, 5, 2, (3,), offset_scale=1.0, device="cpu")
    with pytest.raises(ValueError, match="fp32_precision"):
        multi_branch_deform_conv(x, offsets, weights, biases, fp32_precision="fp16")
    monkeypatch.setenv("EPBAN_FP32_PRECISION", "fp16")  # read at each call
    with pytest.raises(ValueError, match="EPBAN_FP32_PRECISION"):
        multi_branch_deform_conv(x, offsets, weights, biases)


def test_fp32_precision_default_and_setting(monkeypatch):
    monkeypatch.delenv("EPBAN_FP32_PRECISION", raising=False)
    assert ops.check_fp32_precision(None) == "ieee"
    monkeypatch.setenv("EPBAN_FP32_PRECISION", "tf32x3")
    assert ops.check_fp32_precision(None) == "tf32x3"
    assert ops.check_fp32_precision("tf32") == "tf32"  # the argument wins over the setting


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, o, w, b: (x, o[:1], w, b), "one tensor per branch"),
        (lambda x, o, w, b: (x, o, [w[0][:, :2]] + w[1:], b), "weights\\[0\\]"),
        (lambda x, o, w, b: (x, [o[0][:, :4]] + o[1:], w, b), "offsets\\[0\\]"),
        (lambda x, o, w, b: (x[0], o, w, b), "4-D"),
        (lambda x, o, w, b: (x, o, w, b, "bogus"), "backend"),
    ],
)
def test_bad_arguments_are_value_errors(change, match):
    args = _inputs(1, 3, 4, 5, 2, (3, 5), offset_scale=1.0, device="cpu")
    x, o, w, b, *backend = change(*args)
    with pytest.raises(ValueError, match=match):
        multi_branch_deform_conv(x, o, w, b, backend=backend[0] if backend else "auto")


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_gather_matches_torchvision():
    """The gather path is plain PyTorch ops: on CUDA too (backend="gather"), float32, the model's branches."""
    x, offsets, weights, biases = _inputs(2, 64, 11, 9, 16, (3, 5, 7, 9), offset_scale=2.0, device="cuda", seed=31)
    _check_against_reference(x, offsets, weights, biases, atol=1e-4, rtol=1e-4, backend="gather")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_official_width_matches_torchvision(dtype):
    """The official width (256 channels, four branches, 64 outputs each), both dtypes."""
    x, offsets, weights, biases = _inputs(2, 256, 13, 17, 64, (3, 5, 7, 9), offset_scale=2.0, device="cuda")
    # The reference sees the same (rounded) values as the kernel: rounding offsets to bf16
    # moves the samples, which alone changes the offset gradient by ~10%.
    leaves = [t.detach().to(dtype).float().requires_grad_() for t in [x, *offsets, *weights, *biases]]
    x, offsets, weights, biases = leaves[0], leaves[1:5], leaves[5:9], leaves[9:]
    ref = multi_branch_deform_conv_reference(x, offsets, weights, biases)
    cast = [t.detach().to(dtype).requires_grad_() for t in [x, *offsets, *weights, *biases]]
    out = multi_branch_deform_conv(cast[0], cast[1:5], cast[5:9], cast[9:], backend="fused")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= tol * scale
    grad = torch.randn_like(ref)
    leaves = [x, *offsets, *weights]
    expected = torch.autograd.grad(ref, leaves, grad)
    got = torch.autograd.grad(out.float(), cast[:9], grad)
    for e, g in zip(expected, got):
        if dtype == torch.float32:
            assert (g.float() - e).abs().max() <= 2 * tol * e.abs().max()
        else:  # bf16 rounding leaves rare outliers: judge by the relative L2 error
            assert (g.float() - e).norm() <= 2 * tol * e.norm()


def _packed_loss_cuda():
    x, offsets, weights, biases = _inputs(1, 64, 16, 16, 16, (3, 5, 7, 9), offset_scale=1.0, device="cuda")
    off, w, b = torch.cat(offsets, 1).detach(), ops.pack_weights(weights).detach(), torch.cat(biases).detach()
    xs = x.detach().clone().requires_grad_()
    f = lambda t: ops.fused_deform_conv_packed(t, off, w, b, (3, 5, 7, 9)).square().sum()  # noqa: E731
    return f, xs, torch.autograd.grad(f(xs), [xs])[0]


@pytest.mark.cuda
def test_cuda_graph_capture():
    f, xs, expected = _packed_loss_cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.autograd.grad(f(xs), [xs])
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = torch.autograd.grad(f(xs), [xs])[0]
    graph.replay()
    torch.testing.assert_close(static, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not settings.test_compile(), reason="set EPBAN_TEST_COMPILE=1 (Inductor compiles for a while)")
def test_cuda_torch_compile_fullgraph():
    f, xs, expected = _packed_loss_cuda()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(xs), [xs])[0], expected, atol=1e-5, rtol=1e-5)


def test_pixel_tile_policy(monkeypatch):
    """32-pixel tiles below 16,384 pixels; above, 64 pixels with 8 warps in float32, and in bf16
    with 4 warps under Triton before 3.7 (later Tritons spill there)."""
    assert ops._pixel_tile(16 * 16 * 16, torch.bfloat16) == (32, 4)
    assert ops._pixel_tile(128 * 128, torch.float32) == (64, 8)
    monkeypatch.setattr(ops, "_TRITON_BEFORE_3_7", True)
    assert ops._pixel_tile(128 * 128, torch.bfloat16) == (64, 4)
    assert ops._pixel_tile(128 * 128, torch.float32) == (64, 8)
    monkeypatch.setattr(ops, "_TRITON_BEFORE_3_7", False)
    assert ops._pixel_tile(128 * 128, torch.bfloat16) == (64, 8)
