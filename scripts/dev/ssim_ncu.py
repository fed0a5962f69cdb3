"""Why the CUDA SSIM kernels run where they do: Nsight Compute's view of each, on a GPU.

    python scripts/ssim_ncu.py            # runs ncu on itself, writes $OUT/ssim_ncu.txt, prints a summary
    python scripts/ssim_ncu.py --launch   # what ncu profiles: one launch of each kernel below

The one-pass op (value and dL/dx, float32, valid) at 16x3x256x256, 1x3x1080x1920 and
1x3x2160x3840 with the tall tile, and at 4K with the 32x32 tile, the strip kernel with a
forced plan (2 columns, 128 threads x 64 rows) and with its own plan, and its one-column
build; the forward alone at 4K. (These found that the strip kernel waited on loads issued
just before its barrier: csrc/ssim/ssim_cuda_strip_backward.cu.) The
summary puts, per kernel: duration, issue slots busy (how near it runs to one instruction a
scheduler cycle), warps per scheduler (occupancy), registers, and the warp stall reasons
that take the most cycles per issued instruction (barrier, short scoreboard = shared memory,
long scoreboard = global memory, wait = fixed latency, ...). ncu runs with
--clock-control none (device README: leave the clocks alone).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

C1, C2 = 1e-4, 9e-4
# (label, shape, (backward kernel, strip plan: columns a thread, threads, rows; 0 the planner's)):
# one launch each, in this order
LAUNCHES = [
    ("one-pass tall tile 16x3x256x256", (16, 3, 256, 256), ("tile64", (0, 0, 0))),
    ("one-pass tall tile 1x3x1080x1920", (1, 3, 1080, 1920), ("tile64", (0, 0, 0))),
    ("one-pass tall tile 1x3x2160x3840", (1, 3, 2160, 3840), ("tile64", (0, 0, 0))),
    ("one-pass 32x32 tile 1x3x2160x3840", (1, 3, 2160, 3840), ("tile32", (0, 0, 0))),
    ("one-pass strip 2 col 128x64 1x3x2160x3840", (1, 3, 2160, 3840), ("strip", (2, 128, 64))),
    ("one-pass strip plan 1x3x2160x3840", (1, 3, 2160, 3840), ("strip", (0, 0, 0))),
    ("forward 1x3x2160x3840", (1, 3, 2160, 3840), None),
    ("one-pass strip 1 col 128x128 1x3x2160x3840", (1, 3, 2160, 3840), ("strip", (1, 128, 128))),
]
SECTIONS = ["SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats",
            "ComputeWorkloadAnalysis", "InstructionStats"]


def launch() -> None:
    """One launch of each kernel (ncu filters the ssim_* kernels; the finish kernels are tiny)."""
    import torch

    from epban import _extension  # loads the extension's ops

    wanted = os.environ.get("SSIM_NCU_LAUNCHES")  # --source: the labels to launch, "|"-separated
    for label, shape, settings in LAUNCHES:
        if wanted and label not in wanted.split("|"):
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=gen)
        y = (0.9 * x + 0.1 * torch.randn(shape, generator=gen)).clamp(0, 1)
        x, y = x.cuda(), y.cuda()
        if settings is None:
            torch.ops.epban.ssim_per_image(x, y, C1, C2, False)
        else:
            kernel, plan = settings
            _extension._C.ssim_set_cuda_backward(kernel)
            _extension._C.ssim_force_strip_plan(*plan)
            torch.ops.epban.ssim_per_image_and_grad(x, y, C1, C2, False, True, False)
        torch.cuda.synchronize()


def number(text: str, name: str) -> str:
    m = re.search(rf"^\s*{re.escape(name)}\s+(\S+)\s+([\d.,]+)\s*$", text, re.M)
    return f"{m.group(2)} {m.group(1)}" if m else "?"


def stalls(block: str) -> str:
    """The largest stall reasons (cycles per issued instruction) from the raw stall metrics."""
    found = re.findall(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio\s+\S*\s+([\d.]+)", block)
    top = sorted(((float(v), k) for k, v in found if not k.endswith("_not_issued")), reverse=True)[:5]
    return ", ".join(f"{k} {v:.2f}" for v, k in top) if top else "?"


def out_dir_and_ncu() -> tuple[str, str]:
    """Where the reports go ($OUT, which comes back from the GPU machine) and the ncu binary."""
    out_dir = os.environ.get("OUT", "gpu_check_out")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir, shutil.which("ncu") or "/usr/local/cuda/bin/ncu"


def profile() -> int:
    out_dir, ncu = out_dir_and_ncu()
    report = os.path.join(out_dir, "ssim_ncu.txt")
    cmd = [ncu, "--clock-control", "none", "-k", "regex:ssim_(backward|strip|forward)_kernel"]
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += ["--metrics", "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"]
    cmd += [sys.executable, os.path.abspath(__file__), "--launch"]
    with open(report, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=240)
    text = open(report).read()
    # one block per profiled kernel, in launch order
    blocks = re.split(r"\n(?=  \S.*\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\))", text)[1:]
    print(f"ncu exit {done.returncode}; {len(blocks)} kernels profiled; report {report}")
    print("| launch | kernel | ms | issue slots busy % | warps/scheduler (active) | regs | top stalls (cycles per issue) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for (label, _, _), block in zip(LAUNCHES, blocks):
        m = re.search(r"(ssim_\w+_kernel)", block)
        kernel = m.group(1) if m else "?"
        print(f"| {label} | {kernel} | {number(block, 'Duration')} | {number(block, 'Issue Slots Busy')} | "
              f"{number(block, 'Active Warps Per Scheduler')} | {number(block, 'Registers Per Thread')} | "
              f"{stalls(block)} |")
    if not blocks:
        print(text[-3000:])
    return done.returncode


SOURCE_LAUNCHES = ["one-pass tall tile 1x3x2160x3840", "one-pass strip 2 col 128x64 1x3x2160x3840",
                   "one-pass strip 1 col 128x128 1x3x2160x3840"]


def source() -> int:
    """Per-SASS-instruction executed counts and stall samples of the 4K backward kernels (the
    tall tile, the strip kernel's two builds): ncu's source page as CSV, one file per kernel
    ($OUT/ssim_source_<i>.csv), for reading off the machine (where each kernel's warps wait)."""
    out_dir, ncu = out_dir_and_ncu()
    status = 0
    for i, label in enumerate(SOURCE_LAUNCHES):
        rep = os.path.join(out_dir, f"ssim_source_{i}")
        env = dict(os.environ, SSIM_NCU_LAUNCHES=label)
        cmd = [ncu, "--clock-control", "none", "-f", "-o", rep, "-k", "regex:ssim_(backward|strip)_kernel",
               "--section", "WarpStateStats", "--section", "SourceCounters", "--import-source", "no",
               sys.executable, os.path.abspath(__file__), "--launch"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        path = os.path.join(out_dir, f"ssim_source_{i}.csv")
        with open(path, "w") as f:
            page = subprocess.run([ncu, "-i", rep + ".ncu-rep", "--page", "source", "--print-source", "sass", "--csv"],
                                  stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)
        if page.returncode != 0 or os.path.getsize(path) < 1000:  # no source page: the section's text instead
            with open(path, "a") as f:
                subprocess.run([ncu, "-i", rep + ".ncu-rep", "--page", "details", "--section", "SourceCounters",
                                "--section", "WarpStateStats"], stdout=f, stderr=subprocess.STDOUT, timeout=120)
        if os.path.exists(rep + ".ncu-rep"):
            os.remove(rep + ".ncu-rep")  # at most 8 files come back from the machine
        print(f"{label}: ncu exit {done.returncode}, page exit {page.returncode}, {path} "
              f"({os.path.getsize(path)} bytes) {done.stderr[-300:]} {page.stderr[-300:]}")
        status = status or done.returncode or page.returncode
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="store_true", help="launch the kernels once (run under ncu)")
    parser.add_argument("--source", action="store_true",
                        help="per-instruction stall samples of the 4K backward kernels, as CSV files in $OUT")
    args = parser.parse_args()
    if args.launch:
        launch()
        return 0
    if args.source:
        return source()
    return profile()


if __name__ == "__main__":
    sys.exit(main())
