"""Validation of an SR network: PSNR / SSIM on Y, the PBAN score, LPIPS when available, and the bicubic baseline."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from epban.sr.imresize import bicubic_upsample, quantize
from epban.sr.metrics import psnr_y, ssim_y

LPIPS_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # what lpips.LPIPS(net="alex") asks torchvision for


def load_lpips(device) -> tuple[object | None, str | None]:
    """``(lpips_fn, None)``, or ``(None, why it is skipped)``; never downloads anything."""
    try:
        import lpips
    except ImportError:
        return None, "LPIPS skipped: the lpips package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_ALEXNET_FILE
    if not weights.exists():
        return None, f"LPIPS skipped: its AlexNet weights are not cached at {weights} (they are never downloaded)"
    try:
        fn = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # a broken cache or an incompatible lpips version
        return None, f"LPIPS skipped: cannot load it ({exc})"
    for p in fn.parameters():
        p.requires_grad_(False)
    return fn, None


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def super_resolve(net, lr: torch.Tensor, *, amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """SR of a batch, rounded to 8 bits as a saved result would be."""
    if channels_last:
        lr = lr.contiguous(memory_format=torch.channels_last)
    with autocast_for(lr.device, amp):
        sr = net(lr)
    return quantize(sr.float()).contiguous()


@torch.no_grad()
def image_metrics(sr: torch.Tensor, hr: torch.Tensor, scale: int, scorer=None, lpips_fn=None) -> dict:
    """Per-image metrics of one (1, 3, H, W) pair: ``psnr_y``, ``ssim_y``, ``pban_score`` (the metric's raw
    score, higher is better; when a scorer is given), ``lpips`` (when available)."""
    out = {"psnr_y": float(psnr_y(sr, hr, crop=scale)[0]), "ssim_y": float(ssim_y(sr, hr, crop=scale)[0])}
    if scorer is not None:
        out["pban_score"] = float(scorer.score(sr, hr)[0])
    if lpips_fn is not None:
        out["lpips"] = float(lpips_fn(sr * 2 - 1, hr * 2 - 1).flatten()[0])
    return out


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


@torch.no_grad()
def evaluate(net, dataset, device, scale: int, *, scorer=None, lpips_fn=None, amp=False, channels_last=False,
             bicubic: bool = False) -> dict:
    """Mean metrics over a validation dataset (whole images, one at a time).

    ``net=None`` with ``bicubic=True`` evaluates the bicubic baseline instead.
    Returns ``{"mean": {...}, "images": {name: {...}}}``.
    """
    was_training = net.training if net is not None else False
    if net is not None:
        net.eval()
    per_image = {}
    for i in range(len(dataset)):
        item = dataset[i]
        lr, hr = item["lr"][None].to(device), item["hr"][None].to(device)
        if bicubic:
            sr = quantize(bicubic_upsample(lr, scale))
        else:
            sr = super_resolve(net, lr, amp=amp, channels_last=channels_last)
        per_image[item["name"]] = image_metrics(sr, hr, scale, scorer, lpips_fn)
    if net is not None and was_training:
        net.train()
    return {"mean": _mean(list(per_image.values())), "images": per_image}
