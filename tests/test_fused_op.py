"""The fused ops' two doors (epban.ops._fused_op): eager calls take an autograd.Function, traced
or watched calls the custom op. Both must give the same values and gradients, and each call
must take the door it should. Under TRITON_INTERPRET=1 on the CPU (small shapes) or on CUDA."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from epban.ops import _fused_op
from epban.ops._checks import triton_unavailable_reason
from epban.ops.bias_act import bias_act, relu_grad_sum
from epban.ops.deform_conv import multi_branch_deform_conv
from epban.ops.max_pool import bias_relu_max_pool2d
from epban.ops.normalise import normalise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_unavailable_reason("ops", "cpu", torch.float32) is None),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 before triton is imported",
)


def _randn(*shape, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(DEVICE)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _normalise_case(seed):
    x = _randn(2, 3, 7, 9, seed=seed).requires_grad_()
    mean, std = torch.tensor([0.4, 0.5, 0.6], device=DEVICE), torch.tensor([0.2, 0.25, 0.3], device=DEVICE)
    return (x,), lambda x: normalise(x, mean, std, dtype=torch.float32, channels_last=True, backend="fused")


def _pool_case(seed):
    y = _randn(2, 4, 9, 11, seed=seed, channels_last=True).requires_grad_()
    b = _randn(4, seed=seed + 1).requires_grad_()
    return (y, b), lambda y, b: bias_relu_max_pool2d(y, b, 3, 2, 1, backend="fused")[0]


def _bias_act_case(seed):
    y = _randn(2, 5, 6, 7, seed=seed).requires_grad_()
    b = _randn(5, seed=seed + 1).requires_grad_()
    r = _randn(2, 5, 6, 7, seed=seed + 2).requires_grad_()
    return (y, b, r), lambda y, b, r: bias_act(y, b, r, backend="fused")


def _deform_case(seed):
    x = _randn(1, 3, 5, 6, seed=seed).requires_grad_()
    offsets = [(0.7 * _randn(1, 2 * k * k, 5, 6, seed=seed + k)).requires_grad_() for k in (1, 3)]
    weights = [(0.3 * _randn(2, 3, k, k, seed=seed + 10 + k)).requires_grad_() for k in (1, 3)]
    biases = [_randn(2, seed=seed + 20 + k).requires_grad_() for k in (1, 3)]
    return (x, *offsets, *weights, *biases), lambda x, o1, o3, w1, w3, b1, b3: multi_branch_deform_conv(
        x, [o1, o3], [w1, w3], [b1, b3], backend="fused")


CASES = {"normalise": _normalise_case, "bias_relu_max_pool2d": _pool_case, "bias_act": _bias_act_case,
         "multi_branch_deform_conv": _deform_case}


def _run(case, seed):
    inputs, fn = CASES[case](seed)
    out = fn(*inputs)
    upstream = _randn(*out.shape, seed=seed + 99)
    grads = torch.autograd.grad(out, inputs, upstream)
    return out, grads, type(out.grad_fn).__name__


@pytest.mark.parametrize("case", list(CASES))
def test_eager_and_dispatcher_paths_agree(monkeypatch, case):
    """Same forward and gradients bit for bit; the eager call's graph node is the
    autograd.Function, the forced dispatcher call's the custom op's."""
    seed = int(torch.randint(0, 2**20, ()).item())
    eager_out, eager_grads, eager_node = _run(case, seed)
    monkeypatch.setenv(_fused_op.EAGER_DOOR_VARIABLE, "0")  # every call through the custom op
    op_out, op_grads, op_node = _run(case, seed)
    assert eager_node.startswith("Eager_epban_"), eager_node
    assert op_node.startswith("GeneratedBackwardFor_epban_"), op_node
    assert torch.equal(eager_out, op_out)
    for a, b in zip(eager_grads, op_grads):
        assert torch.equal(a, b)


def test_fake_tensors_take_the_custom_op():
    """Under FakeTensorMode (shape inference, memory estimates) the eager door would launch the
    kernel on tensors without data: the custom op's fake kernel answers instead."""
    mean, std = torch.tensor([0.4, 0.5, 0.6], device=DEVICE), torch.tensor([0.2, 0.25, 0.3], device=DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.empty(2, 3, 7, 9, device=DEVICE))
        assert _fused_op.needs_dispatcher((x,))
        out = normalise(x, mean, std, dtype=torch.bfloat16, channels_last=True, backend="fused")
        assert out.shape == (2, 3, 7, 9) and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert _fused_op.needs_dispatcher((x,))  # a fake tensor outside its mode: by its type


def test_plain_calls_take_the_eager_door(monkeypatch):
    x = torch.empty(1, device=DEVICE)
    assert not _fused_op.needs_dispatcher((x, torch.nn.Parameter(x), 3, None, torch.float32))
    monkeypatch.setenv(_fused_op.EAGER_DOOR_VARIABLE, "0")  # the switch: every call through the custom op
    assert _fused_op.needs_dispatcher((x,))
    monkeypatch.delenv(_fused_op.EAGER_DOOR_VARIABLE)
    seen = []
    torch.vmap(lambda t: seen.append(_fused_op.needs_dispatcher((t,))) or t)(torch.ones(2, 3))
    assert seen == [True]  # functorch's batched tensors must see the custom op's rules


def test_an_op_without_autograd_still_refuses_a_backward_through_it():
    """relu_grad_sum is a backward helper with no autograd formula: called on a tensor that
    requires grad, it goes through the custom op, whose backward raises instead of a silent zero."""
    grad = _randn(1, 2, 3, 4, seed=1).requires_grad_()
    other, out = _randn(1, 2, 3, 4, seed=2), _randn(1, 2, 3, 4, seed=3)
    res = relu_grad_sum(grad, other, out, backend="fused")
    with pytest.raises(RuntimeError, match="autograd"):
        res.sum().backward()
    with torch.no_grad():
        assert torch.equal(relu_grad_sum(grad, other, out, backend="fused"),
                           torch.ops.aten.threshold_backward(grad + other, out, 0))


def test_torch_compile_traces_the_custom_ops():
    """Under torch.compile the door is the custom op, with no graph break: each op is one node
    of the captured graph (the eager door would be traced into its Python and Triton launch)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    mean, std = torch.tensor([0.4, 0.5, 0.6], device=DEVICE), torch.tensor([0.2, 0.25, 0.3], device=DEVICE)
    bias = torch.zeros(3, device=DEVICE)

    def f(x):
        y = normalise(x, mean, std, dtype=torch.float32, channels_last=True, backend="fused")
        return bias_relu_max_pool2d(bias_act(y, bias, backend="fused"), bias, 3, 2, 1, backend="fused")[0]

    x = _randn(1, 3, 9, 8, seed=4)
    out = torch.compile(f, backend=backend, fullgraph=True)(x)
    assert torch.equal(out, f(x))
    assert len(graphs) == 1
    for name in ("epban.normalise", "epban.bias_act", "epban.bias_relu_max_pool2d"):
        assert name in graphs[0], graphs[0]


@pytest.mark.parametrize("case", list(CASES))
def test_inference_mode_and_no_grad_give_the_same_values(case):
    """Scoring without gradients (the metric's evaluation): the same values, no graph."""
    inputs, fn = CASES[case](7)
    expected = fn(*inputs).detach()
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            out = fn(*inputs)
        assert out.grad_fn is None and torch.equal(out, expected)
