"""epban: Efficient-PBAN (package being assembled)."""
from epban.ops.ssim import ssim
from epban.ops.axial_attention import axial_attention, bi_axial_attention

__version__ = "0.1.0"
