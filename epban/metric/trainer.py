"""Training the metric on scored SR/HR pairs: the authors' recipe (docs/architecture.md), resumable.

Recipe defaults: MSE between predicted and manifest score, Adam (lr 1e-4, weight decay
1e-4), StepLR(5, 0.5) per epoch, batch 8, the stem's conv1/bn1/layer1 frozen (their
BatchNorm kept in eval mode), best checkpoint by validation SRCC. Additions: autocast
(bf16, or fp16 with loss scaling) on CUDA, gradient accumulation, DDP under torchrun;
optional (off by default): several random crops of each pair per epoch, a cosine learning
rate schedule, linear warmup.

The output layer starts at the training scores' mean and spread (``out.bias = mean``,
``out.weight *= std``), so a freshly initialised network predicts on the score scale from
the first step instead of spending its first epochs finding it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from epban.data.dataset import EpochBatchSampler, PairDataset
from epban.data.manifest import ManifestError, check_images, load_manifest, select_split
from epban.data.toy import SYNTHETIC_WARNING, is_toy
from epban.data.transforms import DataPolicy
from epban.metric.evaluate import (MIN_EVAL_SIZE, build_report, default_workers, fmt_metric, no_sigint_in_worker,
                                    predict)
from epban.models.pban import MIN_INPUT_SIZE, EfficientPBAN, PBANConfig
from epban.training import checkpoint, distributed
from epban.training.run_folder import TrainingDiverged, check_resume_or_overwrite, check_writable, make_out
from epban.training.records import write_json

LOG_FIELDS = ["epoch", "step", "train_loss", "lr", "val_srcc", "val_plcc", "val_krcc", "val_rmse",
              "images_per_s", "elapsed_s"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training: ``last`` was saved; resume with ``resume=True``."""

    def __init__(self, last: Path, step: int):
        super().__init__(f"training interrupted at step {step}; saved {last} (resume with --resume)")
        self.last, self.step = last, step


