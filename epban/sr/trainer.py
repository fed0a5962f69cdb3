"""Training an SR network with ``SRLoss`` (L1 + SSIM + the frozen Efficient-PBAN), and the paper's ablation.

The network is one of ours (``net``: EDSR-baseline, RRDBNet, tiny) or any SR model file that
spandrel recognises (``net_weights``: Real-ESRGAN, SwinIR, HAT, SPAN, ...; see
``epban.sr.spandrel_models``), fine-tuned; ``freeze`` patterns keep some of its parameters fixed.

One run writes to ``out/``: ``config.json``, ``log.csv`` (the loss and its unweighted parts,
named as ``SRLoss`` names them: ``l1``, ``ssim_loss`` = 1 - SSIM, ``pban_loss`` = the negated,
rescaled metric score; lower is better), ``eval.csv`` (validation metrics: ``psnr_y``,
``ssim_y``, ``pban_score`` = the metric's raw score, higher is better, ``lpips``),
``samples/step_XXXXXX.png`` (bicubic / SR / HR crops), ``checkpoint.pt`` (model, optimiser,
scheduler, step, RNG states: ``resume=True`` continues exactly where it stopped, and
``log.csv`` / ``eval.csv`` continue as an uninterrupted run's would), the final weights
(``net.pt``; for a spandrel model ``net.pth`` or ``net.safetensors`` in its input file's
layout and names) and ``metrics.json`` (final and bicubic metrics).

Everything is checked before anything is written: the options, every training and validation
image (``SRFolderDataset``), the networks, and ``out``, which must be empty, new, or a run of
ours (its ``config.json`` says so); a run of ours is continued with ``resume`` (the options
that define the training must equal the checkpoint's) or replaced with ``overwrite``, and
refused otherwise. A training loss that turns non-finite stops the run before it writes a
log row, a validation or a file (``TrainingDiverged``): the last checkpoint stays good.

The network trains in bf16 autocast on CUDA (``amp``); the loss is computed in float32
(SSIM's variances cancel catastrophically in bf16), and validation runs in float32 (bf16
outputs are coarser than the 8-bit levels the metrics measure). Under ``torchrun`` the batch is
split over ranks (DDP; NCCL on CUDA, gloo on CPU), each rank validates its share of the images
(``epban.sr.evaluate.ValidationScores``: torchmetrics metrics when installed, whose means sum
over ranks), and rank 0 writes.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from epban.losses import SRLoss
from epban.models.pban import MIN_INPUT_SIZE, EfficientPBAN
from epban.sr.data import SRFolderDataset, StepSampler, collate
from epban.sr.evaluate import autocast_for, evaluate, load_lpips
from epban.sr.metrics import SSIM_WINDOW, min_image_side
from epban.sr.networks import NETWORKS, build_network, freeze_parameters
from epban.sr.report import ablation_markdown, comparison_crops, save_grid, save_side_by_side
from epban.training import checkpoint, distributed, run_folder
from epban.training.records import write_json

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
# What a run writes (a rerun without resume removes these first; other files stay).
RUN_OUTPUTS = ("log.csv", "eval.csv", "metrics.json", CHECKPOINT_FILE, "net.pt", "net.pth", "net.safetensors",
               "ablation.md", "ablation.json", "ablation.png")
ABLATION_WEIGHTS = {"ssim": 1.0, "pban": 0.1}  # the term weights of --ablation unless given
ABLATION_SETTINGS = (("L1", False, False), ("L1+SSIM", True, False), ("L1+PBAN", False, True), ("L1+SSIM+PBAN", True, True))


PBAN_MODES = ("fast", "fast-bf16", "reference")


@dataclass
class SRTrainConfig:
    """Everything a run depends on; saved as ``out/config.json``."""

    train: str  # HR folder
    val: str | None = None  # HR folder for validation (whole images)
    train_lr: str | None = None  # paired LR folder (else LR is made by bicubic downsampling)
    val_lr: str | None = None
    out: str = "runs/sr"
    net: str | None = None  # edsr (EDSR-baseline) | rrdb (narrow RRDBNet) | tiny; default edsr, none with net_weights
    net_weights: str | None = None  # an SR model file spandrel recognises: its architecture and weights, fine-tuned
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names to keep fixed
    scale: int | None = None  # default: the model's with net_weights, else 4
    patch_size: int = 96  # HR crop side; ignored with full_res
    full_res: bool = False  # train on whole images (the case the fused loss is for)
    batch_size: int = 16  # per process
    steps: int = 10_000
    lr: float = 2e-4
    l1: float = 1.0
    ssim: float = 0.0
    pban: float = 0.0
    pban_weights: str | None = None  # an epban checkpoint (directory) or the authors' .pth
    # How the frozen metric runs as a loss: "fast" (the loss mode: BatchNorm folded,
    # channels_last, fused kernels; float32, scores within 1e-5 of the model; on CUDA with fixed
    # crops also CUDA graphs), "fast-bf16" (the same in bfloat16, ~1e-2) or "reference" (the
    # model's own forward).
    pban_mode: str = "fast"
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 10
    seed: int = 0
    device: str | None = None  # default: cuda when available
    amp: bool = True  # bf16 autocast on CUDA; no effect on the CPU
    channels_last: bool | None = None  # default: on CUDA only
    workers: int | None = None  # DataLoader workers; default 4 on CUDA, 0 on the CPU
    modcrop: bool = False  # trim HR images to a multiple of the scale instead of refusing them
    max_val_images: int | None = None
    sample_crop: int = 128  # HR side of the crops in the side-by-side PNGs
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in ``out`` (only the files a run writes)
    stop_at: int | None = None  # stop after this step with a checkpoint (time-limited jobs); resume later
    quiet: bool = False

    def validate(self) -> None:
        if self.net is not None and self.net_weights:
            raise ValueError(f"give a built-in network (--net {self.net}) or a model file (--net-weights), not both")
        if self.net is not None and self.net not in NETWORKS:
            raise ValueError(f"unknown SR network {self.net!r}; expected one of {sorted(NETWORKS)}")
        if self.scale is not None and self.scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {self.scale}")
        run_folder.check_resume_or_overwrite(self.resume, self.overwrite)
        for name, least in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("save_every", 1), ("log_every", 1),
                            ("sample_crop", self.scale or 1), ("seed", 0), ("workers", 0), ("max_val_images", 1),
                            ("stop_at", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                what = f"the scale {self.scale}" if name == "sample_crop" else least
                raise ValueError(f"--{name.replace('_', '-')} must be at least {what}, got {value}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        weights = (self.l1, self.ssim, self.pban)
        if not all(0 <= w < math.inf for w in weights) or sum(weights) == 0:
            raise ValueError(f"loss weights must be finite, non-negative and not all zero, got --l1 {self.l1}, "
                             f"--ssim {self.ssim}, --pban {self.pban}")
        if self.val_lr and not self.val:
            raise ValueError("--val-lr pairs LR images with the validation images of --val: give --val too")
        if self.ssim > 0 and not self.full_res and self.patch_size < SSIM_WINDOW:
            raise ValueError(f"the SSIM loss needs crops of at least {SSIM_WINDOW} pixels, got --patch-size {self.patch_size}")
        if self.pban_mode not in PBAN_MODES:
            raise ValueError(f"pban_mode must be one of {PBAN_MODES}, got {self.pban_mode!r}")
        if self.pban > 0 and not self.pban_weights:
            raise ValueError("a PBAN loss weight needs --pban-weights (a trained metric checkpoint)")
        if self.pban > 0 and not self.full_res and self.patch_size < MIN_INPUT_SIZE:
            raise ValueError(f"the PBAN loss needs crops of at least {MIN_INPUT_SIZE} pixels, got --patch-size {self.patch_size}")

    @property
    def net_label(self) -> str:
        """The network's name in titles and messages."""
        return self.net or Path(self.net_weights or "").name or "edsr"


