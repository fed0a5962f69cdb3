"""GPU check of the fused SSIM kernel: correctness against the reference, then timings.

    python scripts/dev/ssim_gpu_check.py [--seed N] [--skip-timings] [--strip-sweep] [--device cpu]

1. Correctness on CUDA, fresh random odd shapes (the seed is printed; --seed repeats a
   run): forward and both gradients for float32/bfloat16/float16, every reduction, both
   paddings, from NaN-poisoned allocations; float32 training through both the two-pass ops
   and the one-pass ops (ssim_per_image_one_pass, ssim_mean_one_pass); one-input gradients;
   non-contiguous inputs.
   The same again with the strip backward kernel (EPBAN_SSIM_CUDA_BACKWARD=strip).
   --strip-sweep: the one-pass op with the tile kernel against the strip kernel's own plan
   and forced plans (threads x rows), per shape: times and gradient differences.
2. epban fused's breakdown: the bare forward, backward and one-pass ops, the host time to
   issue a fwd+bwd, the device time of each kernel it launches.
3. Median times (triton.testing.do_bench, else CUDA events) of epban fused (its default
   policy: the one-pass op for training), epban fused with each backward tile forced
   (32x32, 32x64; the tiles, where the strip kernel is the default from 512 x 512), with the
   strip backward, and forced to the two-pass ops, epban fused's
   fwd+bwd replayed from a CUDA graph (no host time), epban reference, pytorch-msssim,
   torchmetrics and kornia (those importable) at 16x3x256x256, 1x3x1080x1920 and 1x3x2160x3840, forward and forward+backward, float32, reduction mean;
   epban.ssim_loss (the weight folded into the pass) against the weight applied outside
   (fwd+bwd only); the peak extra memory of each at 4K forward+backward; a markdown table with the
   memory-traffic floor (read two images, + write one gradient for fwd+bwd, at 3.0 TB/s).
Exits 1 when a correctness check fails. About a minute on an H100. ``--device cpu``
runs the correctness part against the CPU kernel (a dry run of this script without a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from unittest import mock

import torch

import epban
from epban import _extension, settings
from epban.ops import ssim as ssim_module
from epban.ops.ssim import fused_unavailable_reason, ssim_reference
from epban.testing import poisoned_allocations, ssim_implementations, ssim_loss_forms

SHAPES = [(16, 3, 256, 256), (1, 3, 1080, 1920), (1, 3, 2160, 3840)]
TARGETS_MS = {(16, 3, 256, 256): 0.07, (1, 3, 1080, 1920): 0.12, (1, 3, 2160, 3840): 0.44}  # fwd+bwd targets
BANDWIDTH = 3.0e12  # bytes/s for the floor column


DEVICE = "cuda"


def one_pass_policy(enabled: bool):
    """Training calls take the one-pass op on DEVICE (enabled) or the two-pass ops."""
    return ssim_module.one_pass_devices({DEVICE} if enabled else ())


def two_pass_ssim(x, y):
    with one_pass_policy(False):
        return epban.ssim(x, y, backend="fused")


@contextlib.contextmanager
def cuda_backward(kernel: str, plan=(0, 0, 0)):
    """Within the block the CUDA gradients run ``kernel`` (auto, tile32, tile64 or strip; strip
    also on small images) with the strip plan ``plan`` (centre columns a thread, threads, rows a
    band; 0: the planner's): the setting EPBAN_SSIM_CUDA_BACKWARD for epban.ssim, handed to the
    extension at once too for the bare ops, and the plan through its test-only
    ssim_force_strip_plan. Afterwards the setting of the environment holds again."""
    with mock.patch.dict(os.environ, {"EPBAN_SSIM_CUDA_BACKWARD": kernel}):
        _extension._C.ssim_set_cuda_backward(kernel)
        _extension._C.ssim_force_strip_plan(*plan)
        try:
            yield
        finally:
            _extension._C.ssim_force_strip_plan(0, 0, 0)
    _extension._C.ssim_set_cuda_backward(settings.ssim_cuda_backward())


def with_backward(kernel: str):
    """epban fused with the CUDA backward forced to ``kernel`` (tile32, tile64, strip). The
    choice goes on fn.backward, for the caller to apply around a whole timing: patching
    os.environ on every call costs more host time than the kernels take on small images."""

    def fn(x, y):
        return epban.ssim(x, y, backend="fused")

    fn.backward = kernel
    return fn


def strip_sweep() -> list[str]:
    """The one-pass op (value and dL/dx, float32) with the tile kernel against the strip kernel
    with its own plan and with forced plans (threads x rows), per shape: median
    ms and the largest gradient difference from the tile's, relative to its largest element.
    Both builds (two centre columns a thread, the default, and one).
    Returns the plans whose gradient differs by more than 1e-4."""
    print("\nstrip sweep: one-pass op, float32, valid, dL/dx (the kernel + its per-image sum)")
    print("| shape | kernel | columns | threads | rows | median ms | vs tile | max rel diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    failures = []
    c1, c2 = 1e-4, 9e-4
    # (columns a thread, threads, rows); threads and rows 0: plan_strips' choice
    # Forced plans: blocks of 4 warps (two blocks an SM with the two-column build's ~230
    # registers) or 2 warps (four); 32- and 96-thread blocks leave schedulers idle. Rows that
    # fill whole waves of 264 or 528 blocks on 132 SMs: 99 at 1080p, 197 and 432 at 4K with
    # 128 threads; 86, 216 and 432 with 64.
    plans = [(2, 0, 0), (1, 0, 0)]
    plans += [(2, 128, r) for r in (64, 99, 128, 197, 432)]
    plans += [(2, 64, r) for r in (64, 86, 216, 432)]
    plans += [(1, 128, 128), (1, 256, 99), (1, 256, 197)]
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x, y = image_pair(shape, torch.float32, gen)
        name = "x".join(map(str, shape))

        def one_pass():
            return torch.ops.epban.ssim_per_image_and_grad(x, y, c1, c2, False, True, False)

        with cuda_backward("tile64"):  # the tall tile (the strip kernel is the default from 512 x 512)
            tile_ms = median_ms(one_pass)
            _, tile_gx, _ = one_pass()
        scale = tile_gx.abs().max().item()
        print(f"| {name} | tile | | | | {tile_ms:.3f} | 1.00 | |", flush=True)
        for columns, threads, rows in plans:
            with cuda_backward("strip", (columns, threads, rows)):
                ms = median_ms(one_pass)
                _, gx, _ = one_pass()
            threads, rows = threads or "plan", rows or "plan"
            diff = (gx - tile_gx).abs().max().item() / scale
            if diff > 1e-4:
                failures.append(f"strip {columns} column(s) {threads}x{rows} at {name}: gradient differs by {diff:.1e}")
            print(f"| {name} | strip | {columns} | {threads} | {rows} | {ms:.3f} | {tile_ms / ms:.2f} | {diff:.1e} |",
                  flush=True)
    return failures


# The fused rows replayed from CUDA graphs: SSIM alone, the L1 + SSIM loss in one pass, MS-SSIM
# (no finite check: it syncs). Their ratios to SSIM alone are the targets of the SSIM family.
GRAPHED = {
    "epban fused, CUDA graph": lambda x, y: epban.ssim(x, y, backend="fused"),
    "epban L1 + SSIM fused, CUDA graph": lambda x, y: epban.ssim_loss(x, y, weight=0.2, l1=1.0, backend="fused"),
    "epban MS-SSIM fused, CUDA graph": lambda x, y: epban.ms_ssim(x, y, backend="fused", check_finite=False),
}


def graphed_fused_step(x, y, loss=GRAPHED["epban fused, CUDA graph"]):
    """A CUDA graph of ``loss``'s forward + backward to x (no host work on replay: the GPU time
    of one training call), checked once against the eager gradient."""
    xg = x.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            xg.grad = None
            loss(xg, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    eager = xg.grad.clone()
    xg.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss(xg, y).backward()
    graph.replay()
    torch.testing.assert_close(xg.grad, eager, rtol=1e-5, atol=1e-9)
    return graph.replay


def image_pair(shape, dtype, gen):
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = (0.9 * x + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype)


def run_with_grads(fn, x, y, u_seed):
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    out = fn(x, y)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(u_seed), dtype=torch.float64)
    gx, gy = torch.autograd.grad((out * u.to(out.device, out.dtype)).sum(), (x, y))
    return out.detach(), gx, gy


def abs_err(a, b):
    if not torch.isfinite(a).all():
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def check_correctness(seed: int) -> list[str]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 1, 13, 29), (2, 4, 57, 31), (1, 3, 257, 131)]
    shapes += [
        (rng.randint(1, 3), rng.randint(1, 4), 2 * rng.randint(6, 200) + 1, 2 * rng.randint(6, 300) + 1) for _ in range(3)
    ]
    failures = []
    n_checks = 0
    with poisoned_allocations():
        for shape in shapes:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x, y = image_pair(shape, dtype, gen)
                # Against the float64 reference on the same inputs upcast (half types included:
                # the kernel computes in float32 from the half values).
                rx, ry = x.double(), y.double()
                grad_tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
                for padding in ("valid", "same"):
                    for reduction, one_pass in (("mean", False), ("mean", True), ("none", False), ("none", True),
                                                ("map", False)):
                        if one_pass and dtype != torch.float32:
                            continue
                        kw = dict(padding=padding, reduction=reduction)
                        with one_pass_policy(one_pass):
                            out, gx, gy = run_with_grads(lambda a, b: epban.ssim(a, b, backend="fused", **kw), x, y, 7)
                        ref = run_with_grads(lambda a, b: ssim_reference(a, b, **kw), rx, ry, 7)
                        errs = [abs_err(out, ref[0]), rel_err(gx, ref[1]), rel_err(gy, ref[2])]
                        # Gradients: relative to their largest value, with a floor of a few float16
                        # subnormal steps (mean over large images: per-pixel gradients near 1e-6).
                        floor = 4 * 2.0**-24 / max(ref[1].abs().max().item(), 1e-30) if dtype == torch.float16 else 0.0
                        tols = [1e-5, max(grad_tol, floor), max(grad_tol, floor)]
                        # Per-pixel maps of flat regions: float32 cancellation (E[x^2] - mu^2) limits
                        # any float32 SSIM; accept no worse than 2x the reference run in float32 on
                        # the same inputs (half inputs upcast, gradients rounded to the input dtype).
                        ref32 = run_with_grads(lambda a, b: ssim_reference(a, b, **kw), x, y, 7)
                        base = [abs_err(ref32[0], ref[0]), rel_err(ref32[1], ref[1]), rel_err(ref32[2], ref[2])]
                        tols = [max(t, 2 * b) for t, b in zip(tols, base)]
                        n_checks += 1
                        if not all(e <= t for e, t in zip(errs, tols)):
                            failures.append(
                                f"{shape} {dtype} {padding} {reduction}{' one-pass' if one_pass else ''}: fwd {errs[0]:.2e} ({tols[0]:.1e}), "
                                f"grad x {errs[1]:.2e}, grad y {errs[2]:.2e} ({tols[1]:.1e})"
                            )
        # One input requiring grad; non-contiguous inputs; identical images.
        x, y = image_pair((2, 3, 101, 77), torch.float32, gen)
        xr = x.clone().requires_grad_(True)
        epban.ssim(xr, y, backend="fused").backward()
        xr64 = x.double().requires_grad_(True)
        ssim_reference(xr64, y.double()).backward()
        n_checks += 1
        if rel_err(xr.grad, xr64.grad) > 1e-4:
            failures.append(f"grad of x alone: {rel_err(xr.grad, xr64.grad):.2e}")
        xc, yc = x.to(memory_format=torch.channels_last), y.transpose(2, 3).contiguous().transpose(2, 3)
        n_checks += 1
        if not torch.equal(epban.ssim(xc, yc, reduction="none"), epban.ssim(x, y, reduction="none")):
            failures.append("non-contiguous inputs give a different result")
        # ssim_loss: the weight folded into the one pass; a random upstream (the in-place scaling
        # runs) and .backward() (an upstream of 1: the scaling kernel returns at once).
        for reduction in ("mean", "none"):
            out, gx, gy = run_with_grads(lambda a, b: epban.ssim_loss(a, b, weight=0.37, reduction=reduction), x, y, 9)
            ref = run_with_grads(lambda a, b: 0.37 * (1 - ssim_reference(a, b, reduction=reduction)), x.double(),
                                 y.double(), 9)
            xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            epban.ssim_loss(xr, yr, weight=0.37, reduction=reduction).sum().backward()
            xd, yd = x.double().requires_grad_(True), y.double().requires_grad_(True)
            (0.37 * (1 - ssim_reference(xd, yd, reduction=reduction))).sum().backward()
            errs = [abs_err(out, ref[0]), rel_err(gx, ref[1]), rel_err(gy, ref[2]), rel_err(xr.grad, xd.grad),
                    rel_err(yr.grad, yd.grad)]
            n_checks += 1
            if not (errs[0] <= 1e-5 and max(errs[1:]) <= 1e-4):
                failures.append(f"ssim_loss {reduction}: value {errs[0]:.2e}, grads {max(errs[1:]):.2e}")
        n_checks += 1
        same = epban.ssim(x, x, padding="same", backend="fused").item()
        if abs(same - 1.0) > 1e-6:
            failures.append(f"ssim(x, x) = {same}")
    print(f"correctness: {n_checks - len(failures)}/{n_checks} checks passed (seed {seed}, shapes {shapes})")
    for f in failures:
        print("  FAIL", f)
    return failures


def median_ms(fn) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def breakdown() -> None:
    """Where epban's fused fwd+bwd time goes, per shape: the bare ops (forward, backward),
    the host time to issue one fwd+bwd (what bounds it when the GPU work is shorter), and
    the device time of every kernel one fwd+bwd launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    print("\nepban fused, float32, reduction mean: breakdown")
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x, y = image_pair(shape, torch.float32, gen)
        c1, c2 = 1e-4, 9e-4
        grad = torch.full((shape[0],), 1.0 / shape[0], device=DEVICE)
        fwd_op = median_ms(lambda: torch.ops.epban.ssim_per_image(x, y, c1, c2, False))
        bwd_op = median_ms(lambda: torch.ops.epban.ssim_backward(grad, x, y, c1, c2, False, True, False))
        one_op = median_ms(lambda: torch.ops.epban.ssim_per_image_and_grad(x, y, c1, c2, False, True, False))
        xg = x.clone().requires_grad_(True)

        def run():
            xg.grad = None
            epban.ssim(xg, y, backend="fused").backward()

        for _ in range(10):
            run()
        torch.cuda.synchronize()
        n = 50
        start = time.perf_counter()
        for _ in range(n):
            run()
        host_ms = (time.perf_counter() - start) / n * 1e3  # issue time; the queue absorbs the GPU time
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                run()
            torch.cuda.synchronize()
        kernels = sorted(
            ((e.key, e.device_time_total / 10 / 1e3, e.count // 10) for e in prof.key_averages() if e.device_time_total > 0),
            key=lambda k: -k[1],
        )
        name = "x".join(map(str, shape))
        print(f"  {name}: forward op {fwd_op:.3f} ms, backward op {bwd_op:.3f} ms, one-pass op {one_op:.3f} ms, "
              f"host issue {host_ms:.3f} ms per fwd+bwd")
        for key, ms, count in kernels[:8]:
            print(f"    {ms:8.4f} ms  x{count}  {key[:100]}")


# A training loss's SSIM term: the weight folded into the pass (the backward's scaling skipped
# on the device), and the same weight applied outside (the scaling runs).
LOSS_FORMS = ssim_loss_forms(0.5)


def timings() -> None:
    impls = ssim_implementations(on_missing=lambda name: print(f"{name} not installed: skipped"))
    impls = {"epban fused": impls.pop("epban fused"),
             "epban fused, tile 32x32": with_backward("tile32"),
             "epban fused, tile 32x64": with_backward("tile64"),
             "epban fused, strip": with_backward("strip"), "epban two-pass": two_pass_ssim,
             **LOSS_FORMS, **impls}
    rows = []
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x, y = image_pair(shape, torch.float32, gen)
        numel = x.numel()
        for mode in ("fwd", "fwd+bwd"):
            floor_ms = (3 if mode == "fwd+bwd" else 2) * 4 * numel / BANDWIDTH * 1e3
            for name, fn in impls.items():
                if mode == "fwd" and ("tile" in name or "strip" in name or name in LOSS_FORMS):
                    continue  # the tile and the strip are the backward's; the loss rows are training's
                if mode == "fwd":

                    def run(fn=fn):
                        with torch.no_grad():
                            fn(x, y)

                else:
                    xg = x.clone().requires_grad_(True)

                    def run(fn=fn, xg=xg):
                        xg.grad = None
                        fn(xg, y).backward()

                forced = getattr(fn, "backward", None)
                with cuda_backward(forced) if forced else contextlib.nullcontext():
                    ms = median_ms(run)
                    mem = ""
                    if mode == "fwd+bwd" and shape == SHAPES[-1]:
                        xg.grad = None
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        run()
                        torch.cuda.synchronize()
                        extra = torch.cuda.max_memory_allocated() - base
                        mem = f"{extra / 2**20:.0f} MiB ({extra / (4 * numel):.2f} images)"
                        xg.grad = None
                target = f"{TARGETS_MS[shape]:.2f}" if mode == "fwd+bwd" and name.startswith("epban") and "ref" not in name else ""
                rows.append(("x".join(map(str, shape)), mode, name, ms, floor_ms, target, mem))
                print(f"  {rows[-1][0]} {mode:8s} {name:16s} {ms:8.3f} ms", flush=True)
            del run
            if mode == "fwd+bwd":
                alone = None
                for i, (name, loss) in enumerate(GRAPHED.items()):  # SSIM alone first
                    if name.startswith("epban MS-SSIM") and min(shape[-2:]) < 161:
                        continue  # five scales need sides of 161 or more
                    replay = graphed_fused_step(x, y, loss)
                    ms = median_ms(replay)
                    alone = ms if i == 0 else alone
                    target = f"{TARGETS_MS[shape]:.2f}" if i == 0 else ""
                    ratio = "" if i == 0 else f"{ms / alone:.2f}x SSIM alone"
                    rows.append(("x".join(map(str, shape)), mode, name, ms, floor_ms, target, ratio))
                    print(f"  {rows[-1][0]} {mode:8s} {name:16s} {ms:8.3f} ms", flush=True)
                    del replay
    print()
    print(f"SSIM, float32, reduction mean, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("floor: read x and y (+ write one gradient for fwd+bwd) at 3.0 TB/s; peak extra memory at 4K fwd+bwd")
    print()
    print("| shape | pass | implementation | median ms | floor ms | x floor | target ms | peak extra memory / ratio |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for shape, mode, name, ms, floor_ms, target, mem in rows:
        print(f"| {shape} | {mode} | {name} | {ms:.3f} | {floor_ms:.3f} | {ms / floor_ms:.1f} | {target} | {mem} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--strip-sweep", action="store_true",
                        help="also time the strip backward kernel's plans against the tile (CUDA)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("ssim_gpu_check: no CUDA device")
        return 1
    unavailable = fused_unavailable_reason(DEVICE)
    if unavailable is not None:
        print(f"ssim_gpu_check: {unavailable} ({_extension.EXTENSION_ERROR or 'built without CUDA'})")
        return 1
    start = time.perf_counter()
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    failures = check_correctness(seed)
    if DEVICE == "cuda":
        with cuda_backward("strip"):
            print("\ncorrectness with the strip backward kernel (EPBAN_SSIM_CUDA_BACKWARD=strip)")
            failures += check_correctness(seed)
    if args.strip_sweep and DEVICE == "cuda":
        failures += strip_sweep()
    if not args.skip_timings and DEVICE == "cuda":
        breakdown()
        timings()
    print(f"\nssim_gpu_check: {'FAILED' if failures else 'passed'} in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
