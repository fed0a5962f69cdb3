"""Training SR networks with the Efficient-PBAN loss (``epban train-sr``, ``scripts/train_sr.py``).

    networks   EDSR-baseline, RRDBNet (narrow by default), TinySR; ``build_network``, ``freeze_parameters``
    spandrel_models  SR model files of other projects through spandrel (``pip install epban[sr]``)
    imresize   MATLAB-compatible antialiased bicubic resizing (how LR images are made)
    data       HR folder (LR on the fly) or paired LR/HR folders; deterministic sampling
    metrics    PSNR / SSIM on BT.601 Y with a border crop
    evaluate   validation metrics, the bicubic baseline, LPIPS when available
    report     side-by-side crops, the ablation table and figure
    trainer    ``train_sr(SRTrainConfig)`` and ``run_ablation``
    cli        the ``epban train-sr`` command
"""
from epban.sr.data import SRFolderDataset, StepSampler
from epban.sr.evaluate import evaluate
from epban.sr.imresize import bicubic_downsample, bicubic_upsample, imresize
from epban.sr.metrics import psnr_y, rgb_to_y, ssim_y
from epban.sr.networks import EDSR, NETWORKS, RRDBNet, TinySR, build_network, freeze_parameters
from epban.sr.spandrel_models import SpandrelNet, load_spandrel, save_spandrel
from epban.sr.trainer import SRTrainConfig, run_ablation, train_sr

__all__ = [
    "EDSR", "RRDBNet", "TinySR", "NETWORKS", "build_network", "freeze_parameters",
    "SpandrelNet", "load_spandrel", "save_spandrel",
    "imresize", "bicubic_downsample", "bicubic_upsample",
    "SRFolderDataset", "StepSampler",
    "rgb_to_y", "psnr_y", "ssim_y",
    "evaluate", "SRTrainConfig", "train_sr", "run_ablation",
]
