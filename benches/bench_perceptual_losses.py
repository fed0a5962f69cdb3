"""What the Efficient-PBAN loss costs next to the perceptual losses SR practitioners know.

One training step of each loss: forward, then backward to the SR image (the networks are
frozen: no weight gradients), side by side in one run. Rows:

- ``PBANLoss``: the full-size Efficient-PBAN (``PBANConfig.official()``, random weights),
  plain (``epban.PBANLoss(model)``: the model's forward), in the loss mode in float32
  (``loss_mode={"dtype": torch.float32}``), and on CUDA in the loss mode in bfloat16, eager
  and with CUDA graphs;
- ``VGG19 perceptual``: BasicSR's ``PerceptualLoss`` as Real-ESRGAN configures it, written out
  here (BasicSR is not a dependency): torchvision's VGG19 up to conv5_4, ImageNet input
  normalisation, features taken before the ReLU at conv1_2, conv2_2, conv3_4, conv4_4 and
  conv5_4 with weights 0.1, 0.1, 1, 1, 1, an L1 criterion on each, and the HR features
  computed with no gradient. ESRGAN's configuration (conv5_4 alone) runs the same layers;
- ``LPIPS-VGG``, ``LPIPS-Alex``: the ``lpips`` package (``normalize=True`` for [0, 1] images),
  its bundled linear layers, the trunk built with random weights (``pnet_rand=True``);
- ``DISTS``: the ``DISTS_pytorch`` package, its bundled alpha and beta, its VGG16 built with
  random weights (the package asks torchvision for ImageNet weights; that download is
  replaced by an untrained VGG16 while the model is made);
- ``SSIM (epban)``: ``epban.SSIMLoss()``, 1 - SSIM with the fused kernel where it serves.

Nothing is downloaded; timings do not depend on the weights' values. The "weights" column
says what each row's weights are: ``package`` (shipped in the wheel), ``random``, or
``none``. The "+ graph" rows capture the whole step (forward and backward) in one CUDA graph
and replay it.

GFLOP: the step's convolutions and matrix products as ``torch.utils.flop_counter`` counts
them in the first (untimed) step; custom ops (torchvision's deformable convolution, the loss
mode's fused kernels, SSIM) are not counted, so it is a floor ("-": not counted).

Timing: on CUDA, each row in turn, by CUDA events, after its first step. On the CPU (a
machine that may be shared), all rows are built in one process and their steps interleaved,
one step of each row per round (``--rounds``), so that load from elsewhere falls on every
row alike; the median is reported, the samples are logged, and "vs LPIPS-VGG" is the median
of the per-round ratios.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the timed steps, less the
inputs (so the loss's weights, what its steps keep, and the step's activations and
gradients). On the CPU each row runs once more in a process of its own (its first step and
one more) and reports its peak resident set (Linux's VmHWM, reset before the row is built)
less its resident set then and the inputs' size (weights included, the allocator's caching
too: a rough figure).

    pytest benches/bench_perceptual_losses.py --benchmark-only      (pytest-benchmark rows; on
        the CPU at 1x3x64x64 with the tiny network)
    python benches/bench_perceptual_losses.py                        (table: CUDA sizes on a
        GPU; on the CPU the --quick size 4x3x128x128 unless --sizes is given)
    python benches/bench_perceptual_losses.py --sizes 16x256x256,1x1024x1024 [--rows "LPIPS-VGG,DISTS"]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.resources
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timing import cuda_graph_replay

import epban

SIZES = [(16, 256, 256), (1, 1024, 1024)]
QUICK_SIZE = (4, 128, 128)
PYTEST_CPU_SIZE = (1, 64, 64)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# BasicSR's torchvision VGG19 feature indices of the layers the loss reads (before the ReLU).
VGG19_CONV_INDEX = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}
REALESRGAN_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}


class VGGPerceptualLoss(nn.Module):
    """BasicSR's ``PerceptualLoss`` (perceptual weight 1, no style term, L1 criterion) over
    its ``VGGFeatureExtractor`` (VGG19, ``use_input_norm=True``, ``range_norm=False``): each
    chosen layer's output before its ReLU, copied as BasicSR does (the ReLUs run in place)."""

    def __init__(self, layer_weights=None):
        super().__init__()
        import torchvision

        self.layer_weights = dict(layer_weights or REALESRGAN_LAYER_WEIGHTS)
        last = max(VGG19_CONV_INDEX[name] for name in self.layer_weights)
        self.features = torchvision.models.vgg19(weights=None).features[: last + 1].eval().requires_grad_(False)
        self.taps = {VGG19_CONV_INDEX[name]: name for name in self.layer_weights}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def extract(self, x):
        x = (x - self.mean) / self.std
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out[self.taps[i]] = x.clone()
        return out

    def forward(self, sr, hr):
        f_sr = self.extract(sr)
        with torch.no_grad():
            f_hr = self.extract(hr.detach())
        loss = sr.new_zeros(())
        for name, weight in self.layer_weights.items():
            loss = loss + weight * F.l1_loss(f_sr[name], f_hr[name])
        return loss


