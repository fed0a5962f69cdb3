"""The fused input normalisation (epban.ops.normalise) against PyTorch's ops, forward and gradients.

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from epban.ops import normalise as ops
from epban.ops.normalise import fused_normalise_serves, normalise, normalise_reference
from epban.ops.registry import REGISTRY, triton_unavailable_reason
from epban.testing import poisoned_allocations
from helpers import compile_for_sm90, count_calls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fused = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_unavailable_reason("normalise", "cpu", torch.float32) is None),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 before triton is imported",
)
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _pytorch(x, dtype, channels_last):
    """The loss mode's former preparation of an image: float, normalise, cast and layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ((x.float() - MEAN.to(x.device).view(1, 3, 1, 1)) / STD.to(x.device).view(1, 3, 1, 1)).to(
        dtype, memory_format=fmt)


@pytest.fixture
def launches(monkeypatch):
    return count_calls(monkeypatch, ops, "_launch_normalise", "_launch_grad")


@needs_fused
@pytest.mark.parametrize("shape", [(2, 3, 13, 17), (1, 3, 1, 1), (3, 3, 8, 5)])
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_matches_pytorch(shape, in_dtype, out_dtype, channels_last, launches):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g).to(DEVICE, in_dtype).requires_grad_()
    with poisoned_allocations():  # every output element must be written
        out = normalise(x, MEAN.to(DEVICE), STD.to(DEVICE), dtype=out_dtype, channels_last=channels_last,
                        backend="fused")
    expected = _pytorch(x, out_dtype, channels_last)
    assert out.dtype == out_dtype and out.stride() == expected.stride()
    upstream = torch.randn(shape, generator=g).to(DEVICE, out_dtype)
    with poisoned_allocations():
        (got,) = torch.autograd.grad(out, x, upstream)
    (want,) = torch.autograd.grad(expected, x, upstream)
    assert got.dtype == x.dtype and got.shape == x.shape
    if DEVICE == "cuda" or out_dtype == torch.float32 and in_dtype == torch.float32:
        # float32 subtraction and IEEE division, each rounded as PyTorch rounds them
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:  # the interpreter's conversion to half types may truncate: one ulp
        ulp = 2.0 ** (-7 if torch.bfloat16 in (in_dtype, out_dtype) else -10)
        assert ((out.float() - expected.float()).abs() <= ulp * expected.float().abs()).all()
        assert ((got.float() - want.float()).abs() <= ulp * want.float().abs()).all()
    assert launches == ["_launch_normalise", "_launch_grad"]


@needs_fused
def test_gradient_is_read_through_its_strides(launches):
    """The loss mode's upstream gradient is a channel slice of an 8-channel channels_last tensor
    (the stem's padded input gradient): read as it is, written in x's layout."""
    x = torch.rand(2, 3, 9, 14, device=DEVICE).requires_grad_()
    out = normalise(x, MEAN.to(DEVICE), STD.to(DEVICE), dtype=torch.float32, channels_last=True, backend="fused")
    padded = torch.randn(2, 8, 9, 14, device=DEVICE).contiguous(memory_format=torch.channels_last)
    upstream = padded[:, :3]
    assert not upstream.is_contiguous() and not upstream.is_contiguous(memory_format=torch.channels_last)
    (got,) = torch.autograd.grad(out, x, upstream)
    assert got.is_contiguous()
    torch.testing.assert_close(got, upstream / STD.to(DEVICE).view(1, 3, 1, 1), atol=0, rtol=0)


@needs_fused
def test_second_derivative_through_the_backward(launches):
    """The backward (grad / std) is itself differentiable: a gradient of a gradient equals PyTorch's."""
    x = torch.rand(2, 3, 6, 7, device=DEVICE).requires_grad_()
    weights = torch.randn(2, 3, 6, 7, device=DEVICE, dtype=x.dtype)
    results = []
    for backend in ("fused", "reference"):
        out = normalise(x, MEAN.to(DEVICE), STD.to(DEVICE), dtype=torch.float32, channels_last=True, backend=backend)
        (g,) = torch.autograd.grad((out * out * weights.float()).sum(), x, create_graph=True)
        results.append(torch.autograd.grad((g * g).sum(), x))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert launches.count("_launch_grad") >= 2  # the backward, and the backward's own backward