# ---------------------------------------------------------------------------- the network
def load_network(config: SRTrainConfig):
    """``(config with net and scale filled in, SpandrelNet or None)``; the model file, when one is
    given, is read and checked (architecture, RGB, scale) here."""
    if config.net_weights:
        from epban.sr.spandrel_models import load_spandrel

        loaded = load_spandrel(config.net_weights, scale=config.scale)
        return dataclasses.replace(config, scale=loaded.scale), loaded
    return dataclasses.replace(config, net=config.net or "edsr", scale=config.scale or 4), None


def build_sr_network(config: SRTrainConfig, loaded=None) -> torch.nn.Module:
    """The network a run trains: ``loaded.module`` (a spandrel model), else ``config.net`` initialised
    from ``config.seed``; ``config.freeze`` applied. Call with a ``load_network`` config."""
    if loaded is not None:
        net = loaded.module
        if config.freeze:
            freeze_parameters(net.net, config.freeze, loaded.file_name)
        return net
    torch.manual_seed(config.seed)
    net = build_network(config.net, config.scale)
    if config.freeze:
        freeze_parameters(net, config.freeze)
    return net


def load_trained(config: SRTrainConfig, run_dir: Path) -> torch.nn.Module:
    """The final network of a finished run in ``run_dir`` (``config`` as ``load_network`` returns it)."""
    run_dir = Path(run_dir)
    if config.net_weights:
        from epban.sr.spandrel_models import load_spandrel

        saved = next((run_dir / f for f in ("net.pth", "net.safetensors") if (run_dir / f).exists()), run_dir / "net.pth")
        return load_spandrel(saved, scale=config.scale).module
    net = build_network(config.net, config.scale)
    net.load_state_dict(torch.load(run_dir / "net.pt", map_location="cpu", weights_only=True))
    return net


