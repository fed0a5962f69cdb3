"""Validation of an SR network: PSNR / SSIM on Y, the PBAN score, LPIPS when available, and the bicubic baseline."""
from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import torch
import torch.distributed as dist

from epban.models.pban import EfficientPBAN
from epban.sr.imresize import bicubic_upsample, quantize
from epban.sr.metrics import _crop_y, psnr_y, ssim_y
from epban.training import distributed

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


class ValidationScores:
    """The validation metrics of eval.csv for (1, 3, H, W) SR / HR pairs in [0, 1]: ``psnr_y`` and
    ``ssim_y`` (Y with a ``scale``-pixel border crop), ``pban_score`` (with ``pban_model``: its raw
    score, higher is better), ``lpips`` (with ``lpips_fn``).

    Calling it with a pair returns that image's values and adds them to the running means;
    ``compute()`` gives the means over every image added, in every process when ``sync`` (under
    DDP each process adds its share of the images). With torchmetrics installed
    (``pip install 'epban[metrics]'``) the means are torchmetrics metrics (``self.metrics``):
    ``epban.metrics.PBANScore``, ``SSIMScore`` on the cropped Y (reference backend, as
    ``ssim_y``), and the same per-image mean for PSNR and LPIPS; their states (float32) sum across
    processes in ``compute()``. Without it, plain float64 sums, all-reduced when ``sync``.
    """

    def __init__(self, scale: int, *, pban_model: EfficientPBAN | None = None, lpips_fn=None, device="cpu",
                 sync: bool = False):
        self.scale = scale
        self.sync = sync
        psnr = functools.partial(psnr_y, crop=scale)
        lpips = None if lpips_fn is None else lambda sr, hr: lpips_fn(sr * 2 - 1, hr * 2 - 1).flatten()
        self.metrics = self._torchmetrics(psnr, pban_model, lpips, device)
        if self.metrics is None:
            self.functions = {"psnr_y": psnr, "ssim_y": functools.partial(ssim_y, crop=scale)}
            if pban_model is not None:
                frozen = copy.deepcopy(pban_model).eval().requires_grad_(False)  # as PBANScore scores
                self.functions["pban_score"] = lambda sr, hr: frozen(sr, hr, check_finite=False)
            if lpips is not None:
                self.functions["lpips"] = lpips
            self._sums = dict.fromkeys(self.functions, 0.0)
            self._count = 0

    def _torchmetrics(self, psnr, pban_model, lpips, device) -> dict | None:
        try:
            from epban.metrics import PBANScore, SSIMScore, _FunctionMean
        except ImportError:  # torchmetrics is optional: plain sums instead
            return None
        kw = {"sync_on_compute": self.sync}
        metrics = {"psnr_y": _FunctionMean(psnr, **kw),
                   "ssim_y": SSIMScore(data_range=1.0, backend="reference", **kw)}
        if pban_model is not None:  # NaN from a diverged network scores NaN, as in the other columns
            metrics["pban_score"] = PBANScore(pban_model, check_finite=False, **kw)
        if lpips is not None:
            metrics["lpips"] = _FunctionMean(lpips, **kw)
        return {name: metric.to(device) for name, metric in metrics.items()}

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        if sr.shape[0] != 1:
            raise ValueError(f"ValidationScores takes one image pair at a time, got a batch of {sr.shape[0]}")
        if self.metrics is None:
            values = {name: float(fn(sr, hr)[0]) for name, fn in self.functions.items()}
            for name, value in values.items():
                self._sums[name] += value
            self._count += 1
            return values
        values = {}
        for name, metric in self.metrics.items():
            inputs = _crop_y(sr, hr, self.scale) if name == "ssim_y" else (sr, hr)
            values[name] = float(metric(*inputs))  # this image's value, also added to the metric's state
        return values

    def compute(self) -> dict[str, float]:
        """The means over every image added (in every process when ``sync``)."""
        if self.metrics is not None:
            return {name: float(metric.compute()) for name, metric in self.metrics.items()}
        totals = [*self._sums.values(), self._count]
        if self.sync and dist.is_available() and dist.is_initialized():
            on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            reduced = torch.tensor(totals, dtype=torch.float64, device=on)
            dist.all_reduce(reduced)
            totals = reduced.tolist()
        return {name: total / totals[-1] for name, total in zip(self._sums, totals)}


def _pban_model(scorer) -> EfficientPBAN | None:
    if scorer is None or isinstance(scorer, EfficientPBAN):
        return scorer
    model = getattr(scorer, "model", None)  # a PBANLoss scores with its frozen copy
    if not isinstance(model, EfficientPBAN):
        raise ValueError("scorer must be an EfficientPBAN or a PBANLoss without the loss mode "
                         f"(validation scores with the model itself), got {type(scorer).__name__}")
    return model


@torch.no_grad()
def evaluate(net, dataset, device, scale: int, *, scorer=None, lpips_fn=None, amp=False, channels_last=False,
             bicubic: bool = False, ctx: distributed.DistContext | None = None) -> dict:
    """Mean metrics over a validation dataset (whole images, one at a time), through ``ValidationScores``.

    ``scorer``: the PBAN metric (an ``EfficientPBAN``, or a ``PBANLoss`` without the loss mode),
    or None for no ``pban_score``. ``net=None`` with ``bicubic=True`` evaluates the bicubic
    baseline instead. Under DDP (``ctx`` of several processes) every process calls it: each
    evaluates every ``world_size``-th image, and each gets the whole result back.
    Returns ``{"mean": {...}, "images": {name: {...}}}``, the images in the dataset's order.
    """
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    scores = ValidationScores(scale, pban_model=_pban_model(scorer), lpips_fn=lpips_fn, device=device, sync=world > 1)
    was_training = net.training if net is not None else False
    if net is not None:
        net.eval()
    local = {}
    for i in range(rank, len(dataset), world):
        item = dataset[i]
        lr, hr = item["lr"][None].to(device), item["hr"][None].to(device)
        if bicubic:
            sr = quantize(bicubic_upsample(lr, scale))
        else:
            sr = super_resolve(net, lr, amp=amp, channels_last=channels_last)
        local[i] = (item["name"], scores(sr, hr))
    if net is not None and was_training:
        net.train()
    if world > 1:
        local = {i: row for part in distributed.all_gather_objects(ctx, local) for i, row in part.items()}
    per_image = dict(local[i] for i in sorted(local))
    return {"mean": scores.compute(), "images": per_image}