@pytest.mark.skipif(DEVICE == "cuda", reason="float64: the interpreter's kernels only")
@needs_fused
def test_gradcheck_in_float64(launches):
    x = torch.rand(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mean, std = MEAN.double(), STD.double()
    f = lambda t: normalise(t, mean, std, dtype=torch.float64, channels_last=True, backend="fused")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    assert "_launch_grad" in launches


@needs_fused
def test_opcheck():
    x = torch.rand(2, 3, 5, 7, device=DEVICE).requires_grad_()
    mean, std = MEAN.to(DEVICE), STD.to(DEVICE)
    torch.library.opcheck(torch.ops.epban.normalise.default, (x, mean, std, torch.bfloat16, True))
    torch.library.opcheck(torch.ops.epban.normalise_backward.default, (torch.randn(2, 3, 5, 7, device=DEVICE), std, torch.float32,
                                                       False))


@needs_fused
def test_fake_tensors_take_the_fake_kernel():
    """Under FakeTensorMode (shape inference, memory estimates) the custom op's fake kernel
    answers, with the real op's shape, dtype and layout, and no kernel runs."""
    mean, std = MEAN.to(DEVICE), STD.to(DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.empty(2, 3, 7, 9, device=DEVICE))
        out = normalise(x, mean, std, dtype=torch.bfloat16, channels_last=True, backend="fused")
        assert out.shape == (2, 3, 7, 9) and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_fused
def test_no_grad_and_inference_mode_give_the_same_values(launches):
    x = torch.rand(2, 3, 7, 9, device=DEVICE).requires_grad_()
    f = lambda: normalise(x, MEAN.to(DEVICE), STD.to(DEVICE), dtype=torch.float32, channels_last=True,  # noqa: E731
                          backend="fused")
    expected = f().detach()
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            out = f()
        assert out.grad_fn is None and torch.equal(out, expected)


def test_which_path_serves():
    x = torch.rand(1, 3, 2, 2)
    assert not fused_normalise_serves(x, backend="reference")
    assert not fused_normalise_serves(x, torch.bfloat16, backend="auto")  # CPU: auto never takes the interpreter
    with pytest.raises(ValueError, match="output"):  # no kernel writes int64
        fused_normalise_serves(x, torch.int64, backend="fused")
    assert REGISTRY["normalise"].auto_backend(torch.device("cpu")) == "reference"


def test_reference_and_auto_on_cpu():
    x = torch.rand(2, 3, 6, 5)
    for backend in ("reference", "auto"):
        out = normalise(x, MEAN, STD.view(1, 3, 1, 1), dtype=torch.bfloat16, channels_last=True, backend=backend)
        torch.testing.assert_close(out, _pytorch(x, torch.bfloat16, True), atol=0, rtol=0)
    torch.testing.assert_close(normalise_reference(x, MEAN, STD), _pytorch(x, torch.float32, False), atol=0, rtol=0)


def test_bad_inputs_are_value_errors():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="4-D"):
        normalise(x[0], MEAN, STD)
    with pytest.raises(ValueError, match="mean"):
        normalise(x, torch.zeros(4), STD)
    with pytest.raises(ValueError, match="std"):
        normalise(x, MEAN, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        normalise(x, MEAN, STD, backend="nope")


_COMPILE_SCRIPT = r"""
from epban.testing import kernel_resources as kr
from epban.kernels import normalise as K

for src, dst, index_64 in (("fp32", "bf16", False), ("bf16", "fp32", False), ("fp32", "fp32", False),
                           ("fp32", "bf16", True)):  # int64 offsets: tensors of 2^31 elements or more
    for cl in (True, False):
        for has_mean in (True, False):  # the forward, the backward
            fn = K.normalise_kernel
            cx = dict(HAS_MEAN=has_mean, CHANNELS_LAST=cl, INDEX_64=index_64, BLOCK=1024)
            pointers = {"src_ptr": "*" + src, "dst_ptr": "*" + dst}
            r = kr.resources(fn, kr.signature(fn, cx, pointers), cx, num_warps=4)
            assert r["spill"] == 0 and r["blocks_by_regs"] >= (2 if index_64 else 4), (has_mean, src, dst, index_64, cl, r)
            print(has_mean, src, dst, index_64, cl, r["regs"], "compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    """Both kernels through Triton's whole NVIDIA pipeline (ptxas included) for sm_90: no
    spills with 32- and 64-bit offsets; at least 4 programs per SM by registers with 32-bit ones
    (2 with 64-bit ones, which only tensors of 2^31 elements or more take)."""
    compile_for_sm90(_COMPILE_SCRIPT, tmp_path, 16)
