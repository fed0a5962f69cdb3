"""MS-SSIM: multi-scale structural similarity (Wang, Simoncelli and Bovik, 2003), as
pytorch-msssim computes it, and the MS-SSIM (+ L1) loss.

Per image and channel, over M = len(weights) scales (x_1 = x, y_1 = y):

    x_{j+1} = avgpool_2x2(x_j)          odd sides are first zero-padded by one on each side,
                                        and the zeros count in the average (pytorch-msssim's
                                        ``F.avg_pool2d(x, 2, padding=[s % 2 for s in x.shape[2:]])``)
    cs_j    = mean over window centres of (2 s_xy + C2) / (s_xx + s_yy + C2)
    ssim_M  = mean over window centres of (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
                                          * (2 s_xy + C2) / (s_xx + s_yy + C2)      (at the last scale)

    MS-SSIM = relu(cs_1)^w_1 * ... * relu(cs_{M-1})^w_{M-1} * relu(ssim_M)^w_M

with the local moments of ``epban.ops.ssim`` (a Gaussian window, ``win_size`` / ``sigma``,
"valid" filtering: only centres whose window lies inside the image), C1 = (k1 data_range)^2
and C2 = (k2 data_range)^2. The value is then averaged over channels (reduction "none": one value per
image) and over images (reduction "mean"). The last scale must still hold a window: each side
needs at least (win_size - 1) * 2^(M-1) + 1 pixels (161 for the default 5 scales and window 11).

The fused path (window 11 / sigma 1.5, the devices and dtypes of the fused SSIM) runs the SSIM
kernels once per scale on the (B*C, 1, H, W) view, so that each channel plane is one "image":
``torch.ops.epban.ssim_level_and_grad`` gives each plane's mean cs (or SSIM, at the last scale)
and, from the same pass, its gradient with respect to that scale's x and y for an upstream
gradient of 1 (csrc/ssim/ssim_math.h: the contrast-structure term is the SSIM formula with the
luminance factor held at 1). The per-plane factors that MS-SSIM puts on those gradients depend
on every scale, so the op keeps the gradient maps and its backward scales each by its factor and
carries it down the pyramid (the 2x2 average pool's backward spreads a quarter to each pixel of
its window), coarse to fine. That backward is not differentiable: ``create_graph=True`` raises
(the reference backend is differentiable twice). The L1 term of ``ms_ssim_loss`` is PyTorch's, beside it: its
gradient is not scaled by those factors, so it cannot ride in the kept maps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from epban._extension import check_backend, extension_loaded
from epban.ops._checks import check_batch_for_mean, check_image_pair, check_loss_weight, window_args
from epban.ops.registry import register
from epban.ops.ssim import fused_ssim_serves, fused_unavailable_reason, gaussian_window_1d

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al.'s five scales
REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------- reference


def gaussian_filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable depthwise filter of (B, C, H, W), unpadded ("valid"): the window is (K,), or
    one row per channel (C, K)."""
    c, k = x.shape[1], window.shape[-1]
    x = F.conv2d(x, window.reshape(-1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, window.reshape(-1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_and_cs(x, y, window, c1, c2):
    """Per image and channel (B, C): the mean SSIM and the mean contrast-structure term."""
    mu_x = gaussian_filter(x, window)
    mu_y = gaussian_filter(y, window)
    s_xx = gaussian_filter(x * x, window) - mu_x**2
    s_yy = gaussian_filter(y * y, window) - mu_y**2
    s_xy = gaussian_filter(x * y, window) - mu_x * mu_y
    cs_map = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling; an odd side is zero-padded by one on each side first."""
    return F.avg_pool2d(x, kernel_size=2, padding=[s % 2 for s in x.shape[2:]])


def ms_ssim_per_channel(x, y, window, weights, c1, c2):
    """MS-SSIM per image and channel (B, C); ``weights`` a 1-D tensor, one per scale."""
    cs_levels = []
    for _ in range(weights.numel() - 1):
        cs_levels.append(ssim_and_cs(x, y, window, c1, c2)[1])
        x, y = downsample(x), downsample(y)
    last_ssim = ssim_and_cs(x, y, window, c1, c2)[0]
    levels = torch.relu(torch.stack(cs_levels + [last_ssim]))  # (M, B, C)
    return torch.prod(levels ** weights.view(-1, 1, 1), dim=0)


def ms_ssim_with_window(x, y, window, *, data_range, weights, k1, k2, reduction):
    """MS-SSIM with an explicit 1-D window (``(K,)`` or ``(C, K)``), without input checks
    (``ms_ssim`` checks, then calls this). Half types are computed and returned in float32."""
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would run the convolutions in half precision, where the variances
        # E[x^2] - mu^2 cancel to noise.
        with torch.autocast(x.device.type, enabled=False):
            return ms_ssim_with_window(x, y, window, data_range=data_range, weights=weights, k1=k1, k2=k2,
                                       reduction=reduction)
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x, y = x.to(compute_dtype), y.to(compute_dtype)
    window = window.to(device=x.device, dtype=compute_dtype)
    weights = torch.as_tensor(weights, dtype=compute_dtype, device=x.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    per_image = ms_ssim_per_channel(x, y, window, weights, c1, c2).mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def ms_ssim_reference(x, y, *, data_range=1.0, win_size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS, k1=0.01, k2=0.03,
                      reduction="mean", check_finite=True):
    """Plain PyTorch MS-SSIM; equals pytorch-msssim's ``ms_ssim`` (module docstring)."""
    window = check_ms_ssim_args(x, y, data_range=data_range, win_size=win_size, sigma=sigma, weights=weights, k1=k1,
                                k2=k2, reduction=reduction)
    return _ms_ssim_value(x, y, weights=weights, reduction=reduction, backend="reference", check_finite=check_finite,
                          **window)


# ----------------------------------------------------------------------------- fused path


def _pooled_side(side: int) -> int:
    """A side after ``downsample``: (side + 2 (side % 2) - 2) // 2 + 1 = ceil(side / 2)."""
    return (side + 1) // 2


def _pair_sums(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of neighbouring pairs along ``dim`` (-2 or -1), with ``downsample``'s padding: an odd
    length gets a zero in front, so element 0 stands alone."""
    n = t.shape[dim]
    first, second = t.narrow(dim, n % 2, n - n % 2).unflatten(dim, (-1, 2)).unbind(dim)
    pairs = first + second
    return torch.cat([t.narrow(dim, 0, 1), pairs], dim=dim) if n % 2 else pairs


def _downsample_fused(x: torch.Tensor) -> torch.Tensor:
    """``downsample`` for the fused path. On the CPU as sums of row pairs, then of column pairs
    (PyTorch's CPU avg_pool2d takes several times longer for 2x2 windows); elsewhere
    ``downsample`` itself."""
    if x.device.type != "cpu":
        return downsample(x)
    return _pair_sums(_pair_sums(x, -2), -1).mul_(0.25)


def _scaled_plus_pool_backward(grad_map: torch.Tensor, factor: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
    """``grad_map * factor`` (one factor per plane) plus the gradient that the next scale's
    ``coarser`` gradient gives through ``downsample``: each coarse pixel gives a quarter of its
    gradient to each pixel of its 2x2 window (input row r lies in window (r + pad) // 2; the
    padding's share is dropped). The coarse columns are doubled (a half-size copy, cut to the
    input's columns) and added to both rows of each pair through a view that broadcasts along
    rows only (broadcasting along the innermost dimension is several times slower on the CPU);
    with an odd height, row 0 has a window of its own."""
    n, _, h, w = grad_map.shape
    out = grad_map.to(factor.dtype) * factor.view(n, 1, 1, 1)  # half-type maps: combined in float32
    ph = h % 2
    columns = coarser.unsqueeze(-1).expand(*coarser.shape, 2).flatten(-2).narrow(-1, w % 2, w)
    if ph:
        out[..., :1, :].add_(columns[..., :1, :], alpha=0.25)
    out.narrow(-2, ph, h - ph).unflatten(-2, (-1, 2)).add_(columns[..., ph:, :].unsqueeze(-2), alpha=0.25)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("epban::ms_ssim_levels", mutates_args=())
def ms_ssim_levels(x: torch.Tensor, y: torch.Tensor, c1: float, c2: float, scales: int, grad_x: bool,
                   grad_y: bool) -> list[torch.Tensor]:
    """``[levels, gx_1..gx_M, gy_1..gy_M]`` (the gradients only where wanted): ``levels``
    (M, B, C) holds each plane's mean cs at scales 1..M-1 and mean SSIM at scale M (float32,
    float64 for float64 inputs); ``gx_j`` (B*C, 1, H_j, W_j) the gradient of each plane's level j
    with respect to x at scale j. Differentiable in ``levels`` (the backward uses the kept maps)."""
    b, c, h, w = x.shape
    xs, ys = x.reshape(b * c, 1, h, w).contiguous(), y.reshape(b * c, 1, h, w).contiguous()
    levels, gxs, gys = [], [], []
    for j in range(scales):
        if j > 0:
            xs, ys = _downsample_fused(xs.to(_compute_dtype(x))), _downsample_fused(ys.to(_compute_dtype(x)))
        value, gx, gy = torch.ops.epban.ssim_level_and_grad(xs, ys, c1, c2, j == scales - 1, grad_x, grad_y)
        levels.append(value)
        gxs += [gx] if grad_x else []
        gys += [gy] if grad_y else []
    return [torch.stack(levels).view(scales, b, c), *gxs, *gys]


@ms_ssim_levels.register_fake
def _(x, y, c1, c2, scales, grad_x, grad_y):
    b, c, h, w = x.shape
    levels = x.new_empty((scales, b, c), dtype=_compute_dtype(x))
    shapes = []
    for j in range(scales):
        shapes.append((b * c, 1, h, w))
        h, w = _pooled_side(h), _pooled_side(w)
    grads = []
    for wanted, t in ((grad_x, x), (grad_y, y)):
        if wanted:
            grads += [t.new_empty(shape, dtype=t.dtype if j == 0 else _compute_dtype(t)) for j, shape in enumerate(shapes)]
    return [levels, *grads]


def _levels_setup_context(ctx, inputs, output):
    x, y, c1, c2, scales, grad_x, grad_y = inputs
    ctx.scales, ctx.grad_x, ctx.grad_y = scales, grad_x, grad_y
    ctx.shape, ctx.dtypes = x.shape, (x.dtype, y.dtype)
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _levels_backward(ctx, grads):
    """Coarse to fine: the gradient at scale j is its kept map times the plane's factor, plus the
    pool's backward of the gradient at scale j + 1. (``grads``: one per output; the kept maps'
    are None, as they are not differentiable.)"""
    if torch.is_grad_enabled():
        # create_graph=True: the kept maps are constants here, so a second derivative would
        # silently miss their dependence on x and y.
        raise RuntimeError("the fused MS-SSIM has no double backward (create_graph=True); use backend='reference'")
    grad_levels = grads[0]
    results = [None, None]
    if grad_levels is not None:
        maps = ctx.saved_tensors
        m = ctx.scales
        for slot, (wanted, offset) in enumerate(((ctx.grad_x, 0), (ctx.grad_y, m if ctx.grad_x else 0))):
            if not wanted:
                continue
            grad = maps[offset + m - 1].to(grad_levels.dtype) * grad_levels[m - 1].reshape(-1, 1, 1, 1)
            for j in reversed(range(m - 1)):
                grad = _scaled_plus_pool_backward(maps[offset + j], grad_levels[j], grad)
            results[slot] = grad.view(ctx.shape).to(ctx.dtypes[slot])
    return results[0], results[1], None, None, None, None, None


ms_ssim_levels.register_autograd(_levels_backward, setup_context=_levels_setup_context)


def _register_fused() -> None:
    @torch.library.register_fake("epban::ssim_level_and_grad")
    def _(x, y, c1, c2, luminance, grad_x, grad_y):
        value = x.new_empty((x.shape[0],), dtype=_compute_dtype(x))
        return value, x.new_empty(x.shape if grad_x else (0,)), y.new_empty(y.shape if grad_y else (0,))


if extension_loaded():
    _register_fused()


def _ms_ssim_fused(x, y, *, data_range, weights, k1, k2, reduction, check_finite):
    """MS-SSIM by the SSIM kernels (the module docstring); as ``ms_ssim_with_window``."""
    c1 = float((k1 * data_range) ** 2)
    c2 = float((k2 * data_range) ** 2)
    scales = weights.numel() if isinstance(weights, torch.Tensor) else len(weights)
    need = torch.is_grad_enabled()
    out = torch.ops.epban.ms_ssim_levels(x, y, c1, c2, scales, need and x.requires_grad, need and y.requires_grad)
    if check_finite and not bool(torch.isfinite(out[0]).all()):
        # Every pixel lies in some window, so NaN or inf anywhere in x or y makes a level NaN: the
        # levels tell at no cost whether the full test is needed (finite inputs so large that
        # their squares overflow also land here, and pass it).
        check_finite_inputs(x, y)
    levels = torch.relu(out[0])  # (M, B, C)
    # Exponents given as numbers stay Python numbers: no host-to-device copy, so a CUDA graph can
    # capture the call; a tensor of them keeps its autograd.
    exponents = weights.to(levels) if isinstance(weights, torch.Tensor) else [float(w) for w in weights]
    per_channel = levels[0] ** exponents[0]
    for level, exponent in zip(levels[1:], exponents[1:]):
        per_channel = per_channel * level ** exponent
    per_image = per_channel.mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def _auto_backend(device: torch.device) -> str:
    return "fused" if fused_unavailable_reason(device, torch.float32) is None else "reference"


register("ms_ssim", kernels="the SSIM kernels once per scale (C++/OpenMP, CUDA), epban._C", auto_backend=_auto_backend)


def fused_ms_ssim_serves(x, backend="auto", *, win_size=11, sigma=1.5, data_range=1.0) -> bool:
    """Whether ``backend`` takes the fused path for ``x``: where the fused SSIM serves."""
    return fused_ssim_serves(x, backend, win_size=win_size, sigma=sigma, data_range=data_range)


def _ms_ssim_value(x, y, *, data_range, win_size, sigma, weights, k1, k2, reduction, backend, check_finite):
    """MS-SSIM of inputs checked by ``check_ms_ssim_args`` (all but the finite test), by the fused
    path where it serves, else the reference."""
    if fused_ms_ssim_serves(x, backend, win_size=win_size, sigma=sigma, data_range=data_range):
        return _ms_ssim_fused(x, y, data_range=data_range, weights=weights, k1=k1, k2=k2, reduction=reduction,
                              check_finite=check_finite)
    if check_finite:
        check_finite_inputs(x, y)
    window = gaussian_window_1d(win_size, sigma, torch.float64, x.device)
    return ms_ssim_with_window(x, y, window, data_range=data_range, weights=weights, k1=k1, k2=k2,
                               reduction=reduction)


# ----------------------------------------------------------------------------- input checks


def ms_ssim_min_side(win_size: int, scales: int) -> int:
    """The smallest image side MS-SSIM takes: the last scale, ceil(side / 2^(scales-1)) pixels,
    must still hold a window."""
    return (win_size - 1) * 2 ** (scales - 1) + 1


def ms_ssim_scales(weights) -> int:
    """The number of scales of ``weights`` (one exponent per scale: a 1-D tensor or a sequence of
    numbers, finite); ValueError for anything else."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty 1-D sequence, one per scale, got shape "
                             f"{tuple(weights.shape)}")
        # A tensor's values are checked outside torch.compile only (a data-dependent branch there)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(weights.detach()).all()):
            raise ValueError(f"weights must be finite, got {weights!r}")
        return weights.numel()
    try:  # a sequence of Python numbers, checked on the host
        values = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a non-empty 1-D sequence of numbers, one per scale, got {weights!r}") from None
    if not values:
        raise ValueError("weights must be a non-empty 1-D sequence, one per scale, got an empty one")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"weights must be finite, got {weights!r}")
    return len(values)


def check_ms_ssim_args(x, y, *, data_range, win_size, sigma, weights, k1, k2, reduction) -> dict:
    """ValueError, saying what was expected, for anything ``ms_ssim`` cannot take (NaN and inf
    aside: ``check_finite_inputs``, which needs a device sync); else the window arguments
    normalised to Python numbers (``window_args``), as keyword arguments."""
    check_image_pair(x, y)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_batch_for_mean(x, reduction)
    data_range, win_size, sigma, k1, k2 = window_args(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1,
                                                      k2=k2)
    scales = ms_ssim_scales(weights)
    side = ms_ssim_min_side(win_size, scales)
    h, w_ = x.shape[-2:]
    if min(h, w_) < side:
        raise ValueError(f"MS-SSIM with {scales} scales and win_size {win_size} needs images of at least "
                         f"{side}x{side} (each side > (win_size - 1) * 2^{scales - 1}), got {h}x{w_}")
    return dict(data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2)


def check_finite_inputs(x, y) -> None:
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("x and y must be finite (they hold NaN or inf; check_finite=False skips this check)")


# ----------------------------------------------------------------------------- public API


def ms_ssim(x, y, *, data_range=1.0, win_size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS, k1=0.01, k2=0.03,
            reduction="mean", backend="auto", check_finite=True):
    """Multi-scale SSIM of two image batches (B, C, H, W); see the module docstring.

    Args:
        data_range: the value range of the images (1.0 for [0, 1], 255 for 8-bit values).
        win_size, sigma: the Gaussian window of each scale.
        weights: one exponent per scale (its length is the number of scales).
        k1, k2: the stabilising constants, C1 = (k1 data_range)^2, C2 = (k2 data_range)^2.
        reduction: "mean" (a scalar) or "none" (one value per image, shape (B,)).
        backend: "auto" (the fused path when it serves these inputs, else the reference),
            "reference", or "fused" (ValueError when it cannot serve them: window 11 / sigma 1.5,
            the dtypes of the fused SSIM on that device, the compiled extension).
        check_finite: raise ValueError on NaN or inf inputs (a device sync on CUDA).

    Half-type inputs give float32 results, float64 inputs float64. Images must have sides of at
    least ``(win_size - 1) * 2 ** (len(weights) - 1) + 1`` pixels.

    Example:
        >>> x = torch.rand(2, 3, 192, 192)
        >>> y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
        >>> epban.ms_ssim(x, y)  # doctest: +SKIP
    """
    check_backend(backend)
    window = check_ms_ssim_args(x, y, data_range=data_range, win_size=win_size, sigma=sigma, weights=weights, k1=k1,
                                k2=k2, reduction=reduction)
    return _ms_ssim_value(x, y, weights=weights, reduction=reduction, backend=backend, check_finite=check_finite,
                          **window)


def ms_ssim_loss(x, y, *, weight=1.0, l1=0.0, data_range=1.0, win_size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS,
                 k1=0.01, k2=0.03, reduction="mean", backend="auto", check_finite=True):
    """``l1 * mean|x - y| + weight * (1 - MS-SSIM(x, y))`` (Zhao et al., 2017, with l1 > 0);
    reduction "mean" (a scalar) or "none" (one value per image, the L1 mean taken per image).
    A term whose weight is 0 is not computed."""
    weight = check_loss_weight("weight", weight)
    l1 = check_loss_weight("l1", l1)
    check_backend(backend)
    window = check_ms_ssim_args(x, y, data_range=data_range, win_size=win_size, sigma=sigma, weights=weights, k1=k1,
                                k2=k2, reduction=reduction)
    if check_finite and weight == 0:
        check_finite_inputs(x, y)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = x.new_zeros((x.shape[0],) if reduction == "none" else (), dtype=out_dtype)
    if l1 > 0:
        if reduction == "none":
            total = total + l1 * F.l1_loss(x, y, reduction="none").flatten(1).mean(dim=1)
        else:
            total = total + l1 * F.l1_loss(x, y)
    if weight > 0:
        value = _ms_ssim_value(x, y, weights=weights, reduction=reduction, backend=backend, check_finite=check_finite,
                               **window)
        total = total + weight * (1 - value)
    return total


__all__ = ["ms_ssim", "ms_ssim_loss", "ms_ssim_reference", "MS_SSIM_WEIGHTS", "ms_ssim_min_side"]
