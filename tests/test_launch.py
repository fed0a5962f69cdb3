"""epban.kernels.launch: the fast path must hand every launch the compiled kernel, grid and
arguments that Triton's own path would. Checked on the CPU with Triton's real compile and host
path (kernels compiled for sm_90, launches recorded by a stand-in driver instead of run:
epban.testing.compiled_kernels_without_gpu).

The suite runs the CPU kernels under TRITON_INTERPRET=1, and a process that imported Triton
that way cannot compile: the first test reruns this file in a process without the interpreter
(about a minute the first time, while Triton compiles the kernels; its cache keeps them).
On a GPU the CUDA tests run with EPBAN_TRITON_FAST_LAUNCH=verify instead (scripts/gpu_check.sh)."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from epban.kernels.launch import FAST_LAUNCH_VARIABLE as VARIABLE  # noqa: E402
from epban.testing import compiled_kernels_without_gpu  # noqa: E402
INNER = os.environ.get("EPBAN_LAUNCH_TESTS") == "inner"
inner = pytest.mark.skipif(not INNER or torch.cuda.is_available(),
                           reason="runs in its own process without the interpreter (the first test)")


@pytest.mark.skipif(INNER or torch.cuda.is_available(), reason="this is that process, or a GPU machine")
def test_in_a_process_without_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "0", "EPBAN_LAUNCH_TESTS": "inner"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 14, result.stdout[-3000:]  # every test below ran there


@pytest.fixture(scope="module")
def launches():
    """The recorded launches (function, grid, args), inside compiled kernels for the module."""
    calls = []
    with compiled_kernels_without_gpu(lambda function, grid, args: calls.append((function, grid, args))):
        yield calls


def _described(calls, inputs=()):
    """Launches with tensors described by dtype, shape and strides (new outputs each call), and
    inputs by identity."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            hit = [i for i, t in enumerate(inputs) if a is t]
            return ("input", hit[0]) if hit else ("tensor", a.dtype, tuple(a.shape), a.stride())
        return a
    return [(function, grid, tuple(arg(a) for a in args)) for function, grid, args in calls]


def _axial_step(shape, dtype=torch.float32, channels_last=False):
    from epban.ops.axial_attention import _AxialFunction

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ts = [torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_() for _ in range(6)]
    grads = [torch.ones_like(t) for t in ts[:2]]

    def step():
        return torch.autograd.grad(_AxialFunction.apply("sample", "ieee", *ts), ts, grads)
    return step, ts + grads


def _elementwise_step():
    from epban.ops import bias_act as bias_act_ops
    from epban.ops import max_pool as max_pool_ops
    from epban.ops import normalise as normalise_ops

    y = torch.randn(2, 5, 9, 11)
    bias, std = torch.randn(5), torch.rand(5) + 0.5
    ins = (y, bias, std)

    def step():
        out = bias_act_ops._launch(y, bias, None, True)
        bias_act_ops._launch_relu_grad_sum(y, out, out)
        normalise_ops._launch(y, bias, std, torch.empty_like(y))
        pooled, argmax = max_pool_ops._launch_pool(y, bias, 3, 2, 1)
        max_pool_ops._launch_grad(pooled, None, pooled, argmax, 9, 11, 3, 2, 1)
    return step, ins


def _deform_step():
    from epban.ops.deform_conv import fused_deform_conv_packed, pack_weights

    sizes = [1, 3]
    x = torch.randn(1, 8, 6, 7, requires_grad=True)
    offsets = (0.5 * torch.randn(1, 2 * sum(k * k for k in sizes), 6, 7)).requires_grad_()
    weight = pack_weights([torch.randn(4, 8, k, k) / 8 for k in sizes]).requires_grad_()
    bias = torch.randn(8, requires_grad=True)
    upstream = torch.ones(1, 8, 6, 7)

    def step():
        out = fused_deform_conv_packed(x, offsets, weight, bias, sizes, fp32_precision="ieee")
        return torch.autograd.grad(out, (x, offsets, weight, bias), upstream)
    return step, (x, offsets, weight, bias, upstream)


CASES = {
    "axial one-tile": lambda: _axial_step((2, 8, 5, 7)),
    "axial loop": lambda: _axial_step((1, 8, 40, 33)),
    "axial one-tile bf16 channels_last": lambda: _axial_step((2, 16, 6, 9), torch.bfloat16, True),
    "bias_act, relu_grad_sum, normalise, max_pool": _elementwise_step,
    "deformable convolutions": _deform_step,
}