# ----------------------------------------------------------------------------- the rows
def _pban_model(preset: str, device):
    torch.manual_seed(0)
    return epban.EfficientPBAN(epban.PBANConfig.preset(preset)).eval().to(device)


def _lpips(net: str):
    import lpips

    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=False
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    model.eval().requires_grad_(False)
    return lambda sr, hr: model(sr, hr, normalize=True).mean(), model


@contextlib.contextmanager
def _untrained_vgg16(dists_module):
    """The DISTS module's ``models.vgg16(pretrained=True)`` made an untrained VGG16 (no download)."""
    import torchvision

    class Models:
        @staticmethod
        def vgg16(*args, **kwargs):
            return torchvision.models.vgg16(weights=None)

    saved = dists_module.models
    dists_module.models = Models
    try:
        yield
    finally:
        dists_module.models = saved


def _dists():
    from DISTS_pytorch import DISTS_pt

    with _untrained_vgg16(DISTS_pt):
        model = DISTS_pt.DISTS(load_weights=False)
    weights_file = importlib.resources.files("DISTS_pytorch") / "weights.pt"
    with importlib.resources.as_file(weights_file) as path:
        weights = torch.load(path, map_location="cpu")
    model.alpha.data, model.beta.data = weights["alpha"], weights["beta"]
    model.eval().requires_grad_(False)
    return lambda sr, hr: model(sr, hr, require_grad=True, batch_average=True), model


def _pban(preset: str, device, loss_mode):
    loss = epban.PBANLoss(_pban_model(preset, device), loss_mode=loss_mode)
    return loss, loss


# name -> (weights label, builder(device, preset) -> (loss(sr, hr) -> scalar, module holding its weights))
ROWS = {
    "PBANLoss fp32": ("random", lambda d, p: _pban(p, d, False)),
    "PBANLoss loss mode fp32": ("random", lambda d, p: _pban(p, d, {"dtype": torch.float32})),
    "PBANLoss loss mode bf16": ("random", lambda d, p: _pban(p, d, {"dtype": torch.bfloat16})),
    "PBANLoss loss mode bf16 + graph": (
        "random", lambda d, p: _pban(p, d, {"dtype": torch.bfloat16, "cuda_graph": True})),
    "VGG19 perceptual (BasicSR)": ("random", lambda d, p: (lambda m: (m, m))(VGGPerceptualLoss().to(d))),
    "LPIPS-VGG": ("package lins, random trunk", lambda d, p: _to(_lpips("vgg"), d)),
    "LPIPS-Alex": ("package lins, random trunk", lambda d, p: _to(_lpips("alex"), d)),
    "DISTS": ("package alpha/beta, random VGG16", lambda d, p: _to(_dists(), d)),
    "SSIM (epban)": ("none", lambda d, p: (lambda m: (m, m))(epban.SSIMLoss())),
}
WEIGHTS = {name: label for name, (label, _) in ROWS.items()}
CUDA_ONLY = {"PBANLoss loss mode bf16", "PBANLoss loss mode bf16 + graph"}
# Rows also captured whole in a CUDA graph on CUDA (the PBAN loss mode captures its own).
GRAPHABLE = ["VGG19 perceptual (BasicSR)", "LPIPS-VGG", "LPIPS-Alex", "DISTS", "SSIM (epban)"]


def _to(pair, device):
    loss, module = pair
    module.to(device)
    return loss, module


def row_names(device: str) -> list[str]:
    names = [n for n in ROWS if device == "cuda" or n not in CUDA_ONLY]
    if device == "cuda":
        names += [f"{n} + graph" for n in GRAPHABLE]
    return names


def build(name: str, device: str, preset: str = "official"):
    """``(loss(sr, hr) -> scalar, module, graphed)`` for a row name (``"<row> + graph"``: the
    row's whole step captured in a CUDA graph by the timing loop)."""
    graphed = name.endswith(" + graph") and name[: -len(" + graph")] in GRAPHABLE
    base = name[: -len(" + graph")] if graphed else name
    if base not in ROWS:
        raise ValueError(f"unknown row {name!r}; expected one of {row_names('cuda')}")
    loss, module = ROWS[base][1](device, preset)
    return loss, module, graphed


