"""The whole Efficient-PBAN loss: forward + backward to the SR input, reference vs loss mode.

Rows: the model's reference path (torchvision deformable conv, reference attention) in eager
float32; the model with its fused ops ("auto"); the loss mode (``pban_for_loss``) in float32
and bfloat16, eager and CUDA graphs, float32 with the deformable convolution's dots in
tf32x3, and bf16 + graph with PyTorch's conv epilogues instead of the fused ones
(``fused_epilogue=False``). A variant's further words turn one loss-mode option off for A/B
rows in one run (``SWITCH_WORDS``). Columns: median ms, megapixels per second (B * H * W of
the input), peak memory (weights + inputs + step). The official architecture with random
weights (timings do not depend on the values).

    pytest benches/bench_pban_loss.py --benchmark-only        (pytest-benchmark rows)
    python benches/bench_pban_loss.py [--sizes 16x256x256,1x1024x1024] [--variants "loss bf16 graph,..."]

CUDA timings follow the usual defaults (cuDNN may use TF32 for float32 convolutions);
scripts/dev/pban_gpu_check.py checks correctness with TF32 off.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import pytest
import torch

from epban import EfficientPBAN, PBANConfig
from epban.models.loss_mode import pban_for_loss

SIZES = [(16, 256, 256), (1, 512, 512), (1, 1024, 1024), (1, 2048, 2048)]
CPU_SIZES = [(1, 64, 64)]
VARIANTS = ["reference fp32", "auto fp32", "loss fp32", "loss fp32 graph", "loss tf32x3 graph", "loss bf16",
            "loss bf16 graph", "loss bf16 graph unfused-epilogue"]
# A loss variant's words -> the LossModeOptions fields each sets (the default otherwise).
SWITCH_WORDS = {
    "unfused-epilogue": {"fused_epilogue": False},  # PyTorch's bias add, ReLU and residual add
    "unpadded-stem": {"stem_pad": False},  # the stem conv's input gradient on 3 channels
    "separate-gates": {"batch_gates": False},  # one SE call per direction
    "unfused-residual-grad": {"fused_residual_grad": False},  # the ResNet layers' backward left to autograd
    "unfused-stem-pool": {"fused_stem_pool": False},  # bias + ReLU, max_pool2d and their backward apart
    "unfused-input": {"fused_input": False},  # normalisation, cast and layout change as PyTorch's ops
    "cudnn-benchmark": {"cudnn_benchmark": True},  # cuDNN times its algorithms at capture (graph variants)
}
# "looped-attention": the axial attention's general tile loops where its one-tile kernels would
# serve (CONFIG single_tile; set around each call, so in a graph variant around the capture).


def make_model(device, preset="official", seed=0) -> EfficientPBAN:
    torch.manual_seed(seed)
    model = EfficientPBAN(PBANConfig.preset(preset)).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_reference_backends(model, backend: str) -> None:
    """``"reference"``: torchvision deform_conv2d and the reference attention; ``"auto"``: fused where available."""
    model.attention_backend = backend
    for gmdc in (model.block2.br1, model.block2.br2):
        gmdc.backend = backend


def make_variant(name: str, model: EfficientPBAN):
    """A callable ``f(sr, hr) -> scores`` and the module whose weights it holds."""
    if name in ("reference fp32", "auto fp32"):
        backend = name.split()[0]

        def run(sr, hr):
            set_reference_backends(model, backend)
            return model(sr, hr, check_finite=False)

        return run, model
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    set_reference_backends(model, "auto")  # the loss mode inherits the model's backends
    precision = "tf32x3" if "tf32x3" in name else None
    options = dict(dtype=dtype, cuda_graph=_graphed(name), fp32_precision=precision)
    for word in name.split():
        if word not in SWITCH_WORDS and word not in ("loss", "fp32", "bf16", "tf32x3", "graph", "looped-attention"):
            raise ValueError(f"unknown word {word!r} in variant {name!r}")
        options.update(SWITCH_WORDS.get(word, {}))
    scorer = pban_for_loss(model, **options)
    run = scorer
    if "looped-attention" in name.split():
        run = _with_axial_config(run, single_tile=False)
    return run, scorer


def _with_axial_config(f, **config):
    """f with the axial kernels' CONFIG overridden during each call."""

    def run(sr, hr):
        from epban.ops import axial_attention

        saved = dict(axial_attention.CONFIG)
        axial_attention.CONFIG.update(config)
        try:
            return f(sr, hr)
        finally:
            axial_attention.CONFIG.clear()
            axial_attention.CONFIG.update(saved)

    return run