class _StopSignal:
    """The first SIGINT/SIGTERM asks training to stop after the current step; a second one
    interrupts at once. Handlers are restored on exit."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _unused_modules(model: EfficientPBAN) -> list[nn.Module]:
    """Modules kept for the authors' state dict but not used by the forward (docs/architecture.md).

    Their parameters must not require gradients, or DDP waits for gradients that never come.
    """
    b = model.block2
    return [b.after_block3, b.after_block4, b.SE.subchannel, b.SE.shuffle.conv]


def _set_train_mode(model: EfficientPBAN, freeze_stem: bool) -> None:
    model.train()
    if freeze_stem:
        for m in model.frozen_stem_modules():
            m.eval()  # frozen BatchNorm keeps its statistics


def _build_config(config, score_range) -> PBANConfig:
    if isinstance(config, PBANConfig):
        base = config
    elif isinstance(config, str):
        base = PBANConfig.preset(config)
    else:
        raise ValueError(f"config must be a preset name or a PBANConfig, got {type(config).__name__}")
    return dataclasses.replace(base, score_range=score_range)


def _autocast_dtype(amp: str, device: torch.device):
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _read_log(path: Path, max_step: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= max_step]


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train_metric(
    data,
    *,
    config="tiny",
    epochs: int = 3,
    out="runs/metric",
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    seed: int = 0,
    resume: bool = False,
    device=None,
    backbone_weights=None,
    max_steps: int | None = None,
    crop: int | None = None,
    quiet: bool = False,
    root=None,
    val_data=None,
    eval_size="auto",
    lr_step: int = 5,
    lr_gamma: float = 0.5,
    accum_steps: int = 1,
    amp: str = "auto",
    num_workers: int | None = None,
    freeze_stem: bool = True,
    overwrite: bool = False,
    callback: Callable[[dict], None] | None = None,
    init="auto",
    crops_per_image: int = 1,
    lr_schedule: str = "step",
    warmup_steps: int = 0,
) -> Path:
    """Train a metric on the ``train`` split of manifest ``data``, select by ``val`` SRCC; return ``out/best``.

    ``config``: a preset name (``tiny``, ``resnet34``, ``official``) or a ``PBANConfig``.
    ``crop``: train on random ``crop`` x ``crop`` pairs (default: the authors' recipe for
    the full-size presets, 96 for ``tiny``). ``eval_size``: ``"auto"`` (512 with the
    authors' recipe, else full resolution), ``None`` or a side length.
    ``backbone_weights``: torchvision's ResNet-34 ImageNet file (a path, or ``True`` for
    the torch hub cache). ``max_steps`` stops after that many optimiser steps (then
    validates and saves). ``val_data``: a separate manifest for validation.
    ``callback(row)`` is called after every optimiser step with ``epoch, step, loss, lr``.
    ``init``: where the weights start: ``"auto"`` (the bundled SSIM-pretrained weights
    for the ``tiny`` preset, see ``epban.weights``; random otherwise), ``"random"``, or a
    model directory (``save_pretrained`` format) of the same architecture.
    ``crops_per_image``: each epoch visits every training pair this many times, each time
    with its own random crop and flip (more steps per epoch from few, small images).
    ``lr_schedule``: ``"step"`` (StepLR(``lr_step``, ``lr_gamma``) per epoch, the authors'),
    or ``"cosine"`` (per optimiser step, from ``lr`` to 0 over the run's ``epochs``).
    ``warmup_steps``: the learning rate rises linearly from 0 over the first optimiser steps.

    Writes ``out/best``, ``out/last`` (model directories, loadable by
    ``EfficientPBAN.from_checkpoint``) and ``out/log.csv``. SIGINT/SIGTERM saves ``last``
    and raises ``TrainingInterrupted``; ``resume=True`` continues from ``last`` exactly,
    ``log.csv`` included (an epoch's ``train_loss`` covers all its batches, ``elapsed_s``
    counts on).

    ``out`` must be new, empty, or a run of ours (``log.csv`` with our header, or a ``last``
    or ``best`` checkpoint): a folder holding anything else is refused, ``overwrite`` or
    not. An existing run is an error unless ``resume`` or ``overwrite`` is given (not both);
    one that stopped before saving anything (no checkpoint, a ``log.csv`` of its header only)
    starts again without ``overwrite``. ``overwrite`` removes only what a run writes
    (``RUN_ENTRIES``) and keeps other files. ``resume``: the options that define the training
    must be the checkpoint's (``_resumed_run_info``). Every image of the train and val splits
    is opened (``check_images``) before that. A non-finite training loss or validation score
    raises ``TrainingDiverged`` (a ValueError); ``last`` keeps the last good checkpoint.
    """
    if epochs < 1 or batch_size < 1 or accum_steps < 1:
        raise ValueError(f"epochs, batch_size and accum_steps must be >= 1, got {epochs}, {batch_size}, {accum_steps}")
    if crops_per_image < 1 or warmup_steps < 0:
        raise ValueError(f"crops_per_image must be >= 1 and warmup_steps >= 0, got {crops_per_image}, {warmup_steps}")
    if lr_schedule not in ("step", "cosine"):
        raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {lr_schedule!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not (0 < lr < math.inf and 0 < lr_gamma < math.inf and 0 <= weight_decay < math.inf) or lr_step < 1:
        raise ValueError(f"lr and lr_gamma must be positive and finite, weight_decay finite and >= 0, lr_step >= 1; "
                         f"got {lr}, {lr_gamma}, {weight_decay}, {lr_step}")
    for name, side in (("crop", crop), ("eval_size", None if eval_size in ("auto", None, 0) else eval_size)):
        if side is not None and side < MIN_INPUT_SIZE:
            raise ValueError(f"{name} must be at least {MIN_INPUT_SIZE} pixels (the model's smallest input), "
                             f"got {side}")
    check_resume_or_overwrite(resume, overwrite)
    out = Path(out)
    config_name = _build_config(config, (0.0, 1.0)).name  # also checks a preset name
    policy = DataPolicy.for_config(config_name) if crop is None else DataPolicy.crop(int(crop))
    if eval_size != "auto":
        policy = dataclasses.replace(policy, eval_size=None if eval_size in (None, 0) else int(eval_size))

    # -- data and arguments: everything is checked before anything is written -----------
    init_dir = _resolve_init(init, config)
    samples = load_manifest(data, root=root)
    train_samples = select_split(samples, "train", data)
    val_source = load_manifest(val_data, root=root) if val_data is not None else samples
    val_samples = select_split(val_source, "val" if val_data is None or any(s.split for s in val_source) else None,
                               val_data or data)
    notes = _upsampling_note(check_images(train_samples), policy, crop)
    val_sizes = check_images(val_samples, MIN_EVAL_SIZE if policy.eval_size is None else 1)
    scores = np.array([s.score for s in train_samples], dtype=np.float64)
    if scores.max() <= scores.min():
        raise ManifestError(f"{data}: all training scores are equal ({scores[0]}); nothing to learn")
    synthetic = is_toy(data)
    run_info = {
        "data": str(data), "root": None if root is None else str(root),
        "val_data": None if val_data is None else str(val_data), "config": config_name,
        "epochs": epochs, "batch_size": batch_size, "accum_steps": accum_steps, "lr": lr,
        "weight_decay": weight_decay, "lr_step": lr_step, "lr_gamma": lr_gamma, "lr_schedule": lr_schedule,
        "warmup_steps": warmup_steps, "crops_per_image": crops_per_image, "seed": seed, "freeze_stem": freeze_stem,
        "init": "random" if init_dir is None else str(init_dir),
        "backbone_weights": "hub" if backbone_weights is True else
        None if backbone_weights in (None, False) else str(backbone_weights),
        "data_policy": policy.to_dict(), "synthetic_scores": synthetic,
        "score_stats": {"min": float(scores.min()), "max": float(scores.max()), "mean": float(scores.mean()),
                        "std": float(scores.std()), "n": int(scores.size)},
    }

    last_dir = _check_out(out, resume, overwrite)
    resume_state = None
    if last_dir is not None:  # read now: a damaged checkpoint or changed options stop the run before any step
        resume_state = checkpoint.load_training_state(last_dir)
        missing = [key for key in _STATE_KEYS if key not in resume_state]
        if missing:
            raise ValueError(f"{last_dir / checkpoint.TRAINING_STATE_FILE}: not a training state of ours "
                             f"(it lacks {', '.join(missing)})")
        run_info = _resumed_run_info(last_dir, run_info)

    ctx = distributed.setup(device)
    try:
        return _train(**locals())
    finally:
        distributed.cleanup(ctx)


def _upsampling_note(sizes: list[tuple[int, int]], policy: DataPolicy, crop: int | None) -> str | None:
    """A warning when training images are smaller than the training crop: their crops are the
    whole image side, upsampled (``PairedTrainTransform`` clips the crop to the image). A warning,
    not an error: sets of mixed sizes (and the authors' 768..1080 crops) clip some crops by design."""
    small = [hw for hw in sizes if min(hw) < policy.train_size]
    if not small:
        return None
    h, w = min(small, key=min)
    which = f"--crop {crop}" if crop is not None else f"the default crop, {policy.train_size} (set --crop)"
    return (f"{len(small)} of {len(sizes)} training images are smaller than {which} (the smallest is {w}x{h}): "
            f"their crops are upsampled to {policy.train_size}x{policy.train_size}")


_STATE_KEYS = ("optimizer", "scheduler", "epoch", "batch_in_epoch", "step", "world_size", "rng")
# The run record's entries that define the training (see ``_resumed_run_info``), by the option that sets them.
_DEFINING = {"data": "--data", "root": "--root", "val_data": "--val-data", "config": "--config",
             "batch_size": "--batch-size", "accum_steps": "--accum-steps", "lr": "--lr",
             "weight_decay": "--weight-decay", "lr_step": "--lr-step", "lr_gamma": "--lr-gamma",
             "lr_schedule": "--lr-schedule", "warmup_steps": "--warmup-steps", "crops_per_image": "--crops-per-image",
             "seed": "--seed", "freeze_stem": "--no-freeze-stem", "init": "--init", "backbone_weights": "--weights",
             "score_stats": "the training scores of --data"}
_PATHS = ("data", "root", "val_data", "init", "backbone_weights")


def _defining_values(info: dict) -> dict:
    """``info``'s values that define the training, by option; ``--epochs`` only with the cosine
    schedule (it sets the schedule's length; with the step schedule it only says when to stop)."""
    values = {option: info[key] for key, option in _DEFINING.items() if key in info}
    policy = info.get("data_policy")
    if policy:
        crops = policy["crop_sizes"]
        values["--crop"] = crops[0] if crops == [policy["train_size"]] else f"{crops} -> {policy['train_size']}"
        values["--eval-size"] = policy["eval_size"] or "full"
    if info.get("lr_schedule") == "cosine":
        values["--epochs"] = info.get("epochs")
    return values


def _resumed_run_info(last_dir: Path, run_info: dict) -> dict:
    """The run record of a resumed run: the options that define the training must equal the
    checkpoint's (a ValueError lists each difference); what ``--resume`` may change (``--epochs``
    with the step schedule, ``--max-steps``, the device, workers) is recorded as used."""
    path = last_dir / checkpoint.TRAINING_INFO_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable run record ({exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a run record of ours")
    now, then = _defining_values(run_info), _defining_values(saved)
    paths = {_DEFINING[key] for key in _PATHS}

    def same(option) -> bool:
        a, b = now[option], then[option]
        return a == b or option in paths and None not in (a, b) and Path(a).resolve() == Path(b).resolve()

    changed = [option for option in now if option in then and not same(option)]
    if changed:
        shown = lambda v: f"{v['n']} scores, mean {v['mean']:.6g}" if isinstance(v, dict) else v  # noqa: E731
        listed = "; ".join(f"{option}: {shown(now[option])} (the run's: {shown(then[option])})" for option in changed)
        raise ValueError(f"--resume continues {last_dir} with its own options, and these differ: {listed}. "
                         "Drop them to resume, or start a new run (--overwrite or another --out)")
    # Equal values, but keep the run's spelling of its paths.
    return {**run_info, **{key: saved[key] for key in _PATHS if key in saved}}


def _resolve_init(init, config) -> Path | None:
    """The model directory training starts from, or None for random weights."""
    from epban import weights

    if init == "random":
        return None
    if init == "auto":
        name = config.name if isinstance(config, PBANConfig) else str(config)
        return weights.path("tiny-ssim") if name == "tiny" and weights.available("tiny-ssim") else None
    path = Path(init)
    if checkpoint.resolve(path) is None and not (path / "config.json").exists():
        raise FileNotFoundError(f"init={init!r}: not 'auto', 'random' or a model directory")
    return path


def _initial_model(init_dir: Path, config, score_range: tuple[float, float], scores: np.ndarray) -> EfficientPBAN:
    """The model at ``init_dir``, its output rescaled to the training scores.

    The pretrained output is in the units of its own target (``pretrain.json``: mean and
    std); the affine map that takes those to the training scores' mean and std is folded
    into the ``out`` layer, as the random start's output is set to the scores' scale.
    Without ``pretrain.json`` (another run's checkpoint) the output is kept as it is.
    """
    model = EfficientPBAN.from_checkpoint(init_dir).float()
    wanted = _build_config(config, score_range)
    have = dataclasses.replace(model.config, score_range=score_range, name=wanted.name)
    if have != wanted:
        raise ValueError(f"init weights {init_dir} have another architecture or normalisation than config "
                         f"{wanted.name!r}: {model.config} vs {wanted}")
    model.config = wanted
    stats_file = init_dir / "pretrain.json"
    if not stats_file.exists():  # e.g. an earlier run of ours: its output is already on a score scale
        return model
    stats = json.loads(stats_file.read_text())
    gain = float(scores.std() or 1.0) / float(stats["std"])
    with torch.no_grad():
        model.out.weight.mul_(gain)
        model.out.bias.sub_(float(stats["mean"])).mul_(gain).add_(float(scores.mean()))
    return model


# What a run writes in its folder (``checkpoint.write_dir_atomic`` adds ``.NAME.tmp-XXXXXXXX``
# while it writes ``NAME``); ``overwrite`` removes these and nothing else.
RUN_ENTRIES = ("best", "last", ".best.old", ".last.old", "log.csv", "log.csv.tmp", "tensorboard")
_RUN_TEMPORARY = re.compile(r"^\.(best|last)\.tmp-[0-9a-f]{8}$")


def _written_by_a_run(name: str) -> bool:
    return name in RUN_ENTRIES or bool(_RUN_TEMPORARY.match(name))


def is_run(out: Path) -> bool:
    """Whether ``out`` holds a run of ours: a ``log.csv`` with our header (written when a run
    starts), or a ``last`` or ``best`` checkpoint."""
    log = out / "log.csv"
    if log.is_file():
        with open(log, newline="", errors="replace") as f:
            if next(csv.reader(f), None) == LOG_FIELDS:
                return True
    return any(checkpoint.resolve(out / name) is not None for name in ("last", "best"))


def _check_out(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out`` for a run (see ``train_metric``); return the ``last`` checkpoint to resume from."""
    check_writable(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = bool(entries) and is_run(out)
    if entries and not ours:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise FileExistsError(f"--out {out} is not empty and holds no epban run ({shown}); choose a new or "
                              "empty folder")
    if resume:
        last_dir = checkpoint.resolve(out / "last")
        if last_dir is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {out / 'last'}")
        return last_dir
    if ours and not overwrite and not _started_only(out):
        raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume), overwrite=True "
                              "(--overwrite) or choose another --out")
    return None


def _started_only(out: Path) -> bool:
    """Whether the run in ``out`` stopped before it saved anything: no checkpoint, and a
    ``log.csv`` of its header only. Nothing is lost by starting it again, without ``overwrite``."""
    if any(checkpoint.resolve(out / name) is not None for name in ("last", "best")):
        return False
    with open(out / "log.csv", newline="", errors="replace") as f:
        return next(csv.DictReader(f), None) is None


def _remove_run(out: Path) -> list[str]:
    """Remove what a run wrote in ``out``; return the names of the other entries, kept."""
    import shutil

    kept = []
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        if not _written_by_a_run(entry.name):
            kept.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return kept


def _train(*, data, config, epochs, out, batch_size, lr, weight_decay, seed, resume, backbone_weights, max_steps,
           init_dir, quiet, lr_step, lr_gamma, crops_per_image, lr_schedule, warmup_steps, accum_steps, amp,
           num_workers, freeze_stem, callback, policy, train_samples, val_samples, val_sizes, scores, synthetic, last_dir,
           resume_state, run_info, notes, ctx, **_unused) -> Path:
    device = ctx.device
    show = not quiet and ctx.is_main
    if synthetic and show:
        print(f"warning: {SYNTHETIC_WARNING}", file=sys.stderr)

    # -- model, optimiser, schedule ------------------------------------------------------
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    score_range = (float(scores.min()), float(scores.max()))
    if last_dir is not None:
        model = EfficientPBAN.from_checkpoint(last_dir)
    elif init_dir is not None:
        model = _initial_model(init_dir, config, score_range, scores)
        if show:
            print(f"starting from {init_dir}", file=sys.stderr)
    else:
        model = EfficientPBAN(_build_config(config, score_range))
        if backbone_weights is not None and backbone_weights is not False:
            model.load_imagenet_backbone(None if backbone_weights is True else backbone_weights)
        with torch.no_grad():
            model.out.bias.fill_(float(scores.mean()))
            model.out.weight.mul_(float(scores.std()) or 1.0)
    frozen = [p for m in model.frozen_stem_modules() for p in m.parameters()] if freeze_stem else []
    for p in frozen + [p for m in _unused_modules(model) for p in m.parameters()]:
        p.requires_grad_(False)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    # -- data ----------------------------------------------------------------------------
    workers = default_workers(device) if num_workers is None else num_workers
    sampler = EpochBatchSampler(len(train_samples) * crops_per_image, batch_size, seed, rank=ctx.rank,
                                world_size=ctx.world_size)
    loader_gen = torch.Generator().manual_seed(seed + 1000 * ctx.rank)
    dataset = PairDataset(train_samples, policy.train_transform())
    loader = DataLoader(dataset if crops_per_image == 1 else _Repeated(dataset, crops_per_image),
                        batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=loader_gen, worker_init_fn=no_sigint_in_worker if workers else None)
    generators = {"loader": loader_gen}

    # The authors' StepLR steps once per epoch; warmup and cosine step once per optimiser step.
    per_step = lr_schedule == "cosine" or warmup_steps > 0
    steps_per_epoch = -(-sampler.num_batches() // accum_steps)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)

    def lr_factor(i: int) -> float:  # i: optimiser steps taken
        warm = min(1.0, (i + 1) / warmup_steps) if warmup_steps else 1.0
        if lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(i, total_steps) / total_steps))
        return warm * lr_gamma ** ((i // steps_per_epoch) // lr_step)

    if per_step:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)
    autocast_dtype = _autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- position in the run -------------------------------------------------------------
    start_epoch, start_batch, step = 0, 0, 0
    best_srcc = None  # the best val SRCC so far; None while no epoch had a defined one
    # The current epoch's sums so far (for its log.csv row) and the run's elapsed time, so
    # that a run resumed mid-epoch logs what an uninterrupted one would.
    progress = {"loss_sum": 0.0, "loss_count": 0, "images": 0, "seconds": 0.0, "lr": None, "elapsed_s": 0.0}
    if last_dir is not None:
        state = resume_state
        if state["world_size"] != ctx.world_size:
            print(f"warning: resuming with world size {ctx.world_size}; the run used {state['world_size']}: "
                  "the data order will differ", file=sys.stderr)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        best_srcc = state.get("best_srcc")
        progress.update(state.get("progress") or {})
        rng = state["rng"]
        if ctx.rank < len(rng):
            checkpoint.restore_rng(rng[ctx.rank], generators)
    distributed.barrier(ctx)  # every rank has checked ``out`` before rank 0 changes it
    log_rows = _read_log(out / "log.csv", step) if last_dir is not None else []
    if ctx.is_main and last_dir is None:
        kept = _remove_run(out)
        if kept and show:
            print(f"--overwrite: kept {len(kept)} entries that a run does not write ({', '.join(kept[:3])}"
                  f"{', ...' if len(kept) > 3 else ''})", file=sys.stderr)
        _write_log(make_out(out) / "log.csv", [])  # marks the folder as a run from its start
    tb = _tensorboard(out) if ctx.is_main else None
    have_best = checkpoint.resolve(out / "best") is not None

    run_info = {**run_info, "world_size": ctx.world_size}

    def save(name: str, *, epoch: int, batch_in_epoch: int, metrics: dict | None, with_state: bool,
             partial: dict | None = None) -> Path:
        rng_all = distributed.all_gather_objects(ctx, checkpoint.capture_rng(generators)) if with_state else None
        target = out / name
        if not ctx.is_main:
            return target

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if with_state:
                torch.save({
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                    "best_srcc": best_srcc,
                    "world_size": ctx.world_size, "batch_size": batch_size, "rng": rng_all,
                    "progress": {**(partial or {"loss_sum": 0.0, "loss_count": 0, "images": 0, "seconds": 0.0,
                                                "lr": None}),
                                 "elapsed_s": time.perf_counter() - t_start},
                }, tmp / checkpoint.TRAINING_STATE_FILE)
            write_json(tmp / checkpoint.TRAINING_INFO_FILE, {
                **run_info, "epoch": epoch, "step": step, "val": metrics})
        return checkpoint.write_dir_atomic(target, write)

    def diverged(what: str, epoch: int, at_step: int) -> TrainingDiverged:
        kept = checkpoint.resolve(out / "last")
        return TrainingDiverged(
            f"training diverged in epoch {epoch + 1}, step {at_step}: {what}; start again with a lower --lr than "
            f"{lr:g}" + (f" (--overwrite, or another --out); the last good checkpoint, {kept}, is kept (--init {kept} "
                         "starts from it)" if kept else " (no checkpoint was saved)"))

    def validate(epoch: int) -> dict:
        distributed.sync_buffers(ctx, model)
        preds = predict(model, val_samples, eval_size=policy.eval_size, batch_size=batch_size, ctx=ctx,
                        num_workers=workers, sizes=val_sizes, check_finite=False)
        if not np.isfinite(preds).all():  # the images were checked: the weights went wrong
            raise diverged("the model's scores on the validation images are not finite", epoch, step)
        report = build_report(val_samples, preds)
        report.pop("per_method", None)
        return report

    def finish_epoch(epoch: int, batch_in_epoch: int, epoch_loss: float, epoch_lr: float, images: int,
                     seconds: float, partial: dict | None) -> None:
        nonlocal best_srcc, have_best
        metrics = validate(epoch - (batch_in_epoch == 0))
        # A defined SRCC beats an undefined one (constant scores or predictions); while no epoch
        # had one, the latest epoch is the best.
        srcc = metrics["srcc"] if math.isfinite(metrics["srcc"]) else None
        improved = not have_best or (best_srcc is None if srcc is None else best_srcc is None or srcc > best_srcc)
        if srcc is not None and improved:
            best_srcc = srcc
        save("last", epoch=epoch, batch_in_epoch=batch_in_epoch, metrics=metrics, with_state=True, partial=partial)
        if improved:
            save("best", epoch=epoch, batch_in_epoch=batch_in_epoch, metrics=metrics, with_state=False)
            have_best = True
        if ctx.is_main:
            row = {"epoch": epoch + (batch_in_epoch > 0), "step": step, "train_loss": f"{epoch_loss:.6g}",
                   "lr": f"{epoch_lr:.6g}", "val_srcc": f"{metrics['srcc']:.6f}",
                   "val_plcc": f"{metrics['plcc']:.6f}", "val_krcc": f"{metrics['krcc']:.6f}",
                   "val_rmse": f"{metrics['rmse']:.6g}", "images_per_s": f"{images / max(seconds, 1e-9):.2f}",
                   "elapsed_s": f"{time.perf_counter() - t_start:.1f}"}
            log_rows.append(row)
            _write_log(out / "log.csv", log_rows)
            if tb is not None:
                for key in ("srcc", "plcc", "krcc", "rmse"):
                    tb.add_scalar(f"val/{key}", metrics[key], step)
            if show:
                print(f"epoch {row['epoch']}: loss {epoch_loss:.4g}  val SRCC {fmt_metric(metrics['srcc'])}  "
                      f"PLCC {fmt_metric(metrics['plcc'])}  RMSE {fmt_metric(metrics['rmse'])}"
                      + ("  (best)" if improved else ""), file=sys.stderr)

    # -- the loop ------------------------------------------------------------------------
    if notes and ctx.is_main:  # --quiet or not: likely a mistake
        print(f"warning: {notes}", file=sys.stderr)
    t_start = time.perf_counter() - progress["elapsed_s"]
    stop_reason = None
    with _StopSignal() as stop:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            batch_in_epoch = sampler.start_batch
            _set_train_mode(model, freeze_stem)
            epoch_lr = optimizer.param_groups[0]["lr"]
            loss_sum, loss_count, images, t_epoch = torch.zeros((), device=device), 0, 0, time.perf_counter()
            if epoch == start_epoch and batch_in_epoch > 0 and progress["loss_count"]:  # resumed mid-epoch
                loss_sum.fill_(progress["loss_sum"])
                loss_count, images = progress["loss_count"], progress["images"]
                t_epoch -= progress["seconds"]
                epoch_lr = progress["lr"] if progress["lr"] is not None else epoch_lr
            bar = None
            if show:
                from tqdm import tqdm

                bar = tqdm(total=sampler.num_batches(), initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                           unit="batch", file=sys.stderr, leave=False)
            pending = 0
            for batch in loader:
                sr = batch["sr"].to(device, non_blocking=True)
                hr = batch["hr"].to(device, non_blocking=True)
                target = batch["score"].to(device, non_blocking=True)
                sync_now = pending + 1 == accum_steps or batch_in_epoch + 1 == sampler.num_batches()
                ctx_sync = net.no_sync() if ctx.distributed and not sync_now else _null()
                with ctx_sync:
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        pred = net(sr, hr, check_finite=False)
                    loss = F.mse_loss(pred.float(), target)
                    scaler.scale(loss / accum_steps).backward()
                pending += 1
                batch_in_epoch += 1
                images += sr.shape[0] * ctx.world_size
                loss_sum += loss.detach()
                loss_count += 1
                if not sync_now:
                    continue
                # A non-finite loss: the weights diverged (the images and scores were checked). With
                # fp16 loss scaling an overflow is normal: the scaler skips that step.
                if not scaler.is_enabled() and distributed.any_rank(ctx, not bool(torch.isfinite(loss_sum))):
                    raise diverged("the training loss is not finite", epoch, step + 1)
                if pending < accum_steps:  # the epoch's last, partial accumulation: average what there is
                    for p in trainable:
                        if p.grad is not None:
                            p.grad.mul_(accum_steps / pending)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if per_step:
                    scheduler.step()
                pending = 0
                step += 1
                if callback is not None or (bar is not None and step % 5 == 0) or tb is not None:
                    loss_value = float(loss.detach())
                    if callback is not None:
                        callback({"epoch": epoch, "step": step, "loss": loss_value,
                                  "lr": optimizer.param_groups[0]["lr"]})
                    if tb is not None:
                        tb.add_scalar("train/loss", loss_value, step)
                    if bar is not None:
                        rate = images / max(time.perf_counter() - t_epoch, 1e-9)
                        bar.set_postfix(loss=f"{loss_value:.4g}", img_s=f"{rate:.1f}")
                if bar is not None:
                    bar.update(accum_steps if batch_in_epoch < sampler.num_batches() else bar.total - bar.n)
                if distributed.any_rank(ctx, stop.requested):
                    stop_reason = "signal"
                elif max_steps is not None and step >= max_steps:
                    stop_reason = "max_steps"
                if stop_reason:
                    break
            if bar is not None:
                bar.close()
            epoch_loss = float(loss_sum) / max(loss_count, 1)
            seconds = time.perf_counter() - t_epoch
            partial = {"loss_sum": float(loss_sum), "loss_count": loss_count, "images": images, "seconds": seconds,
                       "lr": epoch_lr}
            if stop_reason == "signal":
                last = save("last", epoch=epoch, batch_in_epoch=batch_in_epoch, metrics=None, with_state=True,
                            partial=partial)
                if show:
                    print(f"interrupted: saved {last} at step {step}; continue with --resume", file=sys.stderr)
                raise TrainingInterrupted(last, step)
            finished = batch_in_epoch >= sampler.num_batches()
            if finished and not per_step:
                scheduler.step()
            # The position saved is the start of the next epoch, or the next batch of this one.
            finish_epoch(epoch + 1 if finished else epoch, 0 if finished else batch_in_epoch,
                         epoch_loss, epoch_lr, images, seconds, None if finished else partial)
            if stop_reason:
                break
    if tb is not None:
        tb.close()
    distributed.barrier(ctx)
    best = out / "best"
    if best_srcc is None and ctx.is_main:  # --quiet or not: "best" was not chosen by SRCC
        print(f"note: no epoch had a defined val SRCC (constant scores or predictions on the validation images); "
              f"best is the last validated epoch: {best}", file=sys.stderr)
    elif show:
        print(f"best checkpoint (val SRCC {best_srcc:.4f}): {best}", file=sys.stderr)
    return best


class _Repeated(torch.utils.data.Dataset):
    """``dataset`` seen ``times`` times per epoch: item ``i`` is ``dataset[i % len(dataset)]``
    (each visit gets its own augmentation seed from the sampler)."""

    def __init__(self, dataset, times: int):
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = index % len(self.dataset)
        return self.dataset[index if seed is None else (index, seed)]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
