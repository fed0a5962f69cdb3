"""GPU check of the fused axial attention: correctness against the reference, then timings.

    python scripts/dev/axial_gpu_check.py [--quick] [--no-timing] [--extra] [--sweep] [--no-warm]
    python scripts/dev/axial_gpu_check.py --dry-run     (CPU, Triton interpreter: tests this script)

1. Correctness (exit status 1 on any failure): forward and q/k/v gradients of the fused
   kernels (both directions of the block through ``bi_axial_attention``) against the
   float64 reference, both sigma scopes, float32 and bfloat16, odd shapes, C=256 and
   1x256x135x240, with every buffer the op allocates poisoned with NaN
   (``epban.testing.poisoned_allocations``).
2. Timings of forward+backward of both directions: reference, fused (float32 with ieee and
   tf32x3 dots, NCHW and channels_last; bfloat16 channels_last, the resident-tile path), and
   scaled_dot_product_attention on the same row and column tokens (a different function:
   a speed yardstick only). Median of triton.testing.do_bench, peak memory over the
   inputs, and a markdown table. ``--extra`` adds bfloat16 NCHW and "tf32" rows (more JIT
   compiles); ``--sweep`` times tile configurations (about 20 s of compiles per
   configuration); ``--profile`` prints each kernel's device time and a sweep.

The default run compiles about 30 kernel variants, first in 4 parallel processes (Triton's
on-disk cache; the CUDA tests warm the same variants); it is sized to stay under 90 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--dry-run" in sys.argv:  # the interpreter must be on before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from epban.ops import axial_attention as ops  # noqa: E402
from epban.testing import poisoned_allocations  # noqa: E402

TARGETS_MS = {(1, 256, 64, 64): 0.15, (1, 256, 128, 128): 0.30, (16, 256, 16, 16): 0.15, (1, 256, 135, 240): 0.50}
REFERENCE_ISSUE_MS = {(1, 256, 64, 64): 3.31, (1, 256, 128, 128): 3.22, (16, 256, 16, 16): 3.15,
                      (1, 256, 135, 240): 6.22}
# Shapes chosen to share compiled variants (tiles of 16 or 32 positions, C=256) with the timings.
CHECK_CASES = [  # shape, scope, dtype, input scale[, channels_last inputs]
    ((3, 256, 7, 13), "sample", torch.float32, 0.1),
    ((3, 256, 13, 7), "batch", torch.float32, 0.1, True),
    ((2, 256, 33, 47), "sample", torch.bfloat16, 0.1, True),
    ((3, 256, 13, 7), "batch", torch.float32, 0.1),
    ((2, 256, 40, 1), "sample", torch.float32, 0.1),
    ((2, 256, 33, 47), "batch", torch.bfloat16, 0.1),
    ((1, 256, 135, 240), "sample", torch.float32, 0.1),
    ((1, 256, 135, 240), "batch", torch.bfloat16, 0.1),
]
# One run per compiled variant family, in parallel subprocesses before the checks, so the
# Triton JIT (single-threaded per kernel) fills its on-disk cache on several cores.
WARM_CASES = [((1, 256, 7, 13), torch.float32), ((1, 256, 40, 1), torch.float32),
              ((1, 256, 33, 47), torch.float32), ((1, 256, 33, 47), torch.bfloat16)]
# Tile configurations timed by --sweep (tf32x3 dots, the CUDA default; "precision" picks another;
# "layout": "channels_last" makes the inputs channels_last, which the kernels read as they are;
# the other keys override entries of epban.ops.axial_attention.CONFIG).
# Under Triton 3.6 on sm90, channels_last with 4 warps is the first layout/warp combination
# where no kernel spills at 2-3 programs per SM (python -m epban.testing.kernel_resources).
SWEEP = [
    dict(precision="tf32x3", layout="channels_last"),
    dict(precision="tf32", layout="channels_last"),
    dict(dtype="bf16"),
    dict(dtype="bf16", layout="channels_last"),
    # the general tile loops where the one-tile kernels serve by default (16x16 and 64x64 in bf16)
    dict(dtype="bf16", layout="channels_last", single_tile=False),
    dict(precision="tf32x3", layout="channels_last", single_tile=False),
    # 16-position tiles (16x16 maps) leave 8 warps little to share
    dict(dtype="bf16", layout="channels_last", num_warps=4),
    # float32 (the issue's targets) in one tile at 64x64: chunked tiles of 64 (sm90, Triton 3.6:
    # 188 / 1112 / 1448 spill bytes in the forward / dv / dq+dk kernels, against 0 / 68 / 48 at 32)
    dict(precision="tf32x3", layout="channels_last", block_row=64, block_col=64),
]
SWEEP_SHAPES = [(16, 256, 16, 16), (1, 256, 64, 64), (1, 256, 128, 128), (1, 256, 135, 240)]


DEVICE = "cuda"


def _split_config(cfg):
    """A sweep entry -> (precision, channels_last inputs, the plan's CONFIG overrides)."""
    cfg = dict(cfg)
    precision = cfg.pop("precision", "tf32x3")
    layout = cfg.pop("layout", "nchw")
    cfg.pop("dtype", None)  # read by _sweep_dtype
    return precision, layout == "channels_last", cfg


def _sweep_dtype(cfg):
    return torch.bfloat16 if cfg.get("dtype") == "bf16" else torch.float32


def _inputs(shape, dtype, scale, seed=0, channels_last=False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(scale * torch.randn(shape, generator=g, device=DEVICE)).to(dtype).contiguous(memory_format=fmt)
            .requires_grad_() for _ in range(6)]


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item(), (a - b).abs().max().item()


def check_case(shape, scope, dtype, scale, channels_last=False, precision=None):
    """Both directions through the fused op (``precision``: its float32 dots, default the op's)."""
    x = _inputs(shape, dtype, scale, channels_last=channels_last)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    grads = [torch.randn(shape, generator=g, device=DEVICE) for _ in range(2)]
    q1, k1, v1, q2, k2, v2 = x
    with poisoned_allocations():
        outs = ops.fused_axial_attention(q1, k2, v1, q2, k1, v2, sigma_scope=scope, precision=precision)
        got = torch.autograd.grad(outs, x, [gr.to(dtype) for gr in grads])
    xr = [t.detach().double().requires_grad_() for t in x]
    refs = ops.bi_axial_attention(*xr, sigma_scope=scope, backend="reference")
    want = torch.autograd.grad(refs, xr, [gr.double() for gr in grads])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    worst, report = 0.0, []
    for name, a, b in zip(["out1", "out2", "dq1", "dk1", "dv1", "dq2", "dk2", "dv2"], [*outs, *got], [*refs, *want]):
        rel, abs_ = _rel_err(a, b)
        finite = bool(torch.isfinite(a).all())
        worst = max(worst, rel if finite else float("inf"))
        report.append(f"{name} {rel:.1e}")
    ok = worst <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {str(shape):20s} {scope:6s} {str(dtype)[6:]:8s}"
          f"{' channels_last' if channels_last else ''} worst rel-L2 {worst:.2e}"
          f" (tol {tol:.0e}): " + ", ".join(report), flush=True)
    return ok


