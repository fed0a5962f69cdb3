"""Registers, spills, shared memory and MMA kind of epban's Triton kernels on sm90 — without a GPU.

    python -m epban.testing.kernel_resources [--dtype fp32|bf16] [--precision tf32x3|tf32|ieee]

Each kernel is compiled through Triton's whole NVIDIA pipeline for sm_90a (Hopper) with the
launch configuration the ops use (axial attention: ``CONFIG``; deformable convolution: the
official model's C = 256, OB = 64 on a map of >= 16K pixels), then ``ptxas -v`` reports its
registers and spill bytes. ``blocks/SM`` is how many programs fit on one SM by registers
(65,536 per SM) and by shared memory (227 KB): below 2, one program's latency has nothing to
hide behind. Use it before spending GPU time: a configuration that spills or runs one program
per SM will not be fast.

The figures depend on the Triton version: read them with the GPU machine's (3.6), e.g.
``pip install --no-deps --target /tmp/triton36 triton==3.6.0`` and ``PYTHONPATH=/tmp/triton36``
(3.6 and 3.8 differ by hundreds of spill bytes on the same kernel).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real compilation

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

REGS_PER_SM = 65536
SMEM_PER_SM = 227 * 1024


def _ptxas() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else "ptxas"


def resources(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int | None = None) -> dict:
    """Compile ``fn`` for sm90 and measure its static resources."""
    given = {a: v for a, v in constexprs.items() if a in fn.arg_names}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    kernel = compile(ASTSource(fn, signature, given), target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        report = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = re.search(r"(\d+) bytes spill stores", report)
    smem = kernel.metadata.shared
    threads = 32 * num_warps
    return dict(regs=regs, spill=int(spill.group(1)) if spill else 0, smem_kb=round(smem / 1024, 1),
                blocks_by_regs=REGS_PER_SM // (regs * threads), blocks_by_smem=SMEM_PER_SM // smem if smem else 99,
                mma="wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma",
                cp_async="cp.async" in ptx)


def signature(fn, constexprs, pointer_types, default_pointer="*fp32"):
    return {a: "constexpr" if a in constexprs else pointer_types.get(a, default_pointer if a.endswith("_ptr")
                                                                     else "fp32" if a == "eps" else "i32")
            for a in fn.arg_names}


def axial_rows(dtype: str, precision: str):
    from epban.kernels import axial_attention as K
    from epban.ops import axial_attention as ops

    pointers = {n: "*" + dtype for n in ("q0", "k0", "v0", "o0", "q1", "k1", "v1", "o1", "g0", "g1", "dv0", "dv1",
                                         "dq0", "dq1", "dk0", "dk1")}
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    # Triton specialises an int argument equal to 1: the unit stride of each layout (sW in
    # NCHW, sC in channels_last) is a compile-time constant at launch, so here too.
    # the tiles the ops pick for the model's largest map (1x256x135x240), and the one-tile
    # kernels of the loss mode's maps (16x16 up to 64x64 in bfloat16; 32x32 in float32)
    cases = [(layout, unit, (1, 256, 135, 240), kernels)
             for layout, unit in (("NCHW", "sW"), ("channels_last", "sC"))
             for kernels in [(("_axial_fwd_stats_kernel", False), ("_axial_fwd_lse_kernel", False),
                              ("_axial_fwd_out_kernel", False), ("_axial_bwd_dv_kernel", False),
                              ("_axial_bwd_dqk_kernel", False), ("_axial_bwd_dqk_kernel", True))]]
    one_tile = (1, 256, 64, 64) if dtype != "fp32" else (1, 256, 32, 32)
    cases.append(("channels_last", "sC", one_tile, (("_axial_fwd_single_kernel", False),
                                                    ("_axial_bwd_single_dqk_kernel", False))))
    for layout, unit, shape, kernels in cases:
        plan = ops._Plan(shape, torch_dtype, "sample", precision, channels_last=layout != "NCHW")
        tiles = plan.tiles()
        launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages") if k in tiles}
        cx = dict(PASS=0, BLOCK=plan.block_row, BLOCK_ROW=plan.block_row, BLOCK_COL=plan.block_col, BLOCK_P=1024,
                  **tiles)
        desc = (f"{layout}, {shape[2]}x{shape[3]} C=256 block {plan.block_row} "
                f"{'resident' if plan.resident else f'ck {plan.block_ck}'}"
                f" stages {launch.get('num_stages')} {plan.precision if dtype == 'fp32' else dtype + ' dots'}")
        for name, is_dk in kernels:
            fn = getattr(K, name)
            c = dict(cx, IS_DK=is_dk, **{unit: 1})
            label = name + ((" dk" if is_dk else " dq") if name == "_axial_bwd_dqk_kernel" else "")
            yield label, desc, launch["num_warps"], resources(fn, signature(fn, c, pointers), c, launch["num_warps"],
                                                              launch.get("num_stages"))


def deform_rows(dtype: str, precision: str):
    from epban.kernels import deform_conv as K
    from epban.ops import deform_conv as ops

    low = dtype != "fp32"
    block_p, warps = ops._pixel_tile(1 << 20, torch.bfloat16 if low else torch.float32)
    cx = dict(HAS_BIAS=True, PRECISION="low" if low else precision, UPCAST=False, BLOCK_P=block_p,
              BLOCK_C=ops._BLOCK_C, BLOCK_O=64, ONE_OBLOCK=True)
    data = "*" + dtype
    pointers = {"x_ptr": data, "off_ptr": data, "w_ptr": data, "gy_ptr": data, "out_ptr": data, "goff_ptr": data,
                "bias_ptr": "*fp32", "gx_ptr": "*fp32", "gw_ptr": "*fp32", "ks_ptr": "*i32", "tap0_ptr": "*i32",
                "order_ptr": "*i32", "tap_branch_ptr": "*i32"}
    for name, bp, nw in (("mbdc_fwd_kernel", block_p, warps), ("mbdc_bwd_data_kernel", block_p, warps),
                         ("mbdc_bwd_weight_kernel", 32 if not low else block_p, 8 if not low else 4)):
        fn = getattr(K, name)
        c = dict(cx, BLOCK_P=bp)
        yield name, f"C=256 OB=64 block_p {bp} {c['PRECISION']}", nw, resources(fn, signature(fn, c, pointers), c, nw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--precision", choices=["tf32x3", "tf32", "ieee"], default="tf32",
                   help="float32 dots (the axial attention's CUDA default is tf32)")
    p.add_argument("--only", choices=["axial", "deform"], help="one family of kernels")
    p.add_argument("--axial-config", help='JSON overrides of the axial kernels\' CONFIG, e.g. \'{"num_stages": 2}\'')
    args = p.parse_args(argv)
    if args.axial_config:
        from epban.ops import axial_attention as ops

        ops.CONFIG.update(json.loads(args.axial_config))
    print(f"Triton {triton.__version__}, sm_90a, dtype {args.dtype}\n")
    print("| kernel | configuration | warps | registers | spill bytes | smem KB | blocks/SM (regs, smem) | MMA |")
    print("|---|---|---|---|---|---|---|---|")
    families = {"axial": axial_rows, "deform": deform_rows}
    for family, rows in families.items():
        if args.only and family != args.only:
            continue
        for name, config, warps, r in rows(args.dtype, args.precision):
            print(f"| {name} | {config} | {warps} | {r['regs']} | {r['spill']} | {r['smem_kb']} | "
                  f"{r['blocks_by_regs']}, {r['blocks_by_smem']} | {r['mma']}{' + cp.async' if r['cp_async'] else ''} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
