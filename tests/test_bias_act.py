"""The fused convolution epilogue (epban.ops.bias_act) against its reference, forward and gradients.

Without a GPU the Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
"""
import pytest
import torch

from epban.ops import bias_act as ops
from epban.ops._checks import triton_unavailable_reason
from epban.ops.bias_act import bias_act, bias_act_reference, fused_bias_act_serves
from test_ssim import poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fused = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_unavailable_reason("bias_act", "cpu", torch.float32) is None),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 before triton is imported",
)
SHAPES = [(1, 3, 5, 7), (2, 13, 9, 11), (3, 64, 17, 6)]


def _inputs(shape, layout, dtype, residual, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g)
    b = torch.randn(shape[1], generator=g)
    r = torch.randn(shape, generator=g) if residual else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = y.to(DEVICE, dtype).to(memory_format=fmt).requires_grad_()
    b = b.to(DEVICE, dtype).requires_grad_()
    if r is not None:
        r = r.to(DEVICE, dtype).to(memory_format=fmt).requires_grad_()
    return y, b, r


@pytest.fixture
def launches(monkeypatch):
    """Counts the fused path's kernel launches (so that a test cannot pass on the reference)."""
    calls = []
    launch = ops._launch
    monkeypatch.setattr(ops, "_launch", lambda *a: calls.append(1) or launch(*a))
    return calls


@needs_fused
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_fused_matches_reference(shape, layout, residual, relu, launches):
    y, b, r = _inputs(shape, layout, torch.float32, residual, seed=sum(shape))
    leaves = [t for t in (y, b, r) if t is not None]
    with poisoned_allocations():  # every output element must be written
        out = bias_act(y, b, r, relu=relu, backend="fused")
    assert launches == [1]
    expected = bias_act_reference(y, b, r, relu=relu)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    upstream = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_fused
def test_relu_masks_negatives_and_keeps_nan(launches):
    y = torch.tensor([-2.0, -0.0, 0.5, float("nan")], device=DEVICE).view(1, 4, 1, 1)
    out = bias_act(y, torch.zeros(4, device=DEVICE), backend="fused")
    assert out.flatten()[:3].tolist() == [0.0, 0.0, 0.5] and out.flatten()[3].isnan()


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_round_once(dtype, launches):
    """Half inputs: the sum in float32, rounded once (the reference rounds after each op): on a
    GPU to nearest, as torch; the interpreter's conversion may truncate, so there one ulp."""
    y, b, r = _inputs((2, 8, 7, 5), "channels_last", dtype, True, seed=3)
    out = bias_act(y, b, r, backend="fused")
    exact = torch.relu(y.float() + b.float().view(1, -1, 1, 1) + r.float())
    assert out.dtype == dtype
    if DEVICE == "cuda":
        torch.testing.assert_close(out, exact.to(dtype), atol=0, rtol=0)
    else:
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert ((out.float() - exact).abs() <= ulp * exact.abs()).all()


@needs_fused
def test_opcheck():
    y, b, r = _inputs((2, 5, 4, 3), "channels_last", torch.float32, True, seed=1)
    torch.library.opcheck(torch.ops.epban.bias_act.default, (y, b, r, True))
    torch.library.opcheck(torch.ops.epban.bias_act.default, (y.detach(), b.detach(), None, False))


def test_mixed_layouts_take_the_reference():
    y = torch.randn(1, 4, 5, 6)
    r = torch.randn(1, 4, 5, 6).to(memory_format=torch.channels_last)
    assert not fused_bias_act_serves(y, r, backend="reference")
    assert not fused_bias_act_serves(y, r, backend="auto")  # CPU: auto never takes the interpreter
    out = bias_act(y, torch.zeros(4), r, backend="reference")
    torch.testing.assert_close(out, torch.relu(y + r))


def test_bad_inputs():
    y = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        bias_act(y, torch.zeros(3))
    with pytest.raises(ValueError, match="residual must match"):
        bias_act(y, torch.zeros(4), torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match="4-D"):
        bias_act(y[0], torch.zeros(4))
    with pytest.raises(ValueError, match="backend must be one of"):
        bias_act(y, torch.zeros(4), backend="fast")


def test_fused_on_cpu_without_the_interpreter_is_a_value_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        bias_act(torch.randn(1, 2, 3, 3), torch.zeros(2), backend="fused")