def _sdpa_axial(q, k, v):
    B, C, H, W = q.shape
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(B * H, 1, W, C)  # noqa: E731
    cols = lambda t: t.permute(0, 3, 2, 1).reshape(B * W, 1, H, C)  # noqa: E731
    row = F.scaled_dot_product_attention(rows(q), rows(k), rows(v)).reshape(B, H, W, C).permute(0, 3, 1, 2)
    col = F.scaled_dot_product_attention(cols(q), cols(k), cols(v)).reshape(B, W, H, C).permute(0, 3, 2, 1)
    return 0.5 * (row + col)


def _fused(precision="ieee", config=None):
    """bi_axial_attention's fused path with these float32 dots and CONFIG overrides."""

    def run(q1, k1, v1, q2, k2, v2):
        old_config = dict(ops.CONFIG)
        ops.CONFIG.update(config or {})
        try:
            return ops.fused_axial_attention(q1, k2, v1, q2, k1, v2, precision=precision)
        finally:
            ops.CONFIG.clear()
            ops.CONFIG.update(old_config)
    return run


def _impls(extra):
    impls = [
        ("reference fp32", torch.float32, lambda *t: ops.bi_axial_attention(*t, backend="reference")),
        ("fused fp32 (ieee dots)", torch.float32, _fused("ieee")),
        ("fused fp32 (tf32x3 dots)", torch.float32, _fused("tf32x3")),
        # inputs (and upstream gradients) in channels_last, read through their strides: the loss mode's case
        ("fused fp32 channels_last (tf32x3 dots)", torch.float32, _fused("tf32x3")),
    ]
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    # the loss mode's case, and the kernels' resident-tile path
    impls.append(("fused bf16 channels_last", half, _fused("ieee")))
    if extra:
        impls += [("fused bf16", half, _fused("ieee")), ("fused fp32 channels_last (tf32 dots)", torch.float32,
                                                         _fused("tf32"))]
    impls.append(("SDPA fp32 (different function)", torch.float32,
                  lambda q1, k1, v1, q2, k2, v2: (_sdpa_axial(q1, k2, v1), _sdpa_axial(q2, k1, v2))))
    return impls


