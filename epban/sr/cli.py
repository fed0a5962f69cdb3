"""The ``epban train-sr`` command: train an SR network with L1 + SSIM + Efficient-PBAN losses, or run the ablation.

The network is one of ours (``--net``) or an SR model file of another project
(``--net-weights``, read through spandrel: ``pip install epban[sr]``), fine-tuned.
``scripts/train_sr.py`` is the same command.
"""
from __future__ import annotations

import argparse

from epban.cli_errors import one_line
from epban.cli_options import add_threads_option, device_arg, int_at_least, positive_finite_float
from epban.sr.networks import NETWORKS
from epban.sr.spandrel_models import SpandrelMissing
from epban.sr.trainer import ABLATION_WEIGHTS, PBAN_MODES, SRTrainConfig, run_ablation, train_sr

DESCRIPTION = "Train an SR network against L1, SSIM and a frozen Efficient-PBAN metric."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``epban train-sr``; their defaults are ``SRTrainConfig``'s."""
    defaults = SRTrainConfig(train="")
    g = p.add_argument_group("data")
    g.add_argument("--train", required=True, help="folder of HR training images")
    g.add_argument("--train-lr", help="paired LR folder (default: LR by MATLAB bicubic downsampling)")
    g.add_argument("--val", help="folder of HR validation images (whole images)")
    g.add_argument("--val-lr", help="paired LR folder for --val")
    g.add_argument("--scale", type=int, default=defaults.scale, choices=(2, 3, 4),
                   help="upscaling factor (default: the model's with --net-weights, else 4)")
    g.add_argument("--patch-size", type=int_at_least(1), default=defaults.patch_size, help="HR crop side (default: %(default)s)")
    g.add_argument("--full-res", action="store_true", help="train on whole images instead of crops")
    g.add_argument("--modcrop", action="store_true", help="trim HR images to a multiple of the scale")
    g.add_argument("--workers", type=int_at_least(0), default=None, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    g.add_argument("--max-val-images", type=int_at_least(1), default=None, help="validate on the first N images only")

    g = p.add_argument_group("model and loss")
    g.add_argument("--net", default=defaults.net, choices=sorted(NETWORKS),
                   help="edsr = EDSR-baseline, rrdb = narrow RRDBNet, tiny = demo net (default: edsr, unless --net-weights)")
    g.add_argument("--net-weights", metavar="MODEL",
                   help="fine-tune this SR model file (.pth, .safetensors, ...) of any architecture spandrel "
                        "recognises (Real-ESRGAN, SwinIR, HAT, SPAN, ...); the result, OUT/net.pth, keeps its "
                        "state-dict names (needs spandrel: pip install 'epban[sr]')")
    g.add_argument("--freeze", action="append", default=None, metavar="PATTERN",
                   help="keep the parameters whose name matches this fnmatch pattern fixed (repeatable; "
                        "with --net-weights the names in the file match too), e.g. 'body.*'")
    g.add_argument("--l1", type=float, default=defaults.l1, help="weight of L1 (default: %(default)s)")
    g.add_argument("--ssim", type=float, default=None, help=f"weight of 1 - SSIM (default 0; with --ablation: {ABLATION_WEIGHTS['ssim']:g})")
    g.add_argument("--pban", type=float, default=None, help=f"weight of the PBAN loss (default 0; with --ablation: {ABLATION_WEIGHTS['pban']:g})")
    g.add_argument("--pban-weights", help="trained metric: an epban checkpoint directory, the authors' .pth, "
                                          "or bundled weights by name (e.g. tiny-ssim)")
    g.add_argument("--pban-mode", default=defaults.pban_mode, choices=PBAN_MODES,
                   help="the metric as a loss: fast = loss mode in float32 (BatchNorm folded, channels_last, fused "
                        "kernels, CUDA graphs for crops on CUDA; scores within 1e-5), fast-bf16 = the same in "
                        "bfloat16 (~1e-2), reference = the model's own forward (default: %(default)s)")
    g.add_argument("--ablation", action="store_true",
                   help="run L1, L1+SSIM, L1+PBAN, L1+SSIM+PBAN with the same seed, data and budget")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int_at_least(1), default=defaults.steps, help="optimiser steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int_at_least(1), default=defaults.batch_size, help="per process (default: %(default)s)")
    g.add_argument("--lr", type=positive_finite_float, default=defaults.lr, help="Adam learning rate, cosine decay to 1%% (default: %(default)s)")
    g.add_argument("--seed", type=int_at_least(0), default=defaults.seed, help="network init and data order (default: %(default)s)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=defaults.out,
                   help="run folder: new, empty, or an earlier run (with --resume or --overwrite) (default: %(default)s)")
    g.add_argument("--eval-every", type=int_at_least(1), default=defaults.eval_every, help="steps between validations (default: %(default)s)")
    g.add_argument("--save-every", type=int_at_least(1), default=defaults.save_every, help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--log-every", type=int_at_least(1), default=defaults.log_every, help="steps between log.csv rows (default: %(default)s)")
    g.add_argument("--sample-crop", type=int_at_least(1), default=defaults.sample_crop, help="HR crop side in the side-by-side PNGs (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt exactly (the options that define the training must be the run's)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (removes only the files a run writes)")
    g.add_argument("--stop-at", type=int_at_least(1), default=None, metavar="STEP",
                   help="stop after STEP with a checkpoint (for time-limited jobs; continue with --resume)")
    g.add_argument("--device", type=device_arg, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_threads_option(g)
    g.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="channels_last memory format (default: on CUDA)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def config_from_args(args: argparse.Namespace) -> SRTrainConfig:
    fields = {k: v for k, v in vars(args).items()
              if k in SRTrainConfig.__dataclass_fields__ and k not in ("ssim", "pban", "freeze")}
    return SRTrainConfig(ssim=args.ssim or 0.0, pban=args.pban or 0.0, freeze=list(args.freeze or []), **fields)


def cmd_train_sr(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        if args.ablation:
            run_ablation(config, ssim_weight=args.ssim or ABLATION_WEIGHTS["ssim"],
                         pban_weight=args.pban or ABLATION_WEIGHTS["pban"])
        else:
            train_sr(config)
    except (ValueError, OSError, SpandrelMissing) as exc:
        # ValueError: our checks of the options, images, checkpoints and --out, a diverged run;
        # OSError: a file that cannot be read or written (the message names it)
        raise one_line(exc) from None
    except KeyboardInterrupt:  # the trainer saved a checkpoint and said so
        return 130
    return 0


def register(sub) -> None:
    """Add ``train-sr`` to ``sub``, the subparsers of the ``epban`` command."""
    p = sub.add_parser("train-sr", help="train an SR network with the L1, SSIM and PBAN losses",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=cmd_train_sr)