# ---------------------------------------------------------------------------- the run folder
def is_sr_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run (or an ablation) of ``train_sr``: its config.json says so."""
    try:
        saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"train", "scale", "steps", "l1"} <= set(saved)


def check_out(out: Path, resume: bool = False, overwrite: bool = False) -> None:
    """``out`` must be a folder we may write in that is new, empty, or a run of ours, and a run of
    ours needs ``resume`` (continue it) or ``overwrite`` (replace it); ``ValueError`` otherwise."""
    out = Path(out)
    run_folder.check_writable(out)
    if out.is_dir() and any(out.iterdir()):
        if not is_sr_run(out):
            raise ValueError(f"--out {out} is not empty and holds no SR run of ours (no {CONFIG_FILE} of train-sr); "
                             "choose another --out or empty it")
        if not (resume or overwrite):
            raise ValueError(f"--out {out} already holds a train-sr run: pass --resume to continue it, --overwrite "
                             "to replace it (removes only the files a run writes), or choose another --out")


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote in ``out`` (``RUN_OUTPUTS`` and its samples); other files stay."""
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    samples = out / "samples"
    if samples.is_dir():
        for png in samples.glob("step_*.png"):
            png.unlink()
        if not any(samples.iterdir()):
            samples.rmdir()


# ---------------------------------------------------------------------------- state
def save_checkpoint(path: Path, net, optimizer, scheduler, step: int, config: SRTrainConfig,
                    seconds: float = 0.0) -> None:
    """Everything ``resume`` needs (network, optimiser, schedule, step, RNG states, config, training
    time so far), written atomically."""
    state = {
        "net": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "seconds": seconds,
        "rng": checkpoint.capture_rng(),
        "config": dataclasses.asdict(config),
    }
    checkpoint.save_atomic(state, path)


# The options a resumed run may change: where and how it runs, what it validates, how often it
# writes. Every other option defines the training and must equal the checkpoint's.
RESUME_FREE = ("out", "resume", "overwrite", "stop_at", "quiet", "device", "workers", "amp", "channels_last",
               "pban_mode", "val", "val_lr", "max_val_images", "eval_every", "save_every", "log_every", "sample_crop")
CHECKPOINT_KEYS = ("net", "optimizer", "scheduler", "step", "rng", "config")


def read_checkpoint(path: Path, config: SRTrainConfig) -> dict:
    """The ``save_checkpoint`` state at ``path``, to resume ``config`` (as ``load_network`` returns it)
    from: ``ValueError`` naming the file if it is not one, or if an option that defines the training
    differs from the checkpoint's (each such option is listed with both values)."""
    if not path.exists():
        raise ValueError(f"nothing to resume: {path} does not exist")
    state = checkpoint.load_state(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["step"], int):
        raise ValueError(f"{path}: not a train-sr checkpoint (" + (f"no {', '.join(missing)})" if missing else
                                                                   "a malformed config or step)"))
    saved, defaults = state["config"], dataclasses.asdict(SRTrainConfig(train=""))
    differ = [k for k in defaults if k not in RESUME_FREE and saved.get(k, defaults[k]) != getattr(config, k)]
    if differ:
        listed = "; ".join(f"--{k.replace('_', '-')} {getattr(config, k)} (checkpoint: {saved.get(k, defaults[k])})"
                           for k in differ)
        raise ValueError(f"cannot resume {path}: options that define the training differ from the checkpoint's: "
                         f"{listed}. Give the checkpoint's values, or start a new run (--overwrite or another --out)")
    if config.stop_at is not None and config.stop_at <= state["step"]:
        raise ValueError(f"--stop-at {config.stop_at}: {path} is already at step {state['step']}")
    return state