def time_case(shape, name, dtype, fn):
    """(median ms of forward+backward, forward peak MiB, forward+backward peak MiB); peaks are
    over the inputs and upstream gradients, so they include the outputs and the input gradients."""
    import triton.testing

    channels_last = "channels_last" in name
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _inputs(shape, dtype, 0.1, channels_last=channels_last)
    grads = [torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]

    def step():
        torch.autograd.backward(fn(*x), grads)

    step()
    if DEVICE == "cpu":  # --dry-run: exercise the code path, no meaningful numbers
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3, 0.0, 0.0
    for t in x:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = fn(*x)
    torch.cuda.synchronize()
    fwd_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    torch.autograd.backward(outs, grads)
    del outs
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, warmup=10, rep=60, grad_to_none=x, return_mode="median")
    return ms, fwd_peak, peak


def _warm(index):
    shape, dtype = WARM_CASES[index]
    x = _inputs(shape, dtype, 0.1)
    torch.autograd.backward(ops.bi_axial_attention(*x, backend="fused"), [torch.ones_like(x[0])] * 2)
    torch.cuda.synchronize()
    return 0


def _warm_config(cfg_json):
    """Compile one sweep configuration's kernels (a subprocess of --profile)."""
    import json

    precision, channels_last, cfg = _split_config(json.loads(cfg_json))
    fn = _fused(precision, cfg)
    for shape in ((1, 256, 64, 64), (2, 256, 16, 16)):
        x = _inputs(shape, _sweep_dtype(json.loads(cfg_json)), 0.1, channels_last=channels_last)
        torch.autograd.backward(fn(*x), [torch.ones_like(x[0])] * 2)
    torch.cuda.synchronize()
    return 0


