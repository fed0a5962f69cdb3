"""Drop-in replacements for other libraries' APIs, served by epban.

``from epban.compat import ssim, ms_ssim, SSIM, MS_SSIM`` replaces
``from pytorch_msssim import ssim, ms_ssim, SSIM, MS_SSIM`` (``epban.compat.pytorch_msssim``).
"""
from epban.compat.pytorch_msssim import MS_SSIM, SSIM, ms_ssim, ssim

__all__ = ["ssim", "ms_ssim", "SSIM", "MS_SSIM"]
