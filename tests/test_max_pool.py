"""The fused stem tail (epban.ops.max_pool: bias, ReLU, max-pool; and its backward) against
PyTorch's ops, forward and gradients.

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F

from epban.ops import max_pool as ops
from epban.ops.max_pool import (
    bias_relu_max_pool2d,
    bias_relu_max_pool2d_reference,
    fused_stem_pool_serves,
    max_pool2d_relu_grad,
    max_pool2d_relu_grad_reference,
)
from epban.ops.registry import REGISTRY, triton_unavailable_reason
from epban.testing import poisoned_allocations
from helpers import compile_for_sm90, count_calls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fused = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_unavailable_reason("pool", "cpu", torch.float32) is None),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 before triton is imported",
)
# (shape, kernel, stride, padding): the stem's 3/2/1 on odd and even sizes, and other windows
CASES = [
    ((2, 5, 13, 17), 3, 2, 1),
    ((1, 3, 16, 10), 3, 2, 1),
    ((3, 4, 9, 7), 2, 2, 0),
    ((1, 6, 11, 8), 3, 1, 1),
    ((2, 3, 12, 15), 5, 2, 2),
    ((1, 2, 10, 9), 3, 3, 0),
    ((1, 1, 1, 1), 1, 1, 0),
]


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _inputs(shape, layout, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = _layout(torch.randn(shape, generator=g).to(DEVICE, dtype), layout).requires_grad_()
    b = (0.3 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype).requires_grad_()
    return y, b


def _pytorch(y, b, k, s, p):
    return F.max_pool2d(F.relu(y + b.view(1, -1, 1, 1)), k, s, p)


@pytest.fixture
def launches(monkeypatch):
    return count_calls(monkeypatch, ops, "_launch_pool", "_launch_grad")


@needs_fused
@pytest.mark.parametrize("shape, k, s, p", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fused_matches_pytorch(shape, k, s, p, layout, launches):
    y, b = _inputs(shape, layout, seed=sum(shape) + k)
    with poisoned_allocations():  # every output element must be written
        out, argmax = bias_relu_max_pool2d(y, b, k, s, p, backend="fused")
    expected = _pytorch(y, b, k, s, p)
    assert out.shape == expected.shape and argmax.shape == out.shape and argmax.dtype == torch.int8
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    _, ref_argmax = bias_relu_max_pool2d_reference(y, b, k, s, p)
    positive = expected > 0
    assert torch.equal(argmax[positive], ref_argmax[positive])
    upstream = torch.randn_like(expected)
    with poisoned_allocations():
        got = torch.autograd.grad(out, (y, b), upstream)
    want = torch.autograd.grad(expected, (y, b), upstream)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert launches == ["_launch_pool", "_launch_grad"]


@needs_fused
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_grad_with_two_parts_equals_add_then_pytorchs_backward(layout, launches):
    """grad + other, masked where out <= 0 and sent to the maxima: PyTorch's add,
    threshold_backward and max_pool2d_with_indices_backward, in one gather."""
    y, b = _inputs((2, 7, 15, 12), layout, seed=3)
    out, argmax = bias_relu_max_pool2d(y.detach(), b.detach(), 3, 2, 1, backend="fused")
    grad, other = torch.randn_like(out), torch.randn_like(out)
    with poisoned_allocations():
        got = max_pool2d_relu_grad(grad, other, out, argmax, y.shape[2:], 3, 2, 1, backend="fused")
    relu_out = F.relu(y.detach() + b.detach().view(1, -1, 1, 1))
    pooled, indices = F.max_pool2d(relu_out, 3, 2, 1, return_indices=True)
    want = torch.ops.aten.max_pool2d_with_indices_backward(
        torch.ops.aten.threshold_backward(grad + other, pooled, 0), relu_out, [3, 3], [2, 2], [1, 1], [1, 1], False,
        indices)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    reference = max_pool2d_relu_grad_reference(grad, other, out, argmax, y.shape[2:], 3, 2, 1)
    torch.testing.assert_close(reference, want, atol=1e-6, rtol=1e-6)
    assert launches == ["_launch_pool", "_launch_grad"]


@needs_fused
def test_64_bit_offsets_give_the_same_results(monkeypatch, launches):
    """Tensors of 2^31 elements or more take 64-bit offsets (decided from shapes and strides);
    forced here on small ones, the same values."""
    assert ops.needs_int64_offsets(torch.empty(1, 64, 8192, 4096, device="meta"), slack=ops._BLOCK)
    assert not ops.needs_int64_offsets(torch.empty(16, 64, 128, 128, device="meta"), slack=ops._BLOCK)
    y, b = _inputs((2, 5, 13, 11), "channels_last", seed=6)
    results = []
    for wide in (False, True):
        monkeypatch.setattr(ops, "needs_int64_offsets", lambda *t, _w=wide, **kw: _w)
        out, argmax = bias_relu_max_pool2d(y.detach(), b.detach(), 3, 2, 1, backend="fused")
        grad = max_pool2d_relu_grad(out, out, out, argmax, (13, 11), 3, 2, 1, backend="fused")
        results.append((out, argmax, grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)


@needs_fused
def test_ties_take_the_first_maximum_and_nan_wins(launches):
    """Integer-valued inputs tie often: the first maximum in row-major window order, as
    PyTorch's; a NaN anywhere in a window is that window's output."""
    g = torch.Generator().manual_seed(5)
    y = torch.randint(-2, 3, (2, 3, 11, 9), generator=g).float().to(DEVICE)
    b = torch.zeros(3, device=DEVICE)
    out, argmax = bias_relu_max_pool2d(y, b, 3, 2, 1, backend="fused")
    expected, ref_argmax = bias_relu_max_pool2d_reference(y, b, 3, 2, 1)
    assert torch.equal(out, expected)
    positive = expected > 0
    assert positive.sum() > 20 and torch.equal(argmax[positive], ref_argmax[positive])
    y[0, 0, 5, 5] = float("nan")
    out, _ = bias_relu_max_pool2d(y, b, 3, 2, 1, backend="fused")
    nan = out.isnan()
    assert torch.equal(nan, _pytorch(y, b, 3, 2, 1).isnan()) and nan.sum() == 4  # the four windows holding (5, 5)


def _value_at_argmax(y, b, argmax, k, s, p):
    """relu(y + b) (in float32) at each window's argmax position."""
    v = F.pad(F.relu(y.float() + b.float().view(1, -1, 1, 1)), (p, p, p, p))
    oh = torch.arange(argmax.shape[2]).view(1, 1, -1, 1)
    ow = torch.arange(argmax.shape[3]).view(1, 1, 1, -1)
    code = argmax.long().cpu()
    flat = (oh * s + code // k) * v.shape[3] + ow * s + code % k
    return v.cpu().flatten(2).gather(2, flat.flatten(2)).view(argmax.shape)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_round_as_the_separate_epilogue(dtype, launches):
    """y + bias is rounded to y's dtype before the comparison, as bias_act rounds its output: on a
    GPU (round to nearest, as torch) the same values and maxima as bias_act then max_pool2d; the
    interpreter's conversion may truncate, so there one ulp a rounding, and the argmax must hold a
    maximum."""
    y, b = _inputs((2, 6, 17, 14), "channels_last", dtype, seed=9)
    y, b = y.detach(), b.detach()
    out, argmax = bias_relu_max_pool2d(y, b, 3, 2, 1, backend="fused")
    expected, ref_argmax = bias_relu_max_pool2d_reference(y, b, 3, 2, 1)
    positive = expected > 0
    grad, other = torch.randn_like(out), torch.randn_like(out)
    got = max_pool2d_relu_grad(grad, other, out, argmax, y.shape[2:], 3, 2, 1, backend="fused")
    want = max_pool2d_relu_grad_reference(grad, other, out, argmax, y.shape[2:], 3, 2, 1)
    if DEVICE == "cuda":
        assert torch.equal(out, expected) and torch.equal(argmax[positive], ref_argmax[positive])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert ((out.float() - expected.float()).abs() <= ulp * expected.float().abs()).all()
        at_argmax = _value_at_argmax(y, b, argmax, 3, 2, 1)
        assert ((at_argmax - out.float().cpu()).abs()[positive.cpu()] <= ulp * at_argmax[positive.cpu()]).all()
        # two roundings (each window's sum, then the total), each up to one ulp of its operands
        # when truncated: bounded by the total of the parts' magnitudes
        magnitude = max_pool2d_relu_grad_reference(grad.abs() + other.abs(), None, out, argmax, y.shape[2:], 3, 2, 1)
        assert ((got.float() - want.float()).abs() <= 2 * ulp * magnitude.float()).all()


@needs_fused
def test_strided_input_is_read_through_its_strides(launches):
    y, b = _inputs((2, 4, 20, 18), "contiguous", seed=1)
    view = y.detach()[:, :, 1::2, ::2]  # not dense in any layout
    out, _ = bias_relu_max_pool2d(view, b.detach(), 3, 2, 1, backend="fused")
    torch.testing.assert_close(out, _pytorch(view, b.detach(), 3, 2, 1), atol=0, rtol=0)


@needs_fused
def test_opcheck():
    y, b = _inputs((2, 3, 9, 11), "channels_last", seed=2)
    torch.library.opcheck(torch.ops.epban.bias_relu_max_pool2d.default, (y, b, 3, 2, 1))
    out, argmax = ops._bias_relu_max_pool_op(y.detach(), b.detach(), 3, 2, 1)
    torch.library.opcheck(torch.ops.epban.max_pool2d_relu_grad.default, (torch.randn_like(out), None, out, argmax, 9, 11, 3, 2, 1))


@needs_fused
def test_no_grad_and_inference_mode_give_the_same_values(launches):
    y, b = _inputs((2, 4, 9, 11), "channels_last", seed=7)
    expected = bias_relu_max_pool2d(y, b, 3, 2, 1, backend="fused")[0].detach()
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            out = bias_relu_max_pool2d(y, b, 3, 2, 1, backend="fused")[0]
        assert out.grad_fn is None and torch.equal(out, expected)


def test_which_path_serves(monkeypatch):
    y = torch.randn(1, 2, 4, 4)
    assert not fused_stem_pool_serves(y, backend="reference")
    assert not fused_stem_pool_serves(y, backend="auto")  # CPU: auto never takes the interpreter
    assert REGISTRY["stem_pool"].auto_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        bias_relu_max_pool2d(y, torch.zeros(2), 3, 2, 1, backend="fused")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_reference_matches_pytorch(backend):
    y, b = _inputs((2, 5, 13, 17), "channels_last", seed=4)
    y, b = y.cpu(), b.cpu()
    out, argmax = bias_relu_max_pool2d(y, b, 3, 2, 1, backend=backend)
    expected = _pytorch(y, b, 3, 2, 1)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    upstream = torch.randn_like(out)
    grad = max_pool2d_relu_grad(upstream, None, out.detach(), argmax, (13, 17), 3, 2, 1, backend=backend)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, y, upstream)[0], atol=1e-6, rtol=1e-6)