def restore_checkpoint(path: Path, state: dict, net, optimizer, scheduler) -> tuple[int, float]:
    """Put a ``read_checkpoint`` state into ``net``, ``optimizer``, ``scheduler`` and the RNGs; return
    its step and the training seconds before it."""
    try:
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.restore_rng(state["rng"])
        return state["step"], float(state.get("seconds", 0.0))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        reason = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise ValueError(f"{path}: a damaged train-sr checkpoint ({type(exc).__name__}: {reason})") from None


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of a CSV log up to ``step``: a resumed run writes the later ones again."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if r.get("step") and int(float(r["step"])) <= step]
    if not fields:
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


class _CsvLog:
    """Rows appended to a CSV file under the header ``fields``, flushed as written. With
    ``append`` an existing file is continued (its rows rewritten under ``fields`` first if its
    header differs); otherwise it is replaced."""

    def __init__(self, path: Path, fields: list[str], append: bool):
        rows = None
        if append and path.exists():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != fields:
                    rows = list(reader)
        else:
            rows = []
        self.file = path.open("w" if rows is not None else "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if rows is not None:
            self.writer.writeheader()
            self.writer.writerows(rows)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _load_pban(config: SRTrainConfig, device):
    """The metric of ``--pban-weights``: a path, or the name of bundled weights (as ``epban score
    --weights`` takes it)."""
    from epban import weights

    if not config.pban_weights:
        return None
    path = weights.resolve(config.pban_weights, "--pban-weights")
    try:
        return EfficientPBAN.from_checkpoint(path).to(device).eval()
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"--pban-weights: {exc}") from None


# ---------------------------------------------------------------------------- training
def pban_loss_mode(config: "SRTrainConfig", device: torch.device) -> bool | dict:
    """The ``loss_mode`` argument of the PBAN loss for ``config.pban_mode`` on ``device``:
    CUDA graphs need fixed input shapes, so only crops (not ``full_res``) on CUDA get them."""
    if config.pban_mode == "reference":
        return False
    return {"dtype": torch.bfloat16 if config.pban_mode == "fast-bf16" else torch.float32,
            "cuda_graph": device.type == "cuda" and not config.full_res}


def train_sr(config: SRTrainConfig) -> dict:
    """Train (or resume) one SR run; returns the summary also written to ``out/metrics.json``."""
    config.validate()
    config, loaded = load_network(config)
    config.validate()  # again: the model file may set the scale
    check_out(Path(config.out), config.resume, config.overwrite)
    state = read_checkpoint(Path(config.out) / CHECKPOINT_FILE, config) if config.resume else None
    ctx = distributed.setup(config.device)
    try:
        return _train(config, ctx, loaded, state)
    finally:
        distributed.cleanup(ctx)


def _datasets(config: SRTrainConfig):
    """The training and validation sets (every image opened and checked)."""
    train_set = SRFolderDataset(config.train, config.scale, lr_folder=config.train_lr, names=("--train", "--train-lr"),
                                patch_size=None if config.full_res else config.patch_size, modcrop=config.modcrop)
    val_set = None
    if config.val:
        val_set = SRFolderDataset(config.val, config.scale, lr_folder=config.val_lr, patch_size=None,
                                  augment=False, modcrop=config.modcrop, names=("--val", "--val-lr"))
        if config.max_val_images is not None:
            val_set.limit(config.max_val_images)
        side = min_image_side(config.scale)  # PSNR and SSIM on Y after a scale-pixel border crop
        for path, (h, w) in zip(val_set.hr_paths, val_set.sizes):
            if min(h, w) < side:
                raise ValueError(f"{path} is {h}x{w}: validation at x{config.scale} needs images of at least "
                                 f"{side}x{side} (SSIM's {SSIM_WINDOW}-pixel window after a {config.scale}-pixel "
                                 "border crop); drop it from --val")
            if config.pban_weights and min(h, w) < MIN_INPUT_SIZE:
                raise ValueError(f"{path} is smaller than the {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} the PBAN score needs")
    return train_set, val_set


