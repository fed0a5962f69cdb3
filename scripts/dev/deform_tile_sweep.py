"""Times the fused deformable convolution's forward + input-gradient kernels (bf16, GMDC's four
branches, fwd + bwd to x and offsets) for each pixel tile (BLOCK_P, num_warps), on a GPU.

    python scripts/dev/deform_tile_sweep.py [--budget 45]

The default tile is ``epban.ops.deform_conv._pixel_tile``: (32, 4) below 16,384 pixels per
launch, else (64, 8), or (64, 4) in bf16 under Triton before 3.7. Each configuration compiles
both kernels once (a few seconds); rows that would start after --budget seconds are skipped.
Prints a markdown table; the default's rows are marked. Changes nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from epban.ops import deform_conv as ops

ROOT = Path(__file__).resolve().parents[2]
TILES = [(32, 4), (64, 8), (32, 8), (64, 4), (16, 4)]
SHAPES = [(16, 256, 16, 16), (1, 256, 64, 64), (1, 256, 128, 128)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=45.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("deform_tile_sweep: no CUDA device")
        return 1
    spec = importlib.util.spec_from_file_location("bench_deform_conv", ROOT / "benches" / "bench_deform_conv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    start = time.perf_counter()
    default_tile = ops._pixel_tile
    rows = []
    try:
        for tile in TILES:
            if time.perf_counter() - start > args.budget:
                print(f"budget reached: tile {tile} and later skipped")
                break
            ops._pixel_tile = lambda pixels, dtype=None, tile=tile: tile
            for shape in SHAPES:
                b, _, h, w = shape
                ms, _ = bench.time_impl("fused bf16", shape)
                is_default = default_tile(b * h * w, torch.bfloat16) == tile
                rows.append((shape, tile, ms, is_default))
                print(f"{shape} tile {tile}: {ms:.3f} ms{' (default)' if is_default else ''}", flush=True)
    finally:
        ops._pixel_tile = default_tile
    print(f"\nGMDC fused bf16, fwd + bwd to x and offsets, by pixel tile, {torch.cuda.get_device_name()}\n")
    print("| shape | BLOCK_P, warps | ms | default |")
    print("|---|---|---|---|")
    for shape, tile, ms, is_default in sorted(rows):
        print(f"| {'x'.join(map(str, shape))} | {tile[0]}, {tile[1]} | {ms:.3f} | {'yes' if is_default else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
