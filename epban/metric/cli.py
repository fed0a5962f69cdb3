"""The ``epban make-dataset``, ``epban train-metric`` and ``epban eval-metric`` commands (``register``)."""
from __future__ import annotations

import argparse
import json
import sys

from epban.cli_errors import CLIError, one_line
from epban.cli_options import add_threads_option, device_arg, int_at_least, positive_finite_float
from epban.models.pban import MIN_INPUT_SIZE

def _size_or_none(text: str):
    """argparse ``type`` of ``--eval-size``: ``full`` (None), ``auto``, or a side the model can score."""
    if text.lower() in ("full", "none", "0"):
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        side = int(text)
    except ValueError:
        side = -1
    if side < MIN_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"expected a side length >= {MIN_INPUT_SIZE} (the model's smallest "
                                         f"input), 'full' or 'auto', got {text!r}")
    return side


def cmd_make_dataset(args) -> int:
    from epban.data.toy import make_toy_dataset

    if not args.toy:
        raise CLIError("only the synthetic toy set can be made (pass --toy OUT); train on your own scored "
                       "data with a manifest CSV (sr_path,hr_path,score[,method][,split])")
    try:
        manifest = make_toy_dataset(args.toy, seed=args.seed, scales=tuple(args.scales), size=args.size,
                                    quiet=args.quiet)
    except (OSError, ValueError, RuntimeError) as exc:  # OSError: a folder that exists or cannot be written
        raise one_line(exc) from None
    print(manifest)
    return 0


def cmd_train_metric(args) -> int:
    from epban.data.manifest import ManifestError
    from epban.imageio import ImageReadError
    from epban.metric.trainer import TrainingInterrupted, train_metric

    try:
        best = train_metric(
            args.data, config=args.config, epochs=args.epochs, out=args.out, batch_size=args.batch_size,
            lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, resume=args.resume, device=args.device,
            backbone_weights=True if args.weights == "hub" else args.weights, max_steps=args.max_steps, crop=args.crop, quiet=args.quiet,
            root=args.root, val_data=args.val_data, eval_size=args.eval_size, lr_step=args.lr_step,
            lr_gamma=args.lr_gamma, accum_steps=args.accum_steps, amp=args.amp, num_workers=args.workers,
            freeze_stem=not args.no_freeze_stem, overwrite=args.overwrite, init=args.init,
            crops_per_image=args.crops_per_image, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        )
    except TrainingInterrupted as exc:
        print(f"epban train-metric: {exc}", file=sys.stderr)
        return 130
    except (ManifestError, ImageReadError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            ValueError) as exc:
        # ValueError: our checks of the arguments (preset name, backbone/config mismatch, counts),
        # a malformed checkpoint (--init, --resume)
        raise one_line(exc) from None
    print(best)
    return 0


def cmd_eval_metric(args) -> int:
    from epban.data.manifest import ManifestError
    from epban import weights
    from epban.imageio import ImageReadError
    from epban.metric.evaluate import evaluate_metric, fmt_metric as fmt

    try:
        report = evaluate_metric(
            args.data, weights=weights.resolve(args.weights), split=None if args.split == "all" else args.split, out=args.out,
            device=args.device, root=args.root, batch_size=args.batch_size, eval_size=args.eval_size,
            preset=args.preset, num_workers=args.workers, quiet=args.quiet,
        )
    except (ManifestError, ImageReadError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            ValueError) as exc:
        # ValueError: an unreadable or mismatched checkpoint, a non-finite score from the model
        raise one_line(exc) from None
    print(f"{report['split']}: n={report['n']}  SRCC {fmt(report['srcc'])}  KRCC {fmt(report['krcc'])}  "
          f"PLCC {fmt(report['plcc'])}  RMSE {fmt(report['rmse'])}")
    if report.get("logistic"):
        lg = report["logistic"]
        print(f"after the logistic fit:  PLCC {fmt(lg['plcc'])}  RMSE {fmt(lg['rmse'])}")
    if report.get("synthetic_scores"):
        print("note: SYNTHETIC scores (the toy set): these figures say nothing about agreement with people")
    if args.out:
        print(f"wrote {args.out}/report.json, scatter.png, predictions.csv")
    elif args.json:
        print(json.dumps(report, indent=2))
    return 0