def _train(config: SRTrainConfig, ctx: distributed.DistContext, loaded, state: dict | None) -> dict:
    device = ctx.device
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    workers = (4 if device.type == "cuda" else 0) if config.workers is None else config.workers
    out = Path(config.out)
    say = (lambda *a: None) if (config.quiet or not ctx.is_main) else print

    # -- everything is checked before anything is written ----------------------------------
    train_set, val_set = _datasets(config)
    pban_model = _load_pban(config, device)
    net = build_sr_network(config, loaded).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    amp = config.amp
    if loaded is not None:
        say(f"fine-tuning {loaded.description}")
        if amp and device.type == "cuda" and not loaded.supports_bfloat16:
            say(f"{loaded.architecture} does not run in bfloat16: training in float32")
            amp = False
    criterion = SRLoss(config.l1, config.ssim, config.pban, pban_model=pban_model,
                       pban_loss_mode=pban_loss_mode(config, device)).to(device)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps, eta_min=config.lr * 0.01)

    ckpt_path = out / CHECKPOINT_FILE
    step, seconds_before = restore_checkpoint(ckpt_path, state, net, optimizer, scheduler) if state else (0, 0.0)
    saved_step = step if state else None  # the step of the last good checkpoint
    if ctx.is_main:
        run_folder.make_out(out)
        if config.resume:
            for name in ("log.csv", "eval.csv"):
                truncate_log(out / name, step)
        else:
            clear_run(out)
        write_json(out / CONFIG_FILE, dataclasses.asdict(config))
    distributed.barrier(ctx)
    model = net
    if ctx.distributed:
        # a spandrel model may hold parameters its training forward does not use (SPAN's eval_conv)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                          find_unused_parameters=loaded is not None)

    lpips_fn, lpips_note = (None, None)
    baseline = None
    if val_set is not None:  # every rank validates its share of the images
        lpips_fn, lpips_note = load_lpips(device)
        if distributed.any_rank(ctx, lpips_fn is None):  # the same columns on every rank
            lpips_fn, lpips_note = None, lpips_note or "LPIPS skipped: not available on every rank"
        if lpips_note:
            say(lpips_note)
        baseline = evaluate(None, val_set, device, config.scale, scorer=pban_model, lpips_fn=lpips_fn, bicubic=True,
                            ctx=ctx)

    sampler = StepSampler(len(train_set), config.batch_size, config.steps, seed=config.seed, start_step=step,
                          rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
    log_fields = ["step", "loss", *SRLoss.PART_NAMES.values(), "lr", "seconds"]
    loss_log = _CsvLog(out / "log.csv", log_fields, config.resume) if ctx.is_main else None
    eval_log = None
    history = []
    last_eval = None

    def run_eval():
        nonlocal eval_log, last_eval
        if val_set is None:
            return
        distributed.sync_buffers(ctx, net)  # every rank validates rank 0's model
        # float32 even with --amp: bf16 outputs are coarser than the 8-bit levels the metrics see
        m = evaluate(net, val_set, device, config.scale, scorer=pban_model, lpips_fn=lpips_fn,
                     channels_last=channels_last, ctx=ctx)
        last_eval = m
        if not ctx.is_main:
            return
        row = {"step": step, **m["mean"]}
        if eval_log is None:
            eval_log = _CsvLog(out / "eval.csv", list(row), config.resume)
        eval_log.write(row)
        history.append(row)
        save_side_by_side(out / "samples" / f"step_{step:06d}.png", net, val_set, device, config.scale,
                          crop=config.sample_crop, metrics=m, baseline=baseline, channels_last=channels_last,
                          title=f"{config.net_label} x{config.scale}, step {step}")
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in m["mean"].items()))

    # The first step whose loss was not finite (0: none), kept on the device (no sync per step) and
    # checked before anything is logged, validated or saved.
    nonfinite = torch.zeros((), dtype=torch.long, device=device)

    def check_finite():
        first = int(nonfinite)
        if distributed.any_rank(ctx, first > 0):
            saved = f"the checkpoint of step {saved_step} is kept" if saved_step else "no checkpoint was written"
            raise run_folder.TrainingDiverged(f"the training loss is not finite from step {first or step} on: the run diverged "
                                   f"({saved}); lower --lr (now {config.lr:g}) and start again with --overwrite")

    net.train()
    criterion.train()
    start = time.time() - seconds_before  # log.csv's seconds count the whole run, across resumes
    bar = None
    if ctx.is_main and not config.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.net_label} x{config.scale}", unit="step")
    try:
        for batch in loader:
            lr = batch["lr"].to(device, non_blocking=True)
            hr = batch["hr"].to(device, non_blocking=True)
            if channels_last:
                lr = lr.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, amp):
                sr = model(lr)
            with torch.autocast(device.type, enabled=False):
                loss, parts = criterion(sr.float(), hr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            nonfinite = torch.where((nonfinite == 0) & ~torch.isfinite(loss.detach()), step, nonfinite)
            last = step == config.steps
            log_now, eval_now = step % config.log_every == 0 or last, step % config.eval_every == 0 or last
            save_now, stop_now = step % config.save_every == 0 or last, config.stop_at is not None and step >= config.stop_at
            if log_now or eval_now or save_now or stop_now:
                check_finite()
            if loss_log is not None and log_now:
                row = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                       "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - start, 2)}
                loss_log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if eval_now:
                run_eval()
                distributed.barrier(ctx)
            if save_now or stop_now:
                if ctx.is_main:
                    save_checkpoint(ckpt_path, net, optimizer, scheduler, step, config, time.time() - start)
                saved_step = step
                distributed.barrier(ctx)
            if stop_now:
                say(f"stopped at step {step} (--stop-at); continue with --resume")
                break
    except KeyboardInterrupt:
        if ctx.is_main:
            if int(nonfinite):  # keep the last good checkpoint rather than non-finite weights
                print(f"\ninterrupted at step {step}; the loss was not finite from step {int(nonfinite)} on, so no "
                      f"checkpoint was saved ({ckpt_path} is of step {saved_step or 'none'})")
            else:
                save_checkpoint(ckpt_path, net, optimizer, scheduler, step, config, time.time() - start)
                print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt_path} (resume with --resume)")
        raise
    finally:
        if bar is not None:
            bar.close()
        for log in (loss_log, eval_log):
            if log is not None:
                log.close()

    summary = {"config": dataclasses.asdict(config), "steps": step, "seconds": round(time.time() - start, 2)}
    if val_set is not None and last_eval is None:  # resumed at the end: nothing was evaluated in this process
        run_eval()
        if eval_log is not None:
            eval_log.close()
    if ctx.is_main:
        if loaded is not None:
            from epban.sr.spandrel_models import save_spandrel

            summary["net_file"] = save_spandrel(loaded, out).name
            summary["architecture"] = loaded.architecture
        else:
            checkpoint.save_atomic(net.state_dict(), out / "net.pt")
            summary["net_file"] = "net.pt"
        if val_set is not None:
            summary.update({"final": last_eval, "bicubic": baseline, "history": history, "lpips": lpips_note or "computed"})
        write_json(out / "metrics.json", summary)
    distributed.barrier(ctx)
    return summary