def _graphed(variant: str) -> bool:
    return "graph" in variant.split()


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def inputs(size, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, w = size
    hr = torch.rand(b, 3, h, w, generator=g, device=device)
    sr = (hr + 0.05 * torch.randn(b, 3, h, w, generator=g, device=device)).clamp(0, 1).requires_grad_()
    return sr, hr


def loss_step(f, sr, hr):
    sr.grad = None
    f(sr, hr).sum().backward()


def time_variant(f, module, size, device, *, min_reps=3, max_reps=20, target_s=0.3):
    """Median ms of forward+backward-to-sr, and peak MiB (own weights + inputs + the step's memory)."""
    sr, hr = inputs(size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated() - sr.nbytes - hr.nbytes
    t = time.perf_counter()
    for _ in range(2):  # JIT compiles, cuDNN autotuning, graph capture
        loss_step(f, sr, hr)
    sync()
    est = max((time.perf_counter() - t) / 2, 1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reps = max(min_reps, min(max_reps, int(target_s / est)))
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss_step(f, sr, hr)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            loss_step(f, sr, hr)
            times.append(1e3 * (time.perf_counter() - t))
    peak = None
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base + module_bytes(module)) / 2**20
    return statistics.median(times), peak


def table(rows, device_name: str) -> str:
    out = [f"Efficient-PBAN loss, forward + backward to sr, {device_name}, torch {torch.__version__}",
           "",
           "| input | variant | ms | MP/s | peak MiB | vs reference |",
           "|---|---|---|---|---|---|"]
    ref_ms = {r["size"]: r["ms"] for r in rows if r["variant"] == "reference fp32"}
    for r in rows:
        b, h, w = r["size"]
        mp_s = b * h * w / 1e6 / (r["ms"] / 1e3)
        speedup = f"{ref_ms[r['size']] / r['ms']:.2f}x" if r["size"] in ref_ms else "-"
        peak = f"{r['peak']:.0f}" if r["peak"] is not None else "-"
        out.append(f"| {b}x3x{h}x{w} | {r['variant']} | {r['ms']:.2f} | {mp_s:.1f} | {peak} | {speedup} |")
    return "\n".join(out)


def run_rows(sizes, variants, device, *, deadline=None, log=print):
    """Time every (size, variant) pair; stops starting new ones past ``deadline`` (time.time())."""
    model = make_model(device, "official" if device == "cuda" else "tiny")
    rows = []
    for size in sizes:
        for name in variants:
            if deadline is not None and time.time() > deadline:
                log(f"skipped {name} at {size}: out of time budget")
                continue
            try:
                f, module = make_variant(name, model)
                ms, peak = time_variant(f, module, size, device)
                rows.append(dict(size=size, variant=name, ms=ms, peak=peak))
                choice = getattr(f, "attention_choice", None)
                choice = f" (attention picked: {list(choice.values())})" if choice else ""
                log(f"{size} {name}: {ms:.2f} ms, peak {peak if peak is None else round(peak)} MiB{choice}")
            except Exception as exc:  # one failing row must not hide the others
                log(f"{size} {name}: FAILED {type(exc).__name__}: {exc}")
            finally:
                f = module = None
    set_reference_backends(model, "auto")
    return rows


# ----------------------------------------------------------------------------- pytest-benchmark
def _cases():
    cases = [pytest.param("cpu", s, v, id=f"{v.replace(' ', '-')}-cpu-{'x'.join(map(str, s))}")
             for s in CPU_SIZES for v in ("reference fp32", "loss fp32", "loss bf16")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", s, v, id=f"{v.replace(' ', '-')}-cuda-{'x'.join(map(str, s))}",
                               marks=pytest.mark.cuda)
                  for s in SIZES for v in VARIANTS]
    return cases


_MODELS: dict = {}


@pytest.mark.parametrize("device, size, variant", _cases())
def test_pban_loss(benchmark, device, size, variant):
    if device not in _MODELS:
        _MODELS[device] = make_model(device, "official" if device == "cuda" else "tiny")
    f, _ = make_variant(variant, _MODELS[device])
    sr, hr = inputs(size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        loss_step(f, sr, hr)
        sync()

    step()
    benchmark.extra_info["megapixels"] = size[0] * size[1] * size[2] / 1e6
    benchmark.pedantic(step, rounds=5 if device == "cuda" else 2, warmup_rounds=1)
    set_reference_backends(_MODELS[device], "auto")


def _parse_sizes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_parse_sizes, default=None, help="BxHxW[,BxHxW...]")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = args.sizes or (SIZES if device == "cuda" else CPU_SIZES)
    variants = args.variants.split(",")
    if device == "cpu":
        variants = [v for v in variants if not _graphed(v)]
    rows = run_rows(sizes, variants, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(table(rows, name))


if __name__ == "__main__":
    main()
