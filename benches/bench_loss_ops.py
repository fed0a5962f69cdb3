"""The loss mode's memory-bound Triton ops against the PyTorch ops they replace, forward + backward.

Rows, at the tensor sizes of the loss mode's inputs (bf16, channels_last, as it runs them):
- "stem tail": the stem conv's bias, ReLU and 3x3/2 max-pool, then the gradient back to the
  conv's output. PyTorch: bias + ReLU (``bias_act_reference``), ``max_pool2d`` with indices and
  autograd's backward; fused: ``epban.ops.max_pool.bias_relu_max_pool2d`` and its gather.
- "input": an image's normalisation, cast to bf16 and change to channels_last, then the gradient
  back to the float32 image. PyTorch: ``((x - mean) / std).to(bf16, channels_last)`` and
  autograd; fused: ``epban.ops.normalise.normalise``.
Each is timed twice: eager (what a small op costs with the host launching it, the Python
overhead included) and captured in a CUDA graph (the device's time alone, as the loss mode runs
under graphs). The floor column is the fused op's own DRAM bytes (read and written once each,
counted below) at ``HBM_BYTES_PER_S``: the time it cannot beat on a card of that bandwidth.

    pytest benches/bench_loss_ops.py --benchmark-only      (CPU: the reference rows)
    python benches/bench_loss_ops.py                       (CUDA: a markdown table)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epban.ops.bias_act import bias_act_reference
from epban.ops.max_pool import bias_relu_max_pool2d
from epban.ops.normalise import normalise
from timing import cuda_graph_median_ms, cuda_median_ms

HBM_BYTES_PER_S = 3.35e12  # an H100 SXM's; set it for the card timed
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# (op, shape): the stem's output of 16x3x256x256, 1x3x1024x1024 and 1x3x2048x2048 inputs, and those inputs
CUDA_CASES = [("stem tail", (16, 64, 128, 128)), ("stem tail", (1, 64, 512, 512)), ("stem tail", (1, 64, 1024, 1024)),
              ("input", (16, 3, 256, 256)), ("input", (1, 3, 2048, 2048))]
CPU_CASES = [("stem tail", (2, 64, 32, 32)), ("input", (2, 3, 128, 128))]
IMPLS = ["pytorch", "fused"]


def fused_bytes(op, shape) -> int:
    """DRAM bytes of the fused op's forward + backward (bf16 tensors, float32 image)."""
    n = shape[0] * shape[1] * shape[2] * shape[3]
    if op == "stem tail":
        pooled = n // 4
        return 2 * n + pooled * (2 + 1) + pooled * (2 + 2 + 1) + 2 * n  # y; out, argmax; grad, out, argmax; grad_y
    return 4 * n + 2 * n + 2 * n + 4 * n  # x (fp32); out (bf16); grad (bf16); grad_x (fp32)


def make_step(op, impl, shape, device):
    g = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    if op == "stem tail":
        y = torch.randn(shape, generator=g, device=device).to(torch.bfloat16, memory_format=cl).requires_grad_()
        bias = (0.1 * torch.randn(shape[1], generator=g, device=device)).to(torch.bfloat16)

        def forward():
            if impl == "fused":
                return bias_relu_max_pool2d(y, bias, 3, 2, 1, backend="fused")[0]
            return F.max_pool2d(bias_act_reference(y, bias), 3, 2, 1)

        leaf = y
    else:
        x = torch.rand(shape, generator=g, device=device).requires_grad_()
        mean = torch.tensor(MEAN, device=device)
        std = torch.tensor(STD, device=device)

        def forward():
            if impl == "fused":
                return normalise(x, mean, std, dtype=torch.bfloat16, channels_last=True, backend="fused")
            return ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).to(torch.bfloat16, memory_format=cl)

        leaf = x
    upstream = forward().detach().clone().normal_()

    def step():
        torch.autograd.grad(forward(), leaf, upstream)

    return step


def time_impl(op, impl, shape, reps=20) -> tuple[float, float]:
    """(eager ms, CUDA-graph ms) of forward + backward."""
    step = make_step(op, impl, shape, "cuda")
    return cuda_median_ms(step, reps), cuda_graph_median_ms(step, reps)


def table(rows, device_name) -> str:
    out = [f"The loss mode's memory-bound ops, forward + backward, bf16 channels_last, {device_name}",
           "",
           "| op | shape | PyTorch graph ms | fused graph ms | speed-up | fused GB/s (graph) "
           f"| floor ms (fused bytes at {HBM_BYTES_PER_S / 1e12:.2f} TB/s) | PyTorch eager ms | fused eager ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nbytes = fused_bytes(r["op"], r["shape"])
        (torch_eager, torch_graph), (fused_eager, fused_graph) = r["pytorch"], r["fused"]
        out.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {torch_graph:.3f} | {fused_graph:.3f} "
                   f"| {torch_graph / fused_graph:.2f}x | {nbytes / (fused_graph / 1e3) / 1e9:.0f} "
                   f"| {nbytes / HBM_BYTES_PER_S * 1e3:.3f} | {torch_eager:.3f} | {fused_eager:.3f} |")
    return "\n".join(out)


def run_rows(cases, log=print):
    rows = []
    for op, shape in cases:
        try:
            row = dict(op=op, shape=shape, **{impl: time_impl(op, impl, shape) for impl in IMPLS})
            rows.append(row)
            log(f"{op} {shape}: PyTorch {row['pytorch'][0]:.3f} ms eager, {row['pytorch'][1]:.3f} ms graph; "
                f"fused {row['fused'][0]:.3f} ms eager, {row['fused'][1]:.3f} ms graph")
        except Exception as exc:  # one failing row must not hide the others
            log(f"{op} {shape}: FAILED {type(exc).__name__}: {exc}")
    return rows


def _cases():
    cases = [pytest.param("cpu", op, s, "pytorch", id=f"{op.replace(' ', '-')}-pytorch-cpu-{'x'.join(map(str, s))}")
             for op, s in CPU_CASES]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", op, s, impl, marks=pytest.mark.cuda,
                               id=f"{op.replace(' ', '-')}-{impl}-cuda-{'x'.join(map(str, s))}")
                  for op, s in CUDA_CASES for impl in IMPLS]
    return cases


@pytest.mark.parametrize("device, op, shape, impl", _cases())
def test_loss_op(benchmark, device, op, shape, impl):
    step = make_step(op, impl, shape, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step()
        sync()

    run()
    benchmark.group = f"{op} {device} {'x'.join(map(str, shape))}"
    benchmark.extra_info["fused_bytes"] = fused_bytes(op, shape)
    benchmark.pedantic(run, rounds=20 if device == "cuda" else 3, warmup_rounds=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the markdown table needs a CUDA GPU; on CPU use pytest benches/bench_loss_ops.py")
    print(table(run_rows(CUDA_CASES), torch.cuda.get_device_name()))