def _kernel_profile(shape, fn, iters=5, dtype=torch.float32, channels_last=False):
    """{kernel name: device us per fwd+bwd}, host us to issue one fwd+bwd, device us per fwd+bwd."""
    from torch.profiler import ProfilerActivity, profile

    x = _inputs(shape, dtype, 0.1, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grads = [torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]

    def step():
        torch.autograd.backward(fn(*x), grads)
        for t in x:
            t.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # host time: issue 20 steps behind a long sleep kernel, so the queue never blocks the host
    torch.cuda._sleep(int(5e8))
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    host_us = (time.perf_counter() - t0) / 20 * 1e6
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if DEVICE == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.key_averages():
        dev = getattr(ev, "device_time_total", None)
        if dev is None:
            dev = ev.cuda_time_total
        if dev > 0 and ev.count >= iters:
            per[ev.key] = (dev / iters, ev.count // iters)
    return per, host_us


def _profile(args):
    """Where the fused path's time goes, and a tile-configuration sweep (for kernel work)."""
    import json
    import subprocess

    import triton
    import triton.testing

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--warm-config", json.dumps(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cfg in [{}] + SWEEP]
    for cfg, proc in zip([{}] + SWEEP, procs):
        out, _ = proc.communicate(timeout=240)
        if proc.returncode != 0:
            print(f"config {cfg} failed to compile/run:\n{out[-1500:]}")
    print(f"compiled {len(procs)} configurations in parallel: {time.time() - t0:.1f} s", flush=True)
    default = _fused("tf32x3")
    profiled = _fused("tf32x3")
    for shape in SWEEP_SHAPES:  # the loss mode's case: bfloat16, channels_last
        per, host_us = _kernel_profile(shape, profiled, dtype=torch.bfloat16, channels_last=True)
        print(f"\n## profile {shape} fused bf16, channels_last: host issue {host_us:.0f} us/iter; "
              f"device kernels {sum(us for us, _ in per.values()):.0f} us/iter (sum of rows below, incl. nested)")
        for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:14]:
            print(f"  {us:9.1f} us  x{n:<3d} {name[:110]}")
    print("\n## sweep (fwd+bwd both directions, median ms: eager do_bench / CUDA-graph replay, the loss "
          "mode's case)", flush=True)
    runs = [("reference", False, torch.float32, lambda *t: ops.bi_axial_attention(*t, backend="reference")),
            ("default tf32x3", False, torch.float32, default)]
    for cfg in SWEEP:
        precision, channels_last, kernel_cfg = _split_config(cfg)
        runs.append((",".join(f"{k}={v}" for k, v in cfg.items()), channels_last, _sweep_dtype(cfg),
                     _fused(precision, kernel_cfg)))
    print("| config | " + " | ".join(",".join(map(str, s)) for s in SWEEP_SHAPES) + " |")
    print("|---|" + "---|" * len(SWEEP_SHAPES))
    for name, channels_last, dtype, fn in runs:
        cells = []
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for shape in SWEEP_SHAPES:
            x = _inputs(shape, dtype, 0.1, channels_last=channels_last)
            grads = [torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]
            try:
                ms = triton.testing.do_bench(lambda: torch.autograd.backward(fn(*x), grads), warmup=5, rep=25,
                                             grad_to_none=x, return_mode="median")
            except Exception as exc:  # a configuration that does not compile for this shape
                cells.append(f"error {type(exc).__name__}")
                continue
            try:  # replayed from a CUDA graph: device time, as the loss mode pays it
                graph_ms = triton.testing.do_bench_cudagraph(lambda: torch.autograd.grad(fn(*x), x, grads), rep=25,
                                                             return_mode="median")
                cells.append(f"{ms:.3f} / {graph_ms:.3f}")
            except Exception as exc:
                cells.append(f"{ms:.3f} / graph error {type(exc).__name__}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nprofile + sweep in {time.time() - t0:.1f} s")
    return 0


def _warm_in_parallel():
    import subprocess

    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--warm", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(len(WARM_CASES))]
    for i, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"warm-up {WARM_CASES[i]} failed (the checks below will say why):\n{out[-2000:]}")
    print(f"JIT warm-up in {len(procs)} processes: {time.time() - t0:.1f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first two correctness cases, no timing")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--extra", action="store_true", help="also time bfloat16 NCHW and tf32-dot fused rows")
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations of the fused fp32 path")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on tiny CPU tensors under TRITON_INTERPRET=1 (tests this script)")
    parser.add_argument("--no-warm", action="store_true", help="compile in this process only")
    parser.add_argument("--profile", action="store_true",
                        help="only: per-kernel device times, host issue time, and the --sweep table")
    parser.add_argument("--sweep-configs", help="JSON list of configurations for --profile / --sweep "
                        "(default: SWEEP), e.g. '[{\"num_warps\": 4}]'")
    parser.add_argument("--warm", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warm-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm is not None:
        return _warm(args.warm)
    if args.warm_config is not None:
        return _warm_config(args.warm_config)
    if args.sweep_configs:
        import json

        global SWEEP
        SWEEP = json.loads(args.sweep_configs)
    if args.profile:
        return _profile(args)
    if args.dry_run:
        return _dry_run(args)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1
    if not ops.fused_axial_available("cuda"):
        print(f"fused axial attention unavailable: {ops._unavailable_reason('cuda')}")
        return 1
    import triton

    device = torch.cuda.get_device_name()
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    if not args.no_warm:
        _warm_in_parallel()
    return _run(args, CHECK_CASES, {shape: shape for shape in TARGETS_MS}, device)


def _dry_run(args):
    global DEVICE, SWEEP
    DEVICE = "cpu"
    SWEEP = SWEEP[-1:]
    cases = [((2, 5, 7, 13), "sample", torch.float32, 1.0), ((2, 5, 13, 1), "batch", torch.float32, 1.0),
             ((2, 5, 6, 9), "batch", torch.float32, 1.0, True)]
    return _run(args, cases, {(1, 256, 64, 64): (1, 8, 6, 5)}, "CPU (dry run under the Triton interpreter)")


def _run(args, check_cases, timing_shapes, device):
    """timing_shapes: {shape named in the table: shape actually run} (they differ only in a dry run)."""
    t0 = time.time()
    cases = check_cases[:2] if args.quick else check_cases
    ok = all([check_case(*case) for case in cases])
    print(f"correctness: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.1f} s incl. JIT)", flush=True)
    if args.extra:  # informational: how close tensor-core fp32 dots come to the fp64 reference
        print("with tf32x3 dots (does not affect the exit status):")
        shape, scope, dtype, scale, *rest = cases[-2]
        check_case(shape, scope, dtype, scale, *(rest or [False]), precision="tf32x3")
    if args.quick or args.no_timing:
        return 0 if ok else 1

    runs = [(name, dtype, fn) for name, dtype, fn in _impls(args.extra)]
    if args.sweep:
        # (a "layout=channels_last" entry's name makes time_case give it channels_last inputs)
        for cfg in SWEEP:
            precision, _, kernel_cfg = _split_config(cfg)
            runs.append(("fused " + ",".join(f"{k}={v}" for k, v in cfg.items()), torch.float32,
                         _fused(precision, kernel_cfg)))
    rows = []
    for shape, run_shape in timing_shapes.items():
        for name, dtype, fn in runs:
            ms, fwd_peak, peak = time_case(run_shape, name, dtype, fn)
            rows.append((shape, name, ms, fwd_peak, peak))
            print(f"{str(shape):20s} {name:32s} {ms:8.3f} ms  fwd {fwd_peak:7.1f} MiB  fwd+bwd {peak:7.1f} MiB",
                  flush=True)
    print(f"\n{device}, forward+backward of both directions, median of do_bench. Peaks: max allocated over "
          "the inputs and upstream gradients, during the forward (outputs included) and during forward+backward "
          "(the 6 input gradients included: 6 x B*C*H*W*4 bytes for float32, whatever the implementation). "
          "SDPA computes a different function (textbook attention over the same tokens): a speed yardstick "
          "only.\n")
    print("| (B,C,H,W) | implementation | ms | fwd peak MiB | fwd+bwd peak MiB | target ms | reference in issue 4 |")
    print("|---|---|---|---|---|---|---|")
    for shape, name, ms, fwd_peak, peak in rows:
        print(f"| {','.join(map(str, shape))} | {name} | {ms:.3f} | {fwd_peak:.0f} | {peak:.0f} |"
              f" {TARGETS_MS[shape]} | {REFERENCE_ISSUE_MS[shape]} ms |")
    print(f"\ncorrectness {'PASS' if ok else 'FAIL'}; total {time.time() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
