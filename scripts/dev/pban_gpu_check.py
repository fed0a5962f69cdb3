"""GPU check of the fused multi-branch deformable convolution and of Efficient-PBAN's loss mode.

    python scripts/dev/pban_gpu_check.py [--quick] [--no-timing] [--compile] [--budget 100] [--profile]

1. Correctness (exit status 1 on a failure), TF32 off everywhere:
   a. the fused deformable convolution (GMDC's branches k = 3, 5, 7, 9, C = 256, OB = 64, map
      19x24, channels_last, offsets of std 2 so many samples leave the image) against torchvision in
      float64: forward and gradients to x, offsets, weights, biases; float32 (IEEE dots;
      bound 1e-5 of the largest value, or twice torchvision's own float32 error), bfloat16 (1e-2 forward, 2e-2 gradients; against the reference on the
      bf16-rounded inputs).
   b. the loss mode (``pban_for_loss``) against the model's reference path (torchvision
      deform_conv2d, reference attention), official architecture with random weights and
      BatchNorm statistics, 2x3x256x256: float32 scores (1e-5) and input gradients (judged against the
      reference path in float64: 1e-5, or twice the fp32 reference path's own error), bfloat16
      scores (1e-2 relative); the bf16 input gradient's relative L2 error and cosine are
      reported against the 1e-2 goal without failing the run.
   c. CUDA-graph replays equal eager, two different inputs of one shape.
   d. with --compile: torch.compile of the loss mode (Inductor; slow to compile).
   With --profile, only: where the loss mode's device time goes (bf16 and fp32, eager, whose
   kernels are those a graph replays), per kernel and per part of the model.
2. Timings of the whole loss (forward + backward to sr) at 16x3x256x256, 1x3x512x512,
   1x3x1024x1024, 1x3x2048x2048 (rows from benches/bench_pban_loss.py), then the deformable
   op alone (benches/bench_deform_conv.py), as markdown tables printed last. Rows that would
   start after --budget seconds are skipped (the 2048 row first). Timings use PyTorch's
   defaults (cuDNN may use TF32 for float32 convolutions).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benches" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


class Report:
    def __init__(self):
        self.failed = []

    def line(self, name, value, bound, *, fail=True):
        ok = value <= bound
        verdict = "PASS" if ok else ("FAIL" if fail else "OVER (reported)")
        print(f"  {name:58s} {value:.2e}  (bound {bound:.0e})  {verdict}", flush=True)
        if not ok and fail:
            self.failed.append(name)


def check_deform_conv(report: Report):
    from epban.ops import deform_conv as ops

    bench = _load_bench("bench_deform_conv")
    print("a. fused deformable convolution vs torchvision (float64), 2x256x19x24 channels_last, k=3,5,7,9, "
          "offsets std 2")
    x, offsets, weights, biases = bench.make_inputs((2, 256, 19, 24), "cuda", torch.float64, offset_std=2.0)
    biases = [b.requires_grad_() for b in biases]
    weights = [w.requires_grad_() for w in weights]
    leaves = [x, *offsets, *weights, *biases]
    names = ["out", "dx", "doffsets", "dweights", "dbiases"]
    grad = torch.randn_like(ops.multi_branch_deform_conv_reference(x, offsets, weights, biases).detach(),
                            memory_format=torch.channels_last)

    def reference(dtype):
        # On the inputs rounded to ``dtype``: a rounded offset that crosses an integer moves its
        # sample to another pixel cell, and the offset gradient jumps with it.
        exact = [t.detach().to(dtype).double().requires_grad_() for t in leaves]  # .to keeps channels_last
        out = ops.multi_branch_deform_conv_reference(exact[0], exact[1:5], exact[5:9], exact[9:])
        return out, torch.autograd.grad(out, exact, grad)

    def errors(dtype, backend, precision=None):
        ref, ref_grads = reference(dtype)
        cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
        out = ops.multi_branch_deform_conv(cast[0], cast[1:5], cast[5:9], cast[9:], backend=backend,
                                           fp32_precision=precision)
        grads = torch.autograd.grad(out, cast, grad.to(dtype))
        groups = [[out], [grads[0]], list(grads[1:5]), list(grads[5:9]), list(grads[9:])]
        expected = [[ref], [ref_grads[0]], list(ref_grads[1:5]), list(ref_grads[5:9]), list(ref_grads[9:])]
        return [max(_rel(g, e) for g, e in zip(gs, es)) for gs, es in zip(groups, expected)]

    tv = errors(torch.float32, "reference")
    fused = errors(torch.float32, "fused")
    for n, e, t in zip(names, fused, tv):
        report.line(f"fp32 {n} (torchvision fp32: {t:.1e})", e, max(1e-5, 2 * t))
    for n, e in zip(names, errors(torch.bfloat16, "fused")):
        report.line(f"bf16 {n}", e, 1e-2 if n == "out" else 2e-2)


def _randomised_official():
    from epban import EfficientPBAN, PBANConfig

    torch.manual_seed(0)
    model = EfficientPBAN(PBANConfig.official()).eval()
    from epban.testing import randomise_inference_state

    randomise_inference_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.cuda()


def _score_and_grad(f, sr, hr):
    sr = sr.detach().clone().requires_grad_()
    s = f(sr, hr)
    (g,) = torch.autograd.grad(s.sum(), sr)
    return s.detach(), g


def check_loss_mode(report: Report, model, compile_check: bool):
    from epban.models.loss_mode import pban_for_loss

    bench = _load_bench("bench_pban_loss")
    print("b. loss mode vs the model's reference path, official architecture (random weights), 2x3x256x256")
    sr, hr = bench.inputs((2, 256, 256), "cuda")
    bench.set_reference_backends(model, "reference")
    expected, expected_grad = _score_and_grad(lambda a, b: model(a, b, check_finite=False), sr, hr)
    bench.set_reference_backends(model, "auto")
    scale = max(1.0, expected.abs().max().item())
    print(f"  reference scores {expected.tolist()}")
    scores, grad = _score_and_grad(pban_for_loss(model), sr, hr)
    report.line("fp32 scores, |diff| / max(1, |score|)", (scores - expected).abs().max().item() / scale, 1e-5)
    # Both float32 paths carry rounding error through ~40 layers and a softmax over logits / sigma;
    # judge each against the reference path in float64: the loss mode may err at most 1e-5, or
    # twice the reference path's own float32 error where that is larger.
    import copy

    model64 = copy.deepcopy(model).double()
    bench.set_reference_backends(model64, "reference")
    exact, exact_grad = _score_and_grad(lambda a, b: model64(a, b, check_finite=False), sr.double(), hr.double())
    del model64
    ref_err, loss_err = _rel(expected_grad.double(), exact_grad), _rel(grad.double(), exact_grad)
    report.line(f"fp32 d score / d sr vs float64 (reference path fp32: {ref_err:.1e})", loss_err,
                max(1e-5, 2 * ref_err))
    report.line("fp32 d score / d sr vs the fp32 reference path (was the bound)", _rel(grad, expected_grad), 1e-5,
                fail=False)
    scores, grad = _score_and_grad(pban_for_loss(model, dtype=torch.bfloat16), sr, hr)
    report.line("bf16 scores, relative", _rel(scores, expected), 1e-2)
    rel_l2 = ((grad - expected_grad).norm() / expected_grad.norm()).item()
    cos = F.cosine_similarity(grad.flatten(), expected_grad.flatten(), dim=0).item()
    report.line(f"bf16 d score / d sr, relative L2 (cosine {cos:.4f})", rel_l2, 1e-2, fail=False)

    print("c. CUDA graph replays vs eager (loss mode fp32), 2x3x128x128, two inputs")
    eager, graphed = pban_for_loss(model), pban_for_loss(model, cuda_graph=True)
    for seed in (0, 1):
        sr, hr = bench.inputs((2, 128, 128), "cuda", seed=seed)
        e_s, e_g = _score_and_grad(eager, sr, hr)
        g_s, g_g = _score_and_grad(graphed, sr, hr)
        report.line(f"graph replay {seed}: scores and gradient", max(_rel(g_s, e_s), _rel(g_g, e_g)), 1e-6)
    if compile_check:
        print("d. torch.compile of the loss mode, 1x3x256x256")
        sr, hr = bench.inputs((1, 256, 256), "cuda")
        e_s, e_g = _score_and_grad(eager, sr, hr)
        t = time.time()
        c_s, c_g = _score_and_grad(pban_for_loss(model, compile=True), sr, hr)
        print(f"  compiled in {time.time() - t:.0f} s")
        report.line("compiled: scores and gradient", max(_rel(c_s, e_s), _rel(c_g, e_g)), 1e-4)


# Kernel name fragments -> the part of the model they belong to (first match wins).
_PARTS = [("mbdc_", "deformable conv (Triton)"), ("_axial_", "axial attention (Triton)"),
          ("bias_act", "conv epilogues (Triton)"), ("implicit_gemm", "convolutions (cuDNN)"),
          ("fprop", "convolutions (cuDNN)"),  # cutlass kernels: their names also hold "nhwc"
          ("bmm", "attention matmuls (reference)"), ("gemm", "GEMMs (cuBLAS)"), ("conv", "convolutions (cuDNN)"),
          ("wgrad", "convolutions (cuDNN)"), ("dgrad", "convolutions (cuDNN)"), ("xmma", "convolutions (cuDNN)"),
          ("sm90", "convolutions / GEMMs (cuDNN, cuBLAS)"), ("softmax", "softmax"), ("reduce", "reductions"),
          ("max_pool", "pooling"), ("avg_pool", "pooling"), ("elementwise", "elementwise"),
          ("copy", "copies / layout"), ("nchw", "copies / layout"), ("nhwc", "copies / layout")]


def profile_loss(sizes=((16, 256, 256), (1, 1024, 1024)), iters=5):
    """Print the device time per loss step of the loss mode, by part of the model and by kernel."""
    from torch.profiler import ProfilerActivity, profile

    from epban.models.loss_mode import pban_for_loss

    model = _randomised_official()
    for dtype in (torch.bfloat16, torch.float32):
        scorer = pban_for_loss(model, dtype=dtype)
        for b, h, w in sizes:
            g = torch.Generator(device="cuda").manual_seed(0)
            hr = torch.rand(b, 3, h, w, generator=g, device="cuda")
            sr = (hr + 0.05 * torch.randn(b, 3, h, w, generator=g, device="cuda")).clamp(0, 1)

            def step():
                x = sr.clone().requires_grad_()
                torch.autograd.grad(scorer(x, hr).sum(), x)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    step()
                torch.cuda.synchronize()
            kernels = []
            for ev in prof.key_averages():
                dev = getattr(ev, "device_time_total", None)
                dev = ev.cuda_time_total if dev is None else dev
                if dev > 0:
                    kernels.append((dev / iters / 1e3, ev.count / iters, ev.key))
            parts: dict = {}
            for ms, _, name in kernels:
                part = next((p for frag, p in _PARTS if frag in name.lower()), "other")
                parts[part] = parts.get(part, 0.0) + ms
            total = sum(ms for ms, _, _ in kernels)
            print(f"\n## loss mode {str(dtype)[6:]}, {b}x3x{h}x{w}: {total:.2f} ms of kernels per fwd+bwd step")
            for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"  {ms:7.3f} ms  {100 * ms / total:5.1f}%  {part}")
            print("  top kernels:")
            for ms, n, name in sorted(kernels, reverse=True)[:12]:
                print(f"  {ms:7.3f} ms  x{n:<5.1f} {name[:160]}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="timings up to 1024x1024 only")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also check torch.compile (Inductor, slow)")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds after which no timing row starts")
    parser.add_argument("--profile", action="store_true", help="only: the loss mode's device time by part and kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1
    if args.profile:
        return profile_loss()
    t0 = time.time()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    report = Report()
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = None
    for section in (check_deform_conv, check_loss_mode):
        try:
            if section is check_loss_mode:
                model = _randomised_official()
                section(report, model, args.compile)
            else:
                section(report)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            report.failed.append(f"{section.__name__}: {type(exc).__name__}: {exc}")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
    print(f"correctness: {'PASS' if not report.failed else 'FAIL ' + str(report.failed)} "
          f"({time.time() - t0:.1f} s incl. JIT)", flush=True)
    del model
    if args.no_timing:
        return 1 if report.failed else 0

    deadline = t0 + args.budget
    loss_bench, deform_bench = _load_bench("bench_pban_loss"), _load_bench("bench_deform_conv")
    sizes = loss_bench.SIZES[:3] if args.quick else loss_bench.SIZES
    loss_rows = loss_bench.run_rows(sizes, loss_bench.VARIANTS, "cuda", deadline=deadline,
                                    log=lambda m: print("  " + m, flush=True))
    deform_rows = []
    if time.time() < deadline - 5:
        deform_rows = deform_bench.run_rows([(1, 256, 64, 64), (16, 256, 16, 16)], deform_bench.IMPLS,
                                            log=lambda m: print("  " + m, flush=True))
    name = torch.cuda.get_device_name()
    print()
    if deform_rows:
        print(deform_bench.table(deform_rows, name))
        print()
    print(loss_bench.table(loss_rows, name))
    print(f"\ncorrectness {'PASS' if not report.failed else 'FAIL'}; total {time.time() - t0:.1f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