def register(sub) -> None:
    """Add the three commands to ``sub``, the subparsers of the ``epban`` command."""
    p = sub.add_parser("make-dataset", help="write the SYNTHETIC toy SR-quality set (demos and tests)")
    p.add_argument("--toy", metavar="OUT", help="folder to write the toy set to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", type=int, nargs="+", default=[2, 4], help="upsampling factors (default: 2 4)")
    p.add_argument("--size", type=int, default=None, help="side of the square HR images (default 128)")
    p.add_argument("--quiet", action="store_true")
    add_threads_option(p)
    p.set_defaults(func=cmd_make_dataset)

    p = sub.add_parser("train-metric", help="train the metric on scored SR/HR pairs")
    p.add_argument("--data", required=True,
                   help="manifest: a CSV (sr_path,hr_path,score[,method][,split]), an authors' list file, "
                        "or a folder with their train.txt/val.txt/test.txt")
    p.add_argument("--root", help="for the authors' list files: the folder holding SR_results/ and HR/")
    p.add_argument("--val-data", help="a separate manifest for validation (default: the 'val' split of --data)")
    p.add_argument("--config", default="tiny", help="model preset: tiny, resnet34, official (default tiny)")
    p.add_argument("--epochs", type=int_at_least(1), default=30)
    p.add_argument("--out", required=True,
                   help="run folder: best/, last/, log.csv (new, empty, or an earlier run of ours)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN/last exactly where it stopped (with the run's own options: one that "
                        "defines the training, e.g. --lr, --config, --data, must be the run's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (removes only what a run writes)")
    p.add_argument("--weights", metavar="BACKBONE",
                   help="torchvision's ImageNet resnet34 file for the backbone ('hub': the torch hub cache)")
    p.add_argument("--init", default="auto",
                   help="starting weights: auto (tiny: the bundled SSIM-pretrained weights; others: random), "
                        "random, or a model directory")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--accum-steps", type=int_at_least(1), default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=positive_finite_float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-step", type=int_at_least(1), default=5, help="StepLR period in epochs")
    p.add_argument("--lr-gamma", type=positive_finite_float, default=0.5)
    p.add_argument("--lr-schedule", default="step", choices=["step", "cosine"],
                   help="step: StepLR(--lr-step, --lr-gamma) per epoch (default); cosine: to 0 over the run, per step")
    p.add_argument("--warmup-steps", type=int_at_least(0), default=0, help="linear learning-rate warmup (optimiser steps)")
    p.add_argument("--crops-per-image", type=int_at_least(1), default=1,
                   help="visits of each training pair per epoch, each with its own random crop (default 1)")
    p.add_argument("--crop", type=int_at_least(MIN_INPUT_SIZE), help="random square training crops of this size, "
                   f"at least {MIN_INPUT_SIZE} (default: the authors' 768/900/1080 -> 768; 96 for tiny)")
    p.add_argument("--eval-size", type=_size_or_none, default="auto",
                   help="validation resize: a side length, 'full' (default with --crop/tiny), or 'auto'")
    p.add_argument("--max-steps", type=int_at_least(1), help="stop after this many optimiser steps")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast on CUDA")
    p.add_argument("--no-freeze-stem", action="store_true", help="also train conv1/bn1/layer1")
    p.add_argument("--workers", type=int_at_least(0), help="DataLoader workers")
    p.add_argument("--device", type=device_arg, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    add_threads_option(p)
    p.set_defaults(func=cmd_train_metric)

    p = sub.add_parser("eval-metric", help="SRCC/KRCC/PLCC/RMSE of a metric on a manifest split")
    p.add_argument("--data", required=True, help="manifest (as for train-metric)")
    p.add_argument("--root", help="for the authors' list files: the folder holding SR_results/ and HR/")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--weights", required=True,
                   help="a run's best/ or last/, the authors' .pth, or bundled weights by name (e.g. tiny-ssim)")
    p.add_argument("--preset", help="for the authors' .pth: 'official' uses their normalisation")
    p.add_argument("--out", help="folder for report.json, scatter.png, predictions.csv")
    p.add_argument("--eval-size", type=_size_or_none, default="auto",
                   help="resize to this side, 'full' resolution, or 'auto' (the run's own policy)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--workers", type=int_at_least(0), help="DataLoader workers")
    p.add_argument("--device", type=device_arg, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON (without --out)")
    p.add_argument("--quiet", action="store_true")
    add_threads_option(p)
    p.set_defaults(func=cmd_eval_metric)