@inner
@pytest.mark.parametrize("case", CASES)
def test_fast_path_launches_what_triton_launches(monkeypatch, launches, case):
    from epban.kernels import launch as launch_module

    step, inputs = CASES[case]()
    runs = {}
    for mode in ("0", "1", "1", "verify"):  # Triton's path; the fast path's first (filling) and later calls
        monkeypatch.setenv(VARIABLE, mode)
        launches.clear()
        step()
        runs.setdefault(mode, []).append(_described(launches, inputs))
    assert runs["0"][0], "nothing was launched"
    assert runs["1"][0] == runs["0"][0]
    assert runs["1"][1] == runs["0"][0]
    assert runs["verify"][0] == runs["0"][0]
    fast_hits = [site for site in launch_module._sites.values()
                 if any(site.function is f for f, _, _ in runs["1"][1])]
    assert len(fast_hits) == len({f for f, _, _ in runs["1"][1]}), "the later calls did not use the fast path"


def _relu_grad_sum_launch(grad, other, out):
    from epban.ops.bias_act import _launch_relu_grad_sum

    _launch_relu_grad_sum(grad, other, out)


@inner
@pytest.mark.parametrize("numel", [1, 16, 17, 4096 + 16, 4096 + 17])
def test_specialisation_of_ints_and_alignment(monkeypatch, launches, numel):
    """Triton specialises ints (1, divisibility by 16) and pointers (16-byte alignment) into
    different kernels: the fast path must follow, for each numel, for an aligned and a
    misaligned (one float past an aligned address) view, in any order."""
    base = torch.randn(3 * (numel + 1))
    aligned = [base[:numel], base[numel + 1:2 * numel + 1] * 0 + 1, base[:numel] * 2]
    misaligned = [base[1:numel + 1], base[numel + 2:2 * numel + 2], base[2 * numel + 3:3 * numel + 3]]
    assert misaligned[0].data_ptr() % 16 and aligned[0].data_ptr() % 16 == 0
    functions = {}
    for mode in ("1", "verify"):
        monkeypatch.setenv(VARIABLE, mode)
        for name, ts in (("aligned", aligned), ("misaligned", misaligned), ("aligned", aligned)):
            launches.clear()
            _relu_grad_sum_launch(*ts)  # verify: raises FastLaunchMismatch if Triton picked another kernel
            functions.setdefault(name, set()).add(launches[-1][0])
    assert len(functions["aligned"]) == 1 and len(functions["misaligned"]) == 1
    assert functions["aligned"] != functions["misaligned"]


@inner
def test_a_launch_hook_takes_tritons_path(monkeypatch, launches):
    """While a profiler's launch hook is set, every call goes through Triton (which runs it)."""
    from triton import knobs

    from epban.kernels import launch as launch_module

    monkeypatch.setattr(launch_module, "_sites", {})
    monkeypatch.setenv(VARIABLE, "1")
    step, _ = _elementwise_step()
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # Triton 3.6+: a chain of hooks
        hook.add(_noop)
        try:
            assert not launch_module._hooks_idle()
            step()
            assert not launch_module._sites
        finally:
            hook.remove(_noop)
    assert launch_module._hooks_idle()
    step()
    assert launch_module._sites


def _noop(*args, **kwargs):
    pass


def _switched_off(monkeypatch, launch_module):
    monkeypatch.setenv(VARIABLE, "0")


def _unhashable_argument(monkeypatch, launch_module):
    real_key = launch_module._arg_key
    monkeypatch.setattr(launch_module, "_arg_key", lambda args: real_key(args) + [[]])  # as a list argument would


def _traced_by_torch_compile(monkeypatch, launch_module):
    # Dynamo must see kernel[grid](...) (it records Triton kernels in its graph), not the fast path
    monkeypatch.setattr(launch_module, "_is_compiling", lambda: True)


@inner
@pytest.mark.parametrize("condition", [_switched_off, _unhashable_argument, _traced_by_torch_compile],
                         ids=lambda f: f.__name__.strip("_"))
def test_calls_that_take_tritons_path_keep_no_sites(monkeypatch, launches, condition):
    from epban.kernels import launch as launch_module

    monkeypatch.setattr(launch_module, "_sites", {})
    monkeypatch.setenv(VARIABLE, "1")
    condition(monkeypatch, launch_module)
    step, _ = _elementwise_step()
    step()
    step()
    assert launches and not launch_module._sites


def test_interpreted_kernels_take_tritons_path():
    """Under TRITON_INTERPRET=1 (this suite's default on CPU) kernels are not compiled."""
    from epban.ops._checks import triton_unavailable_reason

    if os.environ.get("TRITON_INTERPRET") != "1" or triton_unavailable_reason("ops", "cpu", torch.float32):
        pytest.skip("needs the interpreter")
    from epban.kernels import launch as launch_module
    from epban.ops.bias_act import bias_act

    before = dict(launch_module._sites)
    y = torch.randn(1, 3, 4, 5)
    out = bias_act(y, torch.zeros(3), backend="fused")
    torch.testing.assert_close(out, y.relu())
    assert launch_module._sites == before
