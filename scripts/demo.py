#!/usr/bin/env python
"""``make demo``: train a tiny quality metric, then train a tiny SR network against it, on a CPU in minutes.

1. build the toy SR-quality set from the scikit-image photos (synthetic scores),
2. train the tiny Efficient-PBAN on it briefly,
3. train the tiny SR network (x2) on other scikit-image photos with L1 + SSIM + PBAN,
4. print PSNR / SSIM (Y channel) and the PBAN score of bicubic, the untrained and the
   trained network on held-out photos; write ``OUT/comparison.png`` and ``OUT/metrics.json``.

Uses CUDA when available. The metric here learned synthetic scores from a formula, not
human opinions: its numbers show the machinery working, not perceptual quality.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from epban.cli_options import set_threads

SYNTHETIC_NOTE = (
    "NOTE: the quality metric in this demo was trained on SYNTHETIC scores (a formula of the "
    "degradation parameters of the toy set), not on human opinion scores. Its scores show the "
    "pipeline working; they are not a measure of perceptual quality."
)
# HR photos from scikit-image (bundled, no download). Validation photos are held out of SR training.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "camera", "brick", "gravel", "coins")
VAL_CROPS = {"chelsea": (20, 100, 256), "hubble_deep_field": (300, 300, 256)}  # name: (top, left, side)


DEMO_MARKER = ".epban-demo"  # marks a folder the demo wrote (and may overwrite on a rerun)

def write_photos(root: Path, scale: int) -> tuple[Path, Path]:
    """HR training photos (trimmed to a multiple of the scale) and validation crops, as PNG."""
    import skimage.data
    from skimage.color import gray2rgb

    from epban.imageio import write_image

    def rgb(name):
        a = getattr(skimage.data, name)()
        a = gray2rgb(a) if a.ndim == 2 else a[..., :3]
        h, w = a.shape[:2]
        a = a[: h - h % scale, : w - w % scale]
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255

    train, val = root / "train", root / "val"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        write_image(train / f"{name}.png", rgb(name))
    for name, (top, left, side) in VAL_CROPS.items():
        write_image(val / f"{name}.png", rgb(name)[:, top : top + side, left : left + side])
    return train, val


def _row(label: str, m: dict) -> str:
    return f"  {label:<22}{m['psnr_y']:>10.2f}{m['ssim_y']:>10.4f}{m['pban_score']:>12.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--scale", type=int, default=2, choices=(2, 4))
    p.add_argument("--metric-epochs", type=int, default=2)
    p.add_argument("--metric-lr", type=float, default=1e-3, help="higher than the authors' 1e-4: the demo's budget is small")
    p.add_argument("--metric-steps", type=int, default=None, help="cap on metric training steps")
    p.add_argument("--sr-steps", type=int, default=300)
    p.add_argument("--sr-batch-size", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=64, help="HR crop side (the metric needs >= 32)")
    p.add_argument("--ssim", type=float, default=1.0, help="SSIM loss weight")
    p.add_argument("--pban", type=float, default=0.1, help="PBAN loss weight")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    set_threads(0)  # auto: fewer threads when the cores are busy

    from epban.losses import PBANLoss
    from epban.metric import make_toy_dataset, train_metric
    from epban.models.pban import EfficientPBAN
    from epban.sr import SRFolderDataset, SRTrainConfig, build_network, evaluate, train_sr
    from epban.sr.evaluate import super_resolve
    from epban.sr.imresize import bicubic_upsample, quantize
    from epban.sr.report import comparison_crops, save_grid
    from epban.training.records import write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    # Rerunning the demo replaces its earlier results; a folder it did not write is left alone.
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise SystemExit(f"{out} exists and was not written by the demo; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    times = {}
    print(f"epban demo on {device} -> {out}/")
    print(SYNTHETIC_NOTE)

    t = time.time()
    print("\n[1/4] building the toy SR-quality set (synthetic scores) ...")
    manifest = make_toy_dataset(out / "toy_quality", seed=args.seed)
    times["toy_dataset_s"] = round(time.time() - t, 1)

    t = time.time()
    print("\n[2/4] training the tiny Efficient-PBAN metric ...")
    metric_dir = train_metric(manifest, config="tiny", epochs=args.metric_epochs, out=str(out / "metric"),
                              lr=args.metric_lr, seed=args.seed, device=str(device), max_steps=args.metric_steps,
                              overwrite=True)
    times["metric_training_s"] = round(time.time() - t, 1)

    t = time.time()
    print(f"\n[3/4] training the tiny SR network (x{args.scale}) with L1 + {args.ssim:g} SSIM + {args.pban:g} PBAN ...")
    train_dir, val_dir = write_photos(out / "sr_data", args.scale)
    config = SRTrainConfig(
        train=str(train_dir), val=str(val_dir), out=str(out / "sr_run"), net="tiny", scale=args.scale,
        patch_size=args.patch_size, batch_size=args.sr_batch_size, steps=args.sr_steps, lr=1e-3,
        l1=1.0, ssim=args.ssim, pban=args.pban, pban_weights=str(metric_dir),
        eval_every=args.sr_steps, save_every=args.sr_steps, seed=args.seed, device=str(device),
        overwrite=True,  # the demo owns its folder: a second run replaces the first
    )
    scorer = PBANLoss(EfficientPBAN.from_checkpoint(metric_dir)).to(device)
    val_set = SRFolderDataset(val_dir, args.scale, augment=False)
    torch.manual_seed(config.seed)  # the same initialisation train_sr starts from
    untrained = build_network(config.net, config.scale).to(device)
    before = evaluate(untrained, val_set, device, args.scale, scorer=scorer)
    summary = train_sr(config)
    after, bicubic = summary["final"], summary["bicubic"]
    trained = build_network(config.net, config.scale)
    trained.load_state_dict(torch.load(Path(config.out) / "net.pt", map_location="cpu", weights_only=True))
    trained.to(device).eval()
    times["sr_training_s"] = round(time.time() - t, 1)

    print("\n[4/4] results on the held-out photos " + ", ".join(VAL_CROPS) + " (means)")
    print(f"  {'':<22}{'PSNR-Y':>10}{'SSIM-Y':>10}{'PBAN score':>12}")
    print(_row("bicubic", bicubic["mean"]))
    print(_row("SR net, before", before["mean"]))
    print(_row(f"SR net, after {args.sr_steps} st", after["mean"]))

    rows, captions, labels = [], [], []
    for i in range(len(val_set)):
        item = val_set[i]
        lr, hr = item["lr"][None].to(device), item["hr"][None].to(device)
        cols = {
            "bicubic": quantize(bicubic_upsample(lr, args.scale))[0],
            "SR, before": super_resolve(untrained, lr)[0],
            "SR, after": super_resolve(trained, lr)[0],
            "HR": hr[0],
        }
        rows.append(comparison_crops(cols, 128, args.scale))
        name = item["name"]
        labels.append(name)
        captions.append({
            k: f"{m['images'][name]['psnr_y']:.2f} dB / PBAN {m['images'][name]['pban_score']:.3f}"
            for k, m in (("bicubic", bicubic), ("SR, before", before), ("SR, after", after))
        })
    figure = save_grid(out / "comparison.png", rows, row_labels=labels, captions=captions,
                       title=f"tiny SR x{args.scale}, L1 + SSIM + PBAN, {args.sr_steps} steps (metric trained on synthetic scores)")
    metrics = {
        "note": SYNTHETIC_NOTE,
        "device": str(device),
        "scale": args.scale,
        "sr_steps": args.sr_steps,
        "loss_weights": {"l1": 1.0, "ssim": args.ssim, "pban": args.pban},
        "metric_checkpoint": str(metric_dir),
        "psnr_ssim": "Y channel (BT.601, MATLAB rgb2ycbcr), border crop = scale",
        "bicubic": bicubic,
        "before": before,
        "after": after,
        "seconds": times,
    }
    metrics_path = write_json(out / "metrics.json", metrics)
    print(f"\ncomparison figure: {figure}\nmetrics:           {metrics_path}")
    print(f"SR run (log, checkpoint, samples): {config.out}/")
    print(SYNTHETIC_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