# ---------------------------------------------------------------------------- ablation
def run_ablation(config: SRTrainConfig, *, ssim_weight: float = ABLATION_WEIGHTS["ssim"],
                 pban_weight: float = ABLATION_WEIGHTS["pban"]) -> dict:
    """The paper's four loss settings with the same seed, data and budget; one table and one figure.

    Each setting trains in ``out/<setting>/``; ``out/ablation.md``, ``out/ablation.json``
    and ``out/ablation.png`` (bicubic / each setting / HR crops) compare them. With ``resume``
    the settings with a checkpoint continue and the others start.
    """
    if not config.pban_weights:
        raise ValueError("--ablation needs --pban-weights (the L1+PBAN settings use it, all settings are scored with it)")
    if not config.val:
        raise ValueError("--ablation needs a validation folder (--val)")
    config.validate()
    config, _ = load_network(config)
    config.validate()
    out = Path(config.out)
    check_out(out, config.resume, config.overwrite)
    settings = _ablation_settings(config, ssim_weight, pban_weight)
    if config.resume and not any(c.resume for c in settings.values()):
        raise ValueError(f"nothing to resume: no setting in {out} has a {CHECKPOINT_FILE}")
    for run_cfg in settings.values():  # every setting's options and folder, before the first one trains
        run_cfg.validate()
        check_out(Path(run_cfg.out), run_cfg.resume, run_cfg.overwrite)
        if run_cfg.resume:
            read_checkpoint(Path(run_cfg.out) / CHECKPOINT_FILE, run_cfg)
    _datasets(config)  # bad images stop the ablation before anything is written
    _load_pban(config, "cpu")
    ctx = distributed.setup(config.device)  # one process group for the four runs
    try:
        if ctx.is_main:
            run_folder.make_out(out)
            if not config.resume:
                clear_run(out)
            weights = {"ssim": ssim_weight, "pban": pban_weight}
            write_json(out / CONFIG_FILE, dataclasses.asdict(config) | {"ablation": weights})
        distributed.barrier(ctx)
        return _ablation(config, ctx, settings)
    finally:
        distributed.cleanup(ctx)


