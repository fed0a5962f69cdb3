"""The fused convolution epilogue (epban.ops.bias_act) against its reference, forward and gradients.

Without a GPU the Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
"""
import pytest
import torch

from epban.ops import bias_act as ops
from epban.ops.bias_act import bias_act, bias_act_reference, fused_bias_act_serves, relu_grad_sum
from epban.ops.max_pool import bias_relu_max_pool2d
from epban.ops.normalise import normalise
from epban.ops.registry import REGISTRY, triton_unavailable_reason
from epban.testing import poisoned_allocations
from helpers import count_calls

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
    return count_calls(monkeypatch, ops, "_launch")


@pytest.fixture
def sum_launches(monkeypatch):
    return count_calls(monkeypatch, ops, "_launch_relu_grad_sum")


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
    assert launches == ["_launch"]
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


@needs_fused
def test_no_grad_and_inference_mode_give_the_same_values(launches):
    """Scoring without gradients (the metric's evaluation): the same values, no graph."""
    y, b, r = _inputs((2, 5, 6, 7), "contiguous", torch.float32, True, seed=7)
    expected = bias_act(y, b, r, backend="fused").detach()
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            out = bias_act(y, b, r, backend="fused")
        assert out.grad_fn is None and torch.equal(out, expected)


@needs_fused
def test_torch_compile_traces_the_custom_ops():
    """Under torch.compile each loss-mode op is one node of the captured graph, with no graph
    break (Dynamo does not trace into the launchers)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    mean = torch.tensor([0.4, 0.5, 0.6], device=DEVICE)
    std = torch.tensor([0.2, 0.25, 0.3], device=DEVICE)
    bias = torch.zeros(3, device=DEVICE)

    def f(x):
        y = normalise(x, mean, std, dtype=torch.float32, channels_last=True, backend="fused")
        return bias_relu_max_pool2d(bias_act(y, bias, backend="fused"), bias, 3, 2, 1, backend="fused")[0]

    x = torch.randn(1, 3, 9, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out = torch.compile(f, backend=backend, fullgraph=True)(x)
    assert torch.equal(out, f(x))
    assert len(graphs) == 1
    for name in ("epban.normalise", "epban.bias_act", "epban.bias_relu_max_pool2d"):
        assert name in graphs[0], graphs[0]


def test_registered():
    entry = REGISTRY["bias_act"]
    assert "Triton" in entry.kernels
    assert entry.auto_backend(torch.device("cpu")) == "reference"  # the interpreter is for tests, not speed


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


# ----------------------------------------------------------------------------- relu_grad_sum


def _three(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [torch.randn(shape, generator=g).to(DEVICE, dtype).to(memory_format=fmt) for _ in range(3)]


@needs_fused
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_relu_grad_sum_matches_threshold_backward(shape, layout, sum_launches):
    grad, other, out = _three(shape, layout, torch.float32, seed=sum(shape))
    out[..., ::3] = 0.0  # exactly at the threshold: masked, as threshold_backward does
    with poisoned_allocations():  # every element must be written
        res = ops.relu_grad_sum(grad, other, out, backend="fused")
    assert sum_launches == ["_launch_relu_grad_sum"]
    expected = torch.ops.aten.threshold_backward(grad + other, out, 0)
    assert res.stride() == expected.stride()
    torch.testing.assert_close(res, expected, atol=0, rtol=0)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu_grad_sum_half_types(dtype, sum_launches):
    """The sum rounded once to the dtype, as the add rounds it (on a GPU to nearest: equal; the
    interpreter's conversion may truncate, so there one ulp)."""
    grad, other, out = _three((2, 8, 7, 5), "channels_last", dtype, seed=4)
    res = ops.relu_grad_sum(grad, other, out, backend="fused")
    expected = torch.ops.aten.threshold_backward(grad + other, out, 0)
    assert res.dtype == dtype and sum_launches == ["_launch_relu_grad_sum"]
    if DEVICE == "cuda":
        torch.testing.assert_close(res, expected, atol=0, rtol=0)
    else:
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert ((res.float() - expected.float()).abs() <= ulp * expected.float().abs()).all()


@needs_fused
def test_relu_grad_sum_passes_the_gradient_where_out_is_nan(sum_launches):
    out = torch.tensor([-1.0, 0.0, 2.0, float("nan")], device=DEVICE).view(1, 4, 1, 1)
    grad = torch.ones_like(out)
    res = ops.relu_grad_sum(grad, grad, out, backend="fused")
    assert res.flatten().tolist() == torch.ops.aten.threshold_backward(grad + grad, out, 0).flatten().tolist()
    assert res.flatten().tolist() == [0.0, 0.0, 2.0, 2.0]


@needs_fused
def test_relu_grad_sum_refuses_a_backward_through_it():
    """relu_grad_sum is a backward helper with no autograd formula: a backward through it raises
    instead of giving a silent zero."""
    grad, other, out = _three((1, 2, 3, 4), "contiguous", torch.float32, seed=1)
    grad.requires_grad_()
    res = relu_grad_sum(grad, other, out, backend="fused")
    with pytest.raises(RuntimeError, match="autograd"):
        res.sum().backward()
    with torch.no_grad():
        assert torch.equal(relu_grad_sum(grad, other, out, backend="fused"),
                           torch.ops.aten.threshold_backward(grad + other, out, 0))


@needs_fused
def test_relu_grad_sum_opcheck():
    grad, other, out = _three((2, 5, 4, 3), "channels_last", torch.float32, seed=2)
    torch.library.opcheck(torch.ops.epban.relu_grad_sum.default, (grad, other, out))


def test_relu_grad_sum_mixed_layouts_and_bad_inputs(sum_launches):
    grad, other, out = _three((1, 4, 5, 6), "contiguous", torch.float32, seed=5)
    mixed = out.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.relu_grad_sum(grad, other, mixed, backend="reference"),
                               torch.ops.aten.threshold_backward(grad + other, out, 0))
    if not (torch.cuda.is_available() or triton_unavailable_reason("bias_act", "cpu", torch.float32)):
        ops.relu_grad_sum(grad, other, mixed, backend="fused")  # the layouts differ: the reference serves
        assert sum_launches == []
    with pytest.raises(ValueError, match="other must match"):
        ops.relu_grad_sum(grad, other[:, :3], out)
    with pytest.raises(ValueError, match="out must match"):
        ops.relu_grad_sum(grad, other, out.double())
    with pytest.raises(ValueError, match="4-D"):
        ops.relu_grad_sum(grad[0], other[0], out[0])