def inputs(size, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, w = size
    hr = torch.rand(b, 3, h, w, generator=g)
    sr = (hr + 0.05 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return sr.to(device).requires_grad_(), hr.to(device)


def make_step(loss, sr, hr):
    def step():
        sr.grad = None
        loss(sr, hr).backward()

    return step


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Sets VmHWM to the current resident set (Linux). getrusage's maxrss is not used: it keeps
    the parent's peak across fork and exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def prepare(name, size, device, preset="official"):
    """Builds a row and runs its first step (JIT compiles, cuDNN autotuning, the loss mode's
    own graph capture, the first-batch range check), counting its FLOPs outside any graph
    capture; a "+ graph" row is then captured. Returns ``(step, flops or None)``."""
    sr, hr = inputs(size, device)
    loss, _, graphed = build(name, device, preset)
    step = make_step(loss, sr, hr)
    flops = None
    if graphed or "graph" in name.split():
        step()
    else:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    if graphed:
        step = cuda_graph_replay(step)
    if device == "cuda":
        torch.cuda.synchronize()
    return step, flops


def timed_ms(step, device) -> float:
    """The time of one call of ``step`` (CUDA: by events on the device)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    step()
    return 1e3 * (time.perf_counter() - t)


def time_row_cuda(name, size, *, preset="official", min_reps=3, max_reps=20, target_s=1.0):
    """Median ms per step, peak MiB (see the module docstring) and FLOPs of one row on CUDA."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() + 2 * 3 * size[0] * size[1] * size[2] * 4  # + the inputs made next
    t = time.perf_counter()
    step, flops = prepare(name, size, "cuda", preset)
    est = max(time.perf_counter() - t, 1e-4)
    torch.cuda.reset_peak_memory_stats()  # the steady step's peak, not the first step's autotuning
    reps = max(min_reps, min(max_reps, int(target_s / est)))
    times = [timed_ms(step, "cuda") for _ in range(reps)]
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak, flops


def cpu_peak_row(name, size, preset="official"):
    """Peak MiB above the resident set after making the inputs, over the first step and one
    more, and the FLOPs; meant to run in a process of its own (``--memory-row``)."""
    sr_hr_mib = 2 * 3 * size[0] * size[1] * size[2] * 4 / 2**20
    gc.collect()
    _reset_peak_rss()
    base = _status_mib("VmRSS") + sr_hr_mib  # the inputs are made in prepare()
    step, flops = prepare(name, size, "cpu", preset)
    step()
    return _status_mib("VmHWM") - base, flops


def cpu_peak_in_subprocess(name, size, preset, timeout_s):
    """``cpu_peak_row`` in a fresh process, so that the peak resident set is the row's own."""
    cmd = [sys.executable, __file__, "--memory-row", name, "--sizes", "x".join(map(str, size)), "--preset", preset]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"over {timeout_s} s") from None
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["peak"], out["flops"]


def time_rows_interleaved(names, size, *, preset="official", rounds=3, log=print):
    """Median ms per step of each row on the CPU, the rows' steps interleaved round by round
    (each round starting one row later), so that a load that comes and goes on a shared
    machine falls on every row alike. Returns ``{name: (median ms, [ms...])}``."""
    steps = {}
    for name in names:
        try:
            steps[name] = prepare(name, size, "cpu", preset)[0]
        except Exception as exc:  # one failing row must not hide the others
            log(f"{size} {name}: FAILED {type(exc).__name__}: {exc}")
    order = list(steps)
    times = {name: [] for name in order}
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            times[name].append(timed_ms(steps[name], "cpu"))
        log(f"{size} round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}")
    return {name: (statistics.median(t), t) for name, t in times.items()}


def _sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without an exponent."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def _ratio(row, reference) -> float:
    """``row``'s time over ``reference``'s: the median of the per-round ratios where both were
    timed in the same interleaved rounds (CPU), else the ratio of the medians."""
    a, b = row.get("samples"), reference.get("samples")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return row["ms"] / reference["ms"]


def table(rows, device_name: str, preset: str) -> str:
    out = [f"Perceptual losses, forward + backward to sr per step, {device_name}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads; PBAN preset {preset!r}",
           "",
           "| input | loss | weights | ms | MP/s | GFLOP | peak MiB | vs LPIPS-VGG |",
           "|---|---|---|---|---|---|---|---|"]
    lpips = {r["size"]: r for r in rows if r["name"] == "LPIPS-VGG"}
    for r in rows:
        b, h, w = r["size"]
        mp_s = b * h * w / 1e6 / (r["ms"] / 1e3)
        ratio = f"{_sig(_ratio(r, lpips[r['size']]))}x" if r["size"] in lpips else "-"
        peak = f"{r['peak']:.0f}" if r["peak"] is not None else "n/a"
        gflop = _sig(r["flops"] / 1e9) if r.get("flops") else "-"
        base = r["name"].removesuffix(" + graph")
        out.append(f"| {b}x3x{h}x{w} | {r['name']} | {WEIGHTS[base]} | {_sig(r['ms'])} | {_sig(mp_s)} | {gflop} "
                   f"| {peak} | {ratio} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- pytest-benchmark
def _case_id(name, device, size):
    return "-".join([re.sub(r"[^\w+.]+", "-", name).strip("-"), device, "x".join(map(str, size))])


def _cases():
    cases = [pytest.param("cpu", PYTEST_CPU_SIZE, n, id=_case_id(n, "cpu", PYTEST_CPU_SIZE)) for n in row_names("cpu")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", s, n, id=_case_id(n, "cuda", s), marks=pytest.mark.cuda)
                  for s in SIZES for n in row_names("cuda")]
    return cases


@pytest.mark.parametrize("device, size, name", _cases())
def test_perceptual_loss(benchmark, device, size, name):
    pytest.importorskip("lpips")
    pytest.importorskip("DISTS_pytorch")
    preset = "official" if device == "cuda" else "tiny"
    loss, _, graphed = build(name, device, preset)
    sr, hr = inputs(size, device)
    step = make_step(loss, sr, hr)
    step()
    if graphed:
        step = cuda_graph_replay(step)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        step()
        sync()

    benchmark.group = f"perceptual losses {device} {'x'.join(map(str, size))}"
    benchmark.extra_info.update(weights=WEIGHTS[name.removesuffix(" + graph")],
                                megapixels=size[0] * size[1] * size[2] / 1e6)
    benchmark.pedantic(timed, rounds=5 if device == "cuda" else 2, warmup_rounds=1)


def _parse_sizes(text):
    return [tuple(int(v) for v in s.split("x")[-3:]) for s in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_parse_sizes, default=None,
                        help="BxHxW or Bx3xHxW, comma-separated (default: 16x256x256,1x1024x1024 on CUDA, "
                             "the --quick size on the CPU)")
    parser.add_argument("--quick", action="store_true", help=f"{'x'.join(map(str, QUICK_SIZE))} only")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all for the device)")
    parser.add_argument("--preset", default="official", help="the PBAN network: official (full size) or tiny")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: timed steps per row, interleaved")
    parser.add_argument("--timeout", type=float, default=1800, help="CPU: seconds per row's memory run")
    parser.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_row is not None:  # a CPU row's peak memory in its own process: print its JSON line
        peak, flops = cpu_peak_row(args.memory_row, args.sizes[0], args.preset)
        print(json.dumps(dict(peak=peak, flops=flops)))
        return
    if args.quick or (args.sizes is None and device == "cpu"):
        sizes = [QUICK_SIZE]
    else:
        sizes = args.sizes or SIZES
    names = args.rows.split(",") if args.rows else row_names(device)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for size in sizes:
        if device == "cuda":
            for name in names:
                try:
                    ms, peak, flops = time_row_cuda(name, size, preset=args.preset)
                except Exception as exc:  # one failing row must not hide the others
                    log(f"{size} {name}: FAILED {type(exc).__name__}: {exc}")
                    continue
                rows.append(dict(size=size, name=name, ms=ms, peak=peak, flops=flops))
                log(f"{size} {name}: {ms:.2f} ms, peak {peak:.0f} MiB")
            continue
        measured = {}
        for name in names:
            try:
                measured[name] = cpu_peak_in_subprocess(name, size, args.preset, args.timeout)
            except Exception as exc:
                log(f"{size} {name}: FAILED {type(exc).__name__}: {exc}")
                continue
            log(f"{size} {name}: peak {measured[name][0]:.0f} MiB, load average {os.getloadavg()[0]:.1f}")
        timed = time_rows_interleaved(list(measured), size, preset=args.preset, rounds=args.rounds, log=log)
        for name, (ms, samples) in timed.items():
            peak, flops = measured[name]
            rows.append(dict(size=size, name=name, ms=ms, peak=peak, flops=flops, samples=samples))
            log(f"{size} {name}: median {ms:.1f} ms of {[round(t) for t in samples]}")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(table(rows, name, args.preset))


if __name__ == "__main__":
    main()
