"""SSIM: the reference (the specification in executable form) and the dispatch to the fused kernels.

SSIM(x, y) per pixel, with Gaussian-weighted local moments (window ``win_size``,
``sigma``; G * . denotes the Gaussian filter):

    mu_x = G*x, mu_y = G*y, s_xx = G*(x^2) - mu_x^2, s_yy = G*(y^2) - mu_y^2,
    s_xy = G*(xy) - mu_x mu_y, C1 = (k1 R)^2, C2 = (k2 R)^2,
    ssim = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_xx + s_yy + C2))

``padding="valid"`` keeps only the pixels whose window lies inside the image (as
pytorch-msssim and scikit-image); ``"same"`` zero-pads the image (as fused-ssim).

The fused path (``torch.ops.epban.ssim_*``, csrc/ssim/) serves window 11 / sigma 1.5 on
the CPU (float32/64, float16, bfloat16) and on CUDA (float32, float16, bfloat16). Its
forward reduces inside the kernel (no map is written for "mean"/"none"); its backward
recomputes the moments and saves nothing but the inputs. When a float32/float64 input
requires grad, reductions "mean"/"none" take the one-pass ops instead
(``ssim_mean_one_pass``, ``ssim_per_image_one_pass``, on the devices in ``ONE_PASS_DEVICES``;
the first gives the batch mean from the same pass): one kernel pass
gives the value and the gradient of each image's SSIM, the moments computed once, and the
backward only scales that gradient by the upstream one (in place: still one image-sized
buffer per input; nothing is written where that factor is exactly 1, which ``ssim_loss``
arranges by folding the loss weight into the pass). The kernels filter u = x + y and
v = x - y (four moments, not five; more accurate in float32 where x ~ y:
csrc/ssim/ssim_math.h) and return the partials in x, y terms. The gradient, with g the
upstream gradient per window centre:

    dL/dx = G*(g dS/dmu_x) + 2 x G*(g dS/dE[x^2]) + y G*(g dS/dE[xy])
    dL/dy = G*(g dS/dmu_y) + 2 y G*(g dS/dE[y^2]) + x G*(g dS/dE[xy])

On CUDA the gradient runs one of two kernel families (csrc/ssim/ssim_cuda.cuh): tiles of 32
columns by 32 or 64 rows, or column strips streamed down row bands (per-image upstream
gradients on images of 512 x 512 and more). The setting ``EPBAN_SSIM_CUDA_BACKWARD``
(auto, tile32, tile64, strip; ``epban.settings``) forces one, for checks.

``ssim_loss(..., l1=a)`` adds ``a * mean|x - y|`` (the mean over every pixel of the batch, or of
each image for reduction "none"; the SSIM mean is over the valid window centres: each term is
divided by its own count). On the one-pass path of the devices in ``L1_FUSED_DEVICES`` the L1
term is in the same kernel pass: where the pass combines the filtered partials with x and y at
each pixel it adds ``a * sign(x - y) / N`` to dL/dx (minus to dL/dy; sign(0) = 0, as PyTorch's)
and sums |x - y| for the value, so the images are read once for both terms. Elsewhere
(reference backend, half types, no one-pass) the L1 term is PyTorch's, beside the SSIM.

The fused ops have no double backward: a backward with ``create_graph=True`` raises
(``RuntimeError``) rather than return a gradient detached from the graph; the reference
backend is differentiable twice.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from epban import _extension, settings
from epban._extension import check_backend, extension_loaded
from epban.ops._checks import check_batch_for_mean, check_image_pair, check_loss_weight, window_args
from epban.ops.registry import extension_unavailable_reason, register, use_fused

PADDINGS = ("valid", "same")
REDUCTIONS = ("mean", "none", "map")
SSIM_FUSED_WINDOW = (11, 1.5)  # (win_size, sigma) the compiled kernels implement
_FUSED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

# Devices where training (an input that requires grad, reduction mean/none, float32/64)
# takes the one-pass op. On CUDA it is the backward kernel plus a per-block sum of values,
# run instead of the forward and backward kernels: less work by construction. Its logic is
# checked in CI on the CPU (tests/test_ssim_cuda_emu.py) and on a GPU by
# scripts/dev/ssim_gpu_check.py, whose "epban two-pass" row times the alternative
# (one_pass_devices below switches it off for such comparisons).
ONE_PASS_DEVICES = frozenset({"cpu", "cuda"})
_ONE_PASS_DTYPES = (torch.float32, torch.float64)  # half types: the unscaled gradient could underflow
# Devices whose one-pass kernels take the L1 term (ssim_l1_one_pass); elsewhere it is PyTorch's.
L1_FUSED_DEVICES = frozenset({"cpu", "cuda"})


@functools.lru_cache(maxsize=32)
def _gaussian_1d_cached(win_size: int, sigma: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_window_1d(win_size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The normalised 1-D Gaussian of the separable SSIM window, cached per (size, sigma, dtype, device)."""
    return _gaussian_1d_cached(win_size, float(sigma), dtype, str(torch.device(device)))


