"""epban: Efficient-PBAN, a learned perceptual quality metric for image super-resolution.

Public API (README.md; docs/design.md for how the ops are built):
    ssim, ssim_loss, SSIMLoss      structural similarity (reference and fused kernels), and
                                   weight * (1 - SSIM) as a loss
    ms_ssim, ms_ssim_loss, MSSSIMLoss
                                   multi-scale SSIM (as pytorch-msssim), and
                                   l1 * L1 + weight * (1 - MS-SSIM) as a loss
    axial_attention, bi_axial_attention
                                   the bi-directional axial attention of the metric
    EfficientPBAN, PBANConfig      the quality network
    PBANLoss, SRLoss               losses for SR training
    info                           versions, and which backend serves each op
"""
from epban.ops.ssim import ssim, ssim_loss
from epban.ops.ms_ssim import ms_ssim, ms_ssim_loss
from epban.ops.axial_attention import axial_attention, bi_axial_attention
from epban.models.pban import EfficientPBAN, PBANConfig
from epban.losses import SSIMLoss, MSSSIMLoss, PBANLoss, SRLoss
from epban.info import info

__version__ = "0.1.0"

__all__ = [
    "ssim",
    "ssim_loss",
    "SSIMLoss",
    "ms_ssim",
    "ms_ssim_loss",
    "MSSSIMLoss",
    "axial_attention",
    "bi_axial_attention",
    "EfficientPBAN",
    "PBANConfig",
    "PBANLoss",
    "SRLoss",
    "info",
    "__version__",
]
