"""Registers, spills and instruction counts of the CUDA SSIM kernels, without a GPU.

    CUDA_HOME=/usr/local/cuda python scripts/dev/ssim_sass_count.py [--arch sm_90]

Compiles the CUDA kernel files csrc/ssim/ssim_cuda_*.cu with nvcc (the flags of setup.py) for
one architecture,
prints each kernel's registers and spills (ptxas -v), then disassembles the cubin
(cuobjdump, from CUDA_HOME or the copy Triton ships) and counts the SASS of the strip
backward kernels per step: their step loop is unrolled by 11 with one barrier a step, so the
code between two barriers is one step. These are the counts the README and the kernel's
comments quote (instructions per thread and step, and per centre column). They say what
the kernels issue, not how fast a GPU issues it (csrc/ssim/ssim_cuda_strip_backward.cu quotes
them).
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The files that hold kernels (ssim_cuda.cu also holds the in-place scaling's)
SOURCES = sorted((ROOT / "csrc" / "ssim").glob("ssim_cuda*.cu"))


def tool(name: str, cuda_home: str) -> str:
    """A CUDA binary from CUDA_HOME/bin, else the one Triton ships, else PATH."""
    candidates = [os.path.join(cuda_home, "bin", name)]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for path in candidates:
        if os.path.exists(path):
            return path
    found = shutil.which(name)
    if found is None:
        sys.exit(f"ssim_sass_count: {name} not found (CUDA_HOME={cuda_home})")
    return found


def compile_cubin(source: pathlib.Path, arch: str, cuda_home: str, out: str) -> str:
    from torch.utils.cpp_extension import include_paths

    cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-O3", "--use_fast_math", "-std=c++20", f"-arch={arch}",
           "-DWITH_CUDA", f"-I{ROOT / 'csrc'}", *[f"-I{p}" for p in include_paths()],
           "-cubin", "-o", out, str(source), "-Xptxas", "-v"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-4000:])
    return done.stderr


def short_name(mangled: str) -> str:
    """ssim_strip_kernel<f32, 1, 2> from the mangled name: the dtype, then the template's ints
    and bools (tile rows and wanted gradients of the tile kernel; wanted gradients and columns
    a thread of the strip kernel; the forward's map flag; the scaling's float4 flag)."""
    kernel = re.search(r"\d(ssim_(?:strip|backward|forward|finish|scale_gradient)_kernel)", mangled).group(1)
    dtype = "bf16" if "BFloat16" in mangled else "f16" if "Half" in mangled else "f32"
    args = re.findall(r"L[ib](\d+)E", mangled)
    return f"{kernel}<{', '.join([dtype, *args])}>"


def resources(ptxas_log: str) -> list[tuple[str, int, str]]:
    rows, name, spill = [], None, ""
    for line in ptxas_log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif "spill" in line:
            spill = re.sub(r"\s+", " ", line.strip())
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            rows.append((short_name(name), int(m.group(1)), spill))
    return rows


def strip_steps(sass: str) -> dict[str, list[str]]:
    """The SASS opcodes of one step (between the second and third barrier) of each strip kernel."""
    steps = {}
    for body in re.split(r"\n\s+Function : ", sass)[1:]:
        name = body.split("\n", 1)[0]
        if "ssim_strip_kernel" not in name:
            continue
        ops = []
        for line in body.splitlines():
            if re.match(r"\s+/\*[0-9a-f]{4,5}\*/", line):
                text = re.sub(r"^\s+/\*[0-9a-f]+\*/\s+", "", line)
                text = re.sub(r"^@!?U?P\w+\s+", "", text)
                ops.append(text.split()[0].split(".")[0])
        barriers = [i for i, op in enumerate(ops) if op == "BAR"]
        steps[short_name(name)] = ops[barriers[1]:barriers[2]]
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    log, sass = "", ""
    with tempfile.TemporaryDirectory() as tmp:
        for i, source in enumerate(SOURCES):
            cubin = os.path.join(tmp, f"ssim_{i}.cubin")
            log += compile_cubin(source, args.arch, cuda_home, cubin)
            sass += subprocess.run([tool("cuobjdump", cuda_home), "-sass", cubin], capture_output=True, text=True,
                                   check=True).stdout
    print(f"## {', '.join(str(s.relative_to(ROOT)) for s in SOURCES)} for {args.arch}\n")
    print("| kernel <dtype, ...> | registers | stack and spills |")
    print("|---|---:|---|")
    for name, registers, spill in sorted(resources(log)):
        print(f"| {name} | {registers} | {spill} |")
    print("\nStrip kernels <dtype, wanted gradients (1 x, 2 y, 3 both), columns a thread, luminance (1 SSIM,"
          " 0 contrast-structure)>: one step\n")
    print("| kernel | instructions a step | a column | FFMA | FMUL | FADD | LDS | STS | LDG | STG | other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    main_ops = ("FFMA", "FMUL", "FADD", "LDS", "STS", "LDG", "STG")
    for name, ops in sorted(strip_steps(sass).items()):
        count = collections.Counter(ops)
        columns = int(name.rstrip(">").split(", ")[2])
        other = len(ops) - sum(count[op] for op in main_ops)
        cells = " | ".join(str(count[op]) for op in main_ops)
        print(f"| {name} | {len(ops)} | {len(ops) / columns:.0f} | {cells} | {other} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
