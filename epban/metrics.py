"""Efficient-PBAN and SSIM as ``torchmetrics`` metrics, for validation loops (Lightning or not).

Each metric keeps the sum of its per-image values and the number of images; both states
are summed across processes (``dist_reduce_fx="sum"``), so under DDP ``compute()`` gives the
mean over every image that any process saw, whatever the batch sizes::

    from epban.metrics import PBANScore, SSIMScore

    pban = PBANScore("checkpoints/pban").to(device)
    for sr, hr in loader:
        pban.update(sr, hr)
    print(pban.compute())  # mean score; pban.reset() before the next epoch

As torchmetrics does for every metric, ``update`` runs without autograd, while calling the
metric (``metric(sr, hr)``: the batch's value, also added to the state) keeps the graph, so
the batch value is differentiable with respect to ``sr``.

torchmetrics is an optional dependency (``pip install 'epban[metrics]'``): ``import epban`` does not need it,
this module does.
"""
from __future__ import annotations

import copy
import os

import torch

try:
    from torchmetrics import Metric
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("epban.metrics needs torchmetrics: pip install 'epban[metrics]'") from exc

from epban.models.pban import EfficientPBAN
from epban.ops.ssim import ssim, ssim_options


class _MeanOverImages(Metric):
    """The mean of one value per image, over every image given to ``update`` (all processes)."""

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("value_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_image(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, sr: torch.Tensor, hr: torch.Tensor) -> None:
        """Adds the values of one batch of (B, 3, H, W) image pairs in [0, 1]."""
        values = self.per_image(sr, hr)
        self.value_sum = self.value_sum + values.sum().to(self.value_sum.dtype)
        self.count = self.count + values.numel()

    def compute(self) -> torch.Tensor:
        """The mean per-image value (NaN before any image)."""
        return self.value_sum / self.count


class PBANScore(_MeanOverImages):
    """The mean Efficient-PBAN score of (sr, hr) pairs: higher is better, on the metric's own
    scale (``config.score_range``).

    ``model_or_path``: an ``EfficientPBAN`` (scored with a frozen copy in eval mode, as
    ``epban.PBANLoss`` does: the model given is left as it is, and later changes to it do not
    reach the metric) or a checkpoint path for ``EfficientPBAN.from_checkpoint``.
    ``check_finite=True`` refuses NaN and inf in the inputs (one host sync per batch).
    Other keyword arguments go to ``torchmetrics.Metric`` (``sync_on_compute``,
    ``process_group``, ...). The metric starts on the model's device; ``.to(device)`` moves
    the model and the states together.
    """

    def __init__(self, model_or_path: EfficientPBAN | str | os.PathLike, *, check_finite: bool = True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(model_or_path, EfficientPBAN):
            model = copy.deepcopy(model_or_path)
        else:
            model = EfficientPBAN.from_checkpoint(model_or_path)
        self.model = model.eval().requires_grad_(False)
        self.check_finite = check_finite
        self.to(next(model.parameters()).device)  # the states beside the model's weights

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # BatchNorm statistics and dropout never change
        return self

    def per_image(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.model(sr, hr, check_finite=self.check_finite)


class SSIMScore(_MeanOverImages):
    """The mean SSIM of (sr, hr) pairs (each image's SSIM averaged over its channels), with
    ``epban.ssim`` (the fused kernel where it serves); higher is better.

    ``data_range``, ``win_size``, ``sigma``, ``k1``, ``k2``, ``padding`` and ``backend`` are
    ``epban.ssim``'s. Other keyword arguments go to ``torchmetrics.Metric``.
    """

    def __init__(self, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid",
                 backend="auto", **kwargs):
        super().__init__(**kwargs)
        self.ssim_kwargs = ssim_options(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                                        padding=padding, backend=backend)

    def per_image(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return ssim(sr, hr, reduction="none", **self.ssim_kwargs)


class _FunctionMean(_MeanOverImages):
    """The mean of ``fn(sr, hr)``, a function giving one value per image (B,): the SR trainer's
    PSNR and LPIPS columns, summed across processes like the metrics above."""

    is_differentiable = None  # as differentiable as ``fn``
    higher_is_better = None  # as ``fn`` says (PSNR higher, LPIPS lower)

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def per_image(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.fn(sr, hr)