def test_bad_inputs_are_value_errors():
    y, b = torch.randn(1, 3, 8, 8), torch.randn(3)
    with pytest.raises(ValueError, match="4-D"):
        bias_relu_max_pool2d(y[0], b, 3, 2, 1)
    with pytest.raises(ValueError, match="bias"):
        bias_relu_max_pool2d(y, torch.randn(4), 3, 2, 1)
    with pytest.raises(ValueError, match="padding"):
        bias_relu_max_pool2d(y, b, 3, 2, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        bias_relu_max_pool2d(y, b, 13, 2, 1)
    with pytest.raises(ValueError, match="square"):
        bias_relu_max_pool2d(y, b, (3, 2), 2, 1)
    with pytest.raises(ValueError, match="smaller"):
        bias_relu_max_pool2d(torch.randn(1, 3, 2, 8), b, 5, 1, 1)
    out, argmax = bias_relu_max_pool2d(y, b, 3, 2, 1)
    with pytest.raises(ValueError, match="int8"):
        max_pool2d_relu_grad(out, None, out, argmax.long(), (8, 8), 3, 2, 1)
    with pytest.raises(ValueError, match="does not pool"):
        max_pool2d_relu_grad(out, None, out, argmax, (9, 12), 3, 2, 1)
    with pytest.raises(ValueError, match="must match out"):
        max_pool2d_relu_grad(out, out.double(), out, argmax, (8, 8), 3, 2, 1)


_COMPILE_SCRIPT = r"""
from epban.testing import kernel_resources as kr
from epban.kernels import max_pool as K

for dtype, index_64 in (("bf16", False), ("fp32", False), ("bf16", True)):  # int64: tensors of 2^31+
    for cl in (True, False):
        for fn in (K.bias_relu_max_pool_kernel, K.max_pool_relu_grad_kernel):
            cx = dict(CHANNELS_LAST=cl, HAS_OTHER=True, K=3, S=2, P=1, INDEX_64=index_64, BLOCK=512)
            pointers = {n: "*" + dtype for n in ("y_ptr", "out_ptr", "grad_ptr", "other_ptr", "res_ptr")}
            pointers["argmax_ptr"] = "*i8"
            r = kr.resources(fn, kr.signature(fn, cx, pointers), cx, num_warps=4)
            assert r["spill"] == 0 and r["blocks_by_regs"] >= (2 if index_64 else 4), (fn.__name__, dtype, index_64, cl, r)
            print(fn.__name__, dtype, index_64, cl, r["regs"], "compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    """Both kernels through Triton's whole NVIDIA pipeline (ptxas included) for sm_90, as the
    ops launch them: no spills with 32- and 64-bit offsets; at least 4 programs per SM by registers
    with 32-bit ones (2 with 64-bit ones, which only tensors of 2^31 elements or more take)."""
    compile_for_sm90(_COMPILE_SCRIPT, tmp_path, 12)