def _ablation_settings(config: SRTrainConfig, ssim_weight: float, pban_weight: float) -> dict[str, SRTrainConfig]:
    """The run config of each setting: resumed where ``resume`` finds its checkpoint, else started
    (replacing what a setting that died before its first checkpoint left)."""
    settings = {}
    for name, use_ssim, use_pban in ABLATION_SETTINGS:
        folder = Path(config.out) / name.replace("+", "_")
        resume = config.resume and (folder / CHECKPOINT_FILE).exists()
        settings[name] = dataclasses.replace(config, out=str(folder), l1=1.0, ssim=ssim_weight if use_ssim else 0.0,
                                             pban=pban_weight if use_pban else 0.0, resume=resume,
                                             overwrite=not resume and (config.overwrite or config.resume))
    return settings


def _ablation(config: SRTrainConfig, ctx: distributed.DistContext, settings: dict[str, SRTrainConfig]) -> dict:
    out = Path(config.out)
    results = []
    for name, run_cfg in settings.items():
        summary = train_sr(run_cfg)
        results.append({"setting": name, "out": run_cfg.out,
                        "weights": {"l1": run_cfg.l1, "ssim": run_cfg.ssim, "pban": run_cfg.pban},
                        "eval": summary.get("final"), "bicubic": summary.get("bicubic")})
    if not ctx.is_main:
        return {}
    device = ctx.device
    baseline = results[0]["bicubic"]
    table = ablation_markdown(results, baseline)
    (out / "ablation.md").write_text(table)
    report = {"settings": [{k: r[k] for k in ("setting", "out", "weights")} | {"mean": r["eval"]["mean"], "images": r["eval"]["images"]}
                           for r in results],
              "bicubic": baseline, "steps": config.steps, "seed": config.seed, "net": config.net,
              "net_weights": config.net_weights, "scale": config.scale}
    write_json(out / "ablation.json", report)
    save_ablation_figure(out / "ablation.png", config, results, device)
    if not config.quiet:
        print(table)
        print(f"ablation table: {out / 'ablation.md'} and {out / 'ablation.json'}; figure: {out / 'ablation.png'}")
    return report


@torch.no_grad()
def save_ablation_figure(path: Path, config: SRTrainConfig, results: list[dict], device, max_images: int = 3) -> Path:
    from epban.sr.evaluate import super_resolve
    from epban.sr.imresize import bicubic_upsample, quantize

    val_set = SRFolderDataset(config.val, config.scale, lr_folder=config.val_lr, patch_size=None, augment=False,
                              modcrop=config.modcrop)
    nets = {r["setting"]: load_trained(config, Path(r["out"])).to(device).eval() for r in results}
    rows, labels, captions = [], [], []
    for i in range(min(max_images, len(val_set))):
        item = val_set[i]
        lr, hr = item["lr"][None].to(device), item["hr"][None].to(device)
        cols = {"bicubic": quantize(bicubic_upsample(lr, config.scale))[0]}
        b = results[0]["bicubic"]["images"][item["name"]]
        cap = {"bicubic": f"{b['psnr_y']:.2f} dB" + (f" / PBAN {b['pban_score']:.3f}" if "pban_score" in b else "")}
        for name, net in nets.items():
            cols[name] = super_resolve(net, lr)[0]
        cols["HR"] = hr[0]
        rows.append(comparison_crops(cols, config.sample_crop, config.scale))
        for r in results:
            m = r["eval"]["images"][item["name"]]
            cap[r["setting"]] = f"{m['psnr_y']:.2f} dB" + (f" / PBAN {m['pban_score']:.3f}" if "pban_score" in m else "")
        labels.append(item["name"])
        captions.append(cap)
    title = f"{config.net_label} x{config.scale}, {config.steps} steps, seed {config.seed}: same data and budget for each loss"
    return save_grid(path, rows, title=title, row_labels=labels, captions=captions)
