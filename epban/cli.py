"""The ``epban`` command: ``score`` and ``info`` here; ``make-dataset``, ``train-metric`` and
``eval-metric`` from ``epban.metric.cli``; ``train-sr`` from ``epban.sr.cli``.

This module dispatches; the command modules it imports import nothing from it.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

from epban.cli_errors import CLIError
from epban.metric import cli as metric_cli
from epban.sr import cli as sr_cli


def _pairs(sr: Path, hr: Path) -> list[tuple[str, Path, Path]]:
    from epban.imageio import list_images

    if sr.is_file() and hr.is_file():
        return [(sr.name, sr, hr)]
    if sr.is_dir() and hr.is_dir():
        sr_files = {p.name: p for p in list_images(sr)}
        hr_files = {p.name: p for p in list_images(hr)}
        if not sr_files:
            raise CLIError(f"{sr}: no images found")
        missing = sorted(set(sr_files) - set(hr_files))
        if missing:
            raise CLIError(f"{hr / missing[0]}: missing HR image for {sr / missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [(name, sr_files[name], hr_files[name]) for name in sorted(sr_files)]
    for p in (sr, hr):
        if not p.exists():
            raise CLIError(f"{p}: no such file or directory")
    raise CLIError(f"SR and HR must both be files or both be directories: {sr}, {hr}")


def _load_model(weights: str | None, device: torch.device):
    from epban.models.pban import EfficientPBAN, PBANConfig

    if weights is None:
        print("warning: no --weights given: scoring with an UNTRAINED tiny model (random weights); "
              "its PBAN scores mean nothing. Train one with `epban train-metric` or pass a checkpoint.",
              file=sys.stderr)
        torch.manual_seed(0)
        return EfficientPBAN(PBANConfig.tiny()).eval().to(device)
    try:
        return EfficientPBAN.from_checkpoint(weights).to(device)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def cmd_score(args) -> int:
    from epban.imageio import ImageReadError, read_image
    from epban.ops.ssim import ssim

    device = torch.device(args.device)
    pairs = _pairs(Path(args.sr), Path(args.hr))
    model = _load_model(args.weights, device)
    rows = []
    with torch.no_grad():
        for name, sr_path, hr_path in pairs:
            try:
                sr, hr = read_image(sr_path), read_image(hr_path)
            except ImageReadError as exc:
                raise CLIError(str(exc)) from None
            if sr.shape != hr.shape:
                raise CLIError(f"{sr_path}: size {tuple(sr.shape[1:])} differs from its HR {hr_path} {tuple(hr.shape[1:])}")
            sr, hr = sr[None].to(device), hr[None].to(device)
            try:
                score = float(model(sr, hr))
            except ValueError as exc:
                raise CLIError(f"{sr_path}: {exc}") from None
            mse = float(torch.mean((sr - hr) ** 2))
            psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
            rows.append({"image": name, "pban": score, "ssim": float(ssim(sr, hr)), "psnr": psnr})
    width = max(len("image"), *(len(r["image"]) for r in rows))
    print(f"{'image':{width}s}  {'PBAN':>9s}  {'SSIM':>7s}  {'PSNR(dB)':>8s}")
    for r in rows:
        print(f"{r['image']:{width}s}  {r['pban']:9.4f}  {r['ssim']:7.4f}  {r['psnr']:8.2f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "pban", "ssim", "psnr"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


def cmd_info(args) -> int:
    from epban.info import info

    print(info(as_text=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epban", description="Efficient-PBAN perceptual quality metric for super-resolution")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score SR images against their HR references")
    p.add_argument("sr", help="an SR image, or a directory of them")
    p.add_argument("hr", help="its HR reference, or a directory with the same file names")
    p.add_argument("--weights", help="checkpoint: an epban directory or the authors' .pth file")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("info", help="versions and which backend serves each op")
    p.set_defaults(func=cmd_info)
    metric_cli.register(sub)
    sr_cli.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as exc:
        print(f"epban {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