def _gaussian_filter(x: torch.Tensor, g: torch.Tensor, pad: int) -> torch.Tensor:
    """Separable depthwise Gaussian filter of (B, C, H, W); ``pad`` zeros on each side."""
    c = x.shape[1]
    w = g.numel()
    x = F.conv2d(x, g.view(1, 1, w, 1).expand(c, 1, w, 1), padding=(pad, 0), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, w).expand(c, 1, 1, w), padding=(0, pad), groups=c)


def ssim_map_reference(x, y, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid"):
    """The per-pixel SSIM map (B, C, H', W'), computed in the inputs' dtype (float32 for half types)."""
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would run the convolutions in half precision, where the variances
        # E[x^2] - mu^2 cancel to noise.
        with torch.autocast(x.device.type, enabled=False):
            return ssim_map_reference(x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                                      padding=padding)
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x, y = x.to(compute_dtype), y.to(compute_dtype)
    g = gaussian_window_1d(win_size, sigma, compute_dtype, x.device)
    pad = win_size // 2 if padding == "same" else 0
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x = _gaussian_filter(x, g, pad)
    mu_y = _gaussian_filter(y, g, pad)
    s_xx = _gaussian_filter(x * x, g, pad) - mu_x**2
    s_yy = _gaussian_filter(y * y, g, pad) - mu_y**2
    s_xy = _gaussian_filter(x * y, g, pad) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    return luminance * contrast_structure


def _reduce(ssim_map: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "map":
        return ssim_map
    per_image = ssim_map.flatten(1).mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def ssim_options(*, data_range, win_size, sigma, k1, k2, padding, backend) -> dict:
    """What a module holding SSIM's arguments checks when it is made (ValueError naming the
    argument): the window arguments normalised (``window_args``), padding and backend."""
    check_backend(backend)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    data_range, win_size, sigma, k1, k2 = window_args(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1,
                                                      k2=k2)
    return dict(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, padding=padding, backend=backend)


def check_ssim_args(x, y, *, data_range, win_size, sigma, k1, k2, padding, reduction) -> dict:
    """ValueError, saying what was expected, for anything ``ssim`` cannot take; else the window
    arguments normalised to Python numbers (``window_args``), as keyword arguments."""
    check_image_pair(x, y)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_batch_for_mean(x, reduction)
    data_range, win_size, sigma, k1, k2 = window_args(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1,
                                                      k2=k2)
    h, w = x.shape[-2:]
    if h < win_size or w < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size} (the SSIM window), got {h}x{w}")
    return dict(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2)


def ssim_reference(x, y, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid", reduction="mean"):
    """Plain PyTorch SSIM; equals pytorch-msssim and scikit-image for ``padding="valid"``."""
    window = check_ssim_args(x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                             padding=padding, reduction=reduction)
    return _reduce(ssim_map_reference(x, y, padding=padding, **window), reduction)


def fused_unavailable_reason(device, dtype=None, *, win_size=11, sigma=1.5, data_range=1.0) -> str | None:
    """Why the compiled kernels cannot serve SSIM of ``dtype`` tensors on ``device`` with these
    arguments, or None when they can (window 11 / sigma 1.5, a Python-number data_range)."""
    device = torch.device(device)
    unavailable = extension_unavailable_reason("ssim", device)
    if unavailable is not None:
        return unavailable
    if dtype is not None and dtype not in _FUSED_DTYPES[device.type]:
        return f"dtype {dtype} is not supported on {device.type}"
    if (win_size, float(sigma)) != SSIM_FUSED_WINDOW:
        return f"the kernel implements win_size={SSIM_FUSED_WINDOW[0]}, sigma={SSIM_FUSED_WINDOW[1]}"
    if not isinstance(data_range, (int, float)):
        return "data_range must be a Python number"
    return None


def fused_ssim_serves(x, backend="auto", *, win_size=11, sigma=1.5, data_range=1.0) -> bool:
    """Whether ``backend`` takes the compiled kernels for ``x`` with these arguments (the
    registry's rule; ValueError for an impossible ``"fused"``)."""
    reason = None if backend == "reference" else fused_unavailable_reason(
        x.device, x.dtype, win_size=win_size, sigma=sigma, data_range=data_range)
    return use_fused(backend, reason)


def _auto_backend(device: torch.device) -> str:
    return "fused" if fused_unavailable_reason(device, torch.float32) is None else "reference"


register("ssim", kernels="C++/OpenMP (cpu), CUDA (cuda), epban._C", auto_backend=_auto_backend)


def _hand_over_cuda_backward() -> None:
    """Hands the setting EPBAN_SSIM_CUDA_BACKWARD to the extension before a call on CUDA
    tensors: the gradient passes of that call (and later ones) run the chosen kernel. A host
    call only, so CUDA graphs capture whichever kernel it picked; skipped while torch.compile
    traces (the extension keeps its last choice)."""
    if not torch.compiler.is_compiling():
        _extension._C.ssim_set_cuda_backward(settings.ssim_cuda_backward())


def _ssim_fused(x, y, *, data_range, k1, k2, padding, reduction, scale=1.0):
    """scale x the SSIM, by the compiled kernels; the one-pass ops fold scale into their pass
    (value and gradients), the others multiply their value."""
    c1 = float((k1 * data_range) ** 2)
    c2 = float((k2 * data_range) ** 2)
    same = padding == "same"
    x, y = x.contiguous(), y.contiguous()
    if x.is_cuda:
        _hand_over_cuda_backward()
    if reduction == "map":
        return torch.ops.epban.ssim_map(x, y, c1, c2, same)
    if _one_pass(x, y):
        if reduction == "mean":  # the pass gives the batch mean: one autograd node, not two
            return torch.ops.epban.ssim_mean_one_pass(x, y, c1, c2, same, scale)
        return torch.ops.epban.ssim_per_image_one_pass(x, y, c1, c2, same, scale)
    per_image = torch.ops.epban.ssim_per_image(x, y, c1, c2, same)
    value = per_image if reduction == "none" else per_image.mean()
    return value if scale == 1.0 else value * scale


@contextlib.contextmanager
def one_pass_devices(devices):
    """Within the block, training takes the one-pass op on ``devices`` (an iterable of device
    types) and the two-pass ops elsewhere; for comparisons and checks."""
    global ONE_PASS_DEVICES
    previous, ONE_PASS_DEVICES = ONE_PASS_DEVICES, frozenset(devices)
    try:
        yield
    finally:
        ONE_PASS_DEVICES = previous


def _one_pass(x, y) -> bool:
    """Whether a gradient will be wanted and the one-pass op serves these inputs."""
    return (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
            and x.device.type in ONE_PASS_DEVICES and x.dtype in _ONE_PASS_DTYPES)


def _fused_out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register_fused() -> None:
    """Fake kernels of the torch.ops.epban.ssim_* ops (for torch.compile and opcheck)."""

    @torch.library.register_fake("epban::ssim_per_image")
    def _(x, y, c1, c2, same_padding):
        return x.new_empty((x.shape[0],), dtype=_fused_out_dtype(x))

    @torch.library.register_fake("epban::ssim_per_image_one_pass")
    def _(x, y, c1, c2, same_padding, scale=1.0):
        return x.new_empty((x.shape[0],), dtype=_fused_out_dtype(x))

    @torch.library.register_fake("epban::ssim_mean_one_pass")
    def _(x, y, c1, c2, same_padding, scale=1.0):
        return x.new_empty((), dtype=_fused_out_dtype(x))

    @torch.library.register_fake("epban::ssim_scale_gradient_")
    def _(grad, upstream):
        return None

    @torch.library.register_fake("epban::ssim_per_image_and_grad")
    def _(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean=False, scale=1.0):
        value = x.new_empty(() if batch_mean else (x.shape[0],), dtype=_fused_out_dtype(x))
        return value, x.new_empty(x.shape if grad_x else (0,)), y.new_empty(y.shape if grad_y else (0,))

    @torch.library.register_fake("epban::ssim_map")
    def _(x, y, c1, c2, same_padding):
        trim = 0 if same_padding else 2 * (SSIM_FUSED_WINDOW[0] // 2)
        b, c, h, w = x.shape
        return x.new_empty((b, c, h - trim, w - trim), dtype=_fused_out_dtype(x))

    @torch.library.register_fake("epban::ssim_backward")
    def _(grad, x, y, c1, c2, same_padding, grad_x, grad_y):
        gx = x.new_empty(x.shape) if grad_x else x.new_empty((0,))
        gy = y.new_empty(y.shape) if grad_y else y.new_empty((0,))
        return gx, gy

    @torch.library.register_fake("epban::ssim_l1_and_grad")
    def _(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, l1):
        shape = () if batch_mean else (x.shape[0],)
        value = x.new_empty(shape, dtype=_fused_out_dtype(x))
        l1_value = x.new_empty(shape if l1 != 0.0 else (0,), dtype=_fused_out_dtype(x))
        return value, l1_value, x.new_empty(x.shape if grad_x else (0,)), y.new_empty(y.shape if grad_y else (0,))

    @torch.library.register_fake("epban::ssim_l1_one_pass")
    def _(x, y, c1, c2, same_padding, batch_mean, scale, l1):
        shape = () if batch_mean else (x.shape[0],)
        value = x.new_empty(shape, dtype=_fused_out_dtype(x))
        return value, x.new_empty(shape if l1 != 0.0 else (0,), dtype=_fused_out_dtype(x))

    # Autograd is registered in C++ (csrc/ssim/ssim_autograd.cpp): the backward never
    # re-enters Python.


if extension_loaded():
    _register_fused()


def ssim(x, y, *, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, padding="valid", reduction="mean", backend="auto"):
    """Structural similarity of two image batches (B, C, H, W); see the module docstring.

    reduction: "mean" (a scalar), "none" (one value per image, shape (B,)) or "map".
    backend: "auto" (the fused kernel when it serves these inputs, else the reference),
    "reference", or "fused" (the compiled kernel; ValueError when it cannot serve these
    inputs). Half-type inputs give float32 results, float64 inputs float64.
    """
    window = check_ssim_args(x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                             padding=padding, reduction=reduction)
    return _scaled_ssim(x, y, 1.0, window, padding=padding, reduction=reduction, backend=backend)


def _scaled_ssim(x, y, scale, window, *, padding, reduction, backend):
    """scale x SSIM of inputs checked by ``check_ssim_args`` (``window``: the normalised window
    arguments it returns): the fused kernels when they serve (the one-pass ops fold scale into
    their pass), else the reference. ssim() is scale 1, ssim_loss() scale -weight."""
    if fused_ssim_serves(x, backend, win_size=window["win_size"], sigma=window["sigma"],
                         data_range=window["data_range"]):
        return _ssim_fused(x, y, data_range=window["data_range"], k1=window["k1"], k2=window["k2"], padding=padding,
                           reduction=reduction, scale=scale)
    value = _reduce(ssim_map_reference(x, y, padding=padding, **window), reduction)
    return value if scale == 1.0 else value * scale


def ssim_loss(x, y, *, weight=1.0, l1=0.0, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03,
              padding="valid", reduction="mean", backend="auto"):
    """``l1 * mean|x - y| + weight * (1 - SSIM(x, y))``: the pixel terms of an SR loss; reduction
    "mean" or "none" (then one value per image: each image's own means).

    The value equals ``l1 * F.l1_loss(x, y) + weight * (1 - ssim(x, y, ...))`` (to float
    rounding); training with it is cheaper. On the one-pass path the weight is folded into the
    kernel pass (the op gives ``-weight * SSIM`` and its gradients; the loss is that plus
    ``weight``), so a loss's ``.backward()`` reaches the op with an upstream gradient of exactly
    1 and its backward writes nothing: the in-place scaling of the kept gradients by the upstream
    one, a read and a write of each gradient, is skipped (on CUDA the factor is tested on the
    device, so there is no sync and CUDA graphs stay valid). Any other upstream gradient (a
    GradScaler's scale, a weight applied outside) gives the same exact gradients, with that
    scaling. The L1 term joins the same pass where it can (see the module docstring).
    """
    return _ssim_l1_loss(x, y, weight, l1, backend, False, data_range=data_range, win_size=win_size, sigma=sigma,
                         k1=k1, k2=k2, padding=padding, reduction=reduction)[0]


def ssim_l1_loss_parts(x, y, *, weight=1.0, l1=0.0, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03,
                       padding="valid", reduction="mean", backend="auto"):
    """``(loss, l1_part, ssim_part)``: ``ssim_loss``'s value and, detached for logging, its
    unweighted terms ``mean|x - y|`` and ``1 - SSIM`` (None for a term whose weight is 0). On the
    fused path both come from the one kernel pass that gives the loss (no extra read of the
    images)."""
    return _ssim_l1_loss(x, y, weight, l1, backend, True, data_range=data_range, win_size=win_size, sigma=sigma,
                         k1=k1, k2=k2, padding=padding, reduction=reduction)


def _ssim_l1_loss(x, y, weight, l1, backend, parts, *, data_range, win_size, sigma, k1, k2, padding, reduction):
    """(loss, l1_part, ssim_part) as ssim_l1_loss_parts; the parts only with ``parts``."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"ssim_loss reduction must be 'mean' or 'none', got {reduction!r}")
    weight = check_loss_weight("weight", weight)
    l1 = check_loss_weight("l1", l1)
    window = check_ssim_args(x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                             padding=padding, reduction=reduction)
    if l1 == 0.0:
        loss = _scaled_ssim(x, y, -weight, window, padding=padding, reduction=reduction, backend=backend) + weight
        return loss, None, (loss.detach() / weight if parts and weight != 0.0 else None)
    if weight == 0.0:
        l1_value = _l1_mean(x, y, reduction)
        return l1 * l1_value, l1_value.detach(), None
    if (fused_ssim_serves(x, backend, win_size=window["win_size"], sigma=window["sigma"],
                          data_range=window["data_range"])
            and x.device.type in L1_FUSED_DEVICES and x.device.type in ONE_PASS_DEVICES
            and x.dtype in _ONE_PASS_DTYPES):
        c1 = (window["k1"] * window["data_range"]) ** 2
        c2 = (window["k2"] * window["data_range"]) ** 2
        value, l1_value = torch.ops.epban.ssim_l1_one_pass(x.contiguous(), y.contiguous(), c1, c2, padding == "same",
                                                           reduction == "mean", -weight, l1)
        ssim_part = (value.detach() - l1 * l1_value) / weight + 1.0 if parts else None
        return value + weight, l1_value, ssim_part
    ssim_term = _scaled_ssim(x, y, -weight, window, padding=padding, reduction=reduction, backend=backend) + weight
    l1_value = _l1_mean(x, y, reduction)
    return l1 * l1_value + ssim_term, l1_value.detach(), ssim_term.detach() / weight if parts else None


def _l1_mean(x, y, reduction):
    """mean |x - y| (PyTorch's l1_loss), over the batch ("mean") or per image ("none")."""
    if reduction == "mean":
        return F.l1_loss(x, y)
    return F.l1_loss(x, y, reduction="none").flatten(1).mean(1)
