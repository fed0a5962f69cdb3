"""Host time of a fused op's call, forward + backward, by the door it takes (epban.ops._fused_op).

"dispatcher" forces the torch.library custom op (``EPBAN_FUSED_OPS_EAGER_DOOR=0``), as
torch.compile sees it. "eager" is the
autograd.Function that eager calls take. Both run the same checks, allocations and autograd
bookkeeping. The Triton launch is replaced by a stub that only allocates the outputs, so the
rows time the Python around the kernel: what an eager step, not captured in a CUDA graph, pays
per op before the GPU sees any work. CPU only; tiny tensors, so the data costs nothing.

"loss step" rows do the same for one whole eager step of the loss mode: the tiny network
(25 fused calls a step, a third of the official network's 75), random weights, float32, a
1x3x32x32 pair. Every Triton kernel is a stub and every fused path is forced on, as on a GPU.
So the step's time is its host work plus the small CPU convolutions that PyTorch still runs,
the same in both rows.

    pytest benches/bench_op_overhead.py --benchmark-only
    python benches/bench_op_overhead.py          (a markdown table of microseconds per call)
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import epban.ops.bias_act as bias_act_ops
import epban.ops.max_pool as max_pool_ops
import epban.ops.normalise as normalise_ops
from epban.ops._fused_op import EAGER_DOOR_VARIABLE
from epban.testing import KERNEL_MODULES

OPS = ["normalise", "bias_act", "bias_relu_max_pool2d"]
DOORS = ["dispatcher", "eager"]


def _stub_launches(patch):
    """Launches that allocate their outputs and run no kernel; ``patch(module, name, value)``."""
    patch(normalise_ops, "_launch", lambda src, mean, std, dst: dst)
    patch(bias_act_ops, "_launch", lambda y, bias, residual, relu: torch.empty_like(y))

    def pool(y, bias, k, s, p):
        size = (*y.shape[:2], max_pool_ops.pooled_size(y.shape[2], k, s, p), max_pool_ops.pooled_size(y.shape[3], k, s, p))
        return torch.empty(size, dtype=y.dtype), torch.empty(size, dtype=torch.int8)

    patch(max_pool_ops, "_launch_pool", pool)
    patch(max_pool_ops, "_launch_grad", lambda grad, other, out, argmax, h, w, k, s, p: torch.empty(
        (*out.shape[:2], h, w), dtype=out.dtype))


def _stub_kernels(patch):
    """Every Triton kernel of the fused ops launches nothing (``kernel[grid](...)`` returns)."""
    import importlib

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in KERNEL_MODULES:
        module = importlib.import_module(f"epban.kernels.{name}")
        for attr in dir(module):
            if attr.endswith("_kernel"):
                patch(module, attr, Stub())


def make_loss_step(device="cpu"):
    """One eager loss-mode step with every fused path forced (here: on the CPU, kernels stubbed;
    benches/bench_launch.py: compiled kernels on a stand-in driver, or a GPU)."""
    from epban import EfficientPBAN, PBANConfig
    from epban.models.loss_mode import ConvReLU, EpilogueBasicBlock, pban_for_loss

    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # stubbed outputs are uninitialised memory
    model = EfficientPBAN(PBANConfig.tiny()).eval().to(device)
    scorer = pban_for_loss(model, dtype=torch.float32)
    for m in scorer.modules():
        if isinstance(m, (ConvReLU, EpilogueBasicBlock)):
            m.epilogue_backend = "fused"
    for gmdc in (scorer.model.block2.br1, scorer.model.block2.br2):
        gmdc.backend = "fused"
    scorer.model.block2.attention_backend = "fused"
    hr = torch.rand(1, 3, 32, 32, device=device)
    sr = hr.clone().requires_grad_()
    return lambda: torch.autograd.grad(scorer(sr, hr).sum(), sr)


def make_step(op):
    """fwd + bwd of one fused call on tiny CPU tensors (backend="fused": TRITON_INTERPRET=1 set)."""
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    if op == "normalise":
        mean, std = torch.tensor([0.4, 0.4, 0.4]), torch.tensor([0.2, 0.2, 0.2])
        forward = lambda: normalise_ops.normalise(x, mean, std, dtype=torch.bfloat16,  # noqa: E731
                                                  channels_last=True, backend="fused")
    elif op == "bias_act":
        bias = torch.zeros(3, requires_grad=True)
        forward = lambda: bias_act_ops.bias_act(x, bias, backend="fused")  # noqa: E731
    else:
        bias = torch.zeros(3, requires_grad=True)
        forward = lambda: max_pool_ops.bias_relu_max_pool2d(x, bias, 3, 2, 1, backend="fused")[0]  # noqa: E731
    upstream = forward().detach().clone()
    return lambda: torch.autograd.grad(forward(), x, upstream)


def _door_switch(door) -> str:
    """The value of EPBAN_FUSED_OPS_EAGER_DOOR that sends the calls through ``door``."""
    return "0" if door == "dispatcher" else "1"


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("op", OPS)
def test_op_overhead(benchmark, monkeypatch, op, door):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _stub_launches(monkeypatch.setattr)
    monkeypatch.setenv(EAGER_DOOR_VARIABLE, _door_switch(door))
    benchmark.group = f"host time per fwd+bwd call: {op}"
    benchmark.pedantic(make_step(op), rounds=200, warmup_rounds=20)


@pytest.mark.parametrize("door", DOORS)
def test_loss_step_overhead(benchmark, monkeypatch, door):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _stub_kernels(monkeypatch.setattr)
    monkeypatch.setenv(EAGER_DOOR_VARIABLE, _door_switch(door))
    benchmark.group = "host time per eager loss step (1x3x32x32, kernels stubbed)"
    benchmark.pedantic(make_loss_step(), rounds=20, warmup_rounds=3)


def paired_medians_us(step, reps=400) -> dict:
    """Median us of ``step()`` through each door, the doors alternating call by call so that
    both see the same machine (this VM's speed drifts by 2x between runs)."""
    times = {door: [] for door in DOORS}
    for _ in range(20):
        step()
    for _ in range(reps):
        for door in DOORS:
            os.environ[EAGER_DOOR_VARIABLE] = _door_switch(door)
            start = time.perf_counter()
            step()
            times[door].append(time.perf_counter() - start)
    return {door: sorted(t)[len(t) // 2] * 1e6 for door, t in times.items()}


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

    _stub_launches(setattr)
    print("| fwd + bwd, kernels stubbed (host time, median) | dispatcher (custom op) | eager (autograd.Function) |")
    print("|---|---|---|")
    for op in OPS:
        us = paired_medians_us(make_step(op))
        print(f"| {op} | {us['dispatcher']:.0f} us | {us['eager']:.0f} us |")
    _stub_kernels(setattr)
    ms = {door: us / 1e3 for door, us in paired_medians_us(make_loss_step(), reps=40).items()}
    print(f"| loss step, tiny network, 1x3x32x32 | {ms['dispatcher']:.2f} ms | {ms['eager']:.2f} ms |")
