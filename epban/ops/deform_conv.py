"""Multi-branch deformable convolution (GMDC's branches): the reference, the fused op and the dispatch.

For branches b = 0 .. NB-1 with kernels k_b (odd), weights W_b (OB, C, k_b, k_b), biases (OB,)
and offsets (B, 2 k_b^2, H, W):

    out = cat_b deform_conv2d(x, offsets_b, W_b, bias_b, padding=k_b // 2)       (B, NB * OB, H, W)

with torchvision's semantics: stride 1, dilation 1, one offset group, no mask, bilinear
sampling reading 0 outside the image, offset channels 2 (i k + j) = dy and 2 (i k + j) + 1 = dx.
The reference is that loop. ``multi_branch_deform_conv_gather`` computes the same function
with ``grid_sample`` (bilinear, zeros outside) and one matmul per branch: the CPU default,
several times faster than torchvision's CPU kernels forward + backward. The fused op
(``kernels/deform_conv.py``) computes all branches in one launch as an implicit GEMM. It is
the custom op ``torch.ops.epban.multi_branch_deform_conv`` (``torch.library``: schema, fake
kernel, autograd), so it works under ``torch.compile`` and CUDA-graph capture.

``backend``: "auto" (the fused kernels on CUDA, the gather path on the CPU, the reference
elsewhere), "reference", "gather" (any device) or "fused" (CUDA, or CPU under
``TRITON_INTERPRET=1``). float32 dots of the fused kernels: ``fp32_precision`` = "ieee" (exact
float32, the default), "tf32x3" (tensor cores, about float32's accuracy) or "tf32" (fastest,
about 1e-3); ``None`` takes ``epban.settings.fp32_precision("ieee")`` (the
``EPBAN_FP32_PRECISION`` variable, read at each call).
"""

import functools

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from epban import settings
from epban._extension import BACKENDS, triton_interpret
from epban.ops._checks import cdiv, is_channels_last, memory_format, next_power_of_2
from epban.ops.registry import register, triton_auto_ok, triton_unavailable_reason, use_fused

try:
    import triton
except Exception:  # the reference and gather paths need no Triton
    triton = None


def multi_branch_deform_conv_reference(x, offsets, weights, biases):
    """The specification: one torchvision ``deform_conv2d`` per branch, concatenated on channels.

    A NaN offset becomes a wild sampling index inside torchvision's CPU kernel (a crash), so
    non-finite offsets are zeroed first; the fused kernels clamp coordinates instead and give NaN.
    torchvision has no bfloat16 kernel: bf16 inputs are computed in float32 and the result cast back.
    """
    dtype = x.dtype
    up = (lambda t: t.float()) if dtype == torch.bfloat16 else (lambda t: t)  # noqa: E731
    outs = [
        deform_conv2d(up(x), up(torch.nan_to_num(off, nan=0.0, posinf=0.0, neginf=0.0)), up(w), up(b),
                      padding=w.shape[-1] // 2)
        for off, w, b in zip(offsets, weights, biases)
    ]
    return torch.cat(outs, dim=1).to(dtype)


def _sampling_grid(offsets: torch.Tensor, k: int, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` coordinates (B, k*k, H*W, 2) of a k x k branch's taps at every output pixel.

    Tap t = i k + j of pixel (h, w) samples y = h + i - k//2 + dy, x = w + j - k//2 + dx, with
    dy = offsets[:, 2t], dx = offsets[:, 2t + 1]. The normalisation is align_corners=False's,
    g = (2 x + 1) / W - 1, which maps pixel x back to x for every W >= 1 (align_corners=True's
    would divide by W - 1 = 0 on one-pixel maps).
    """
    b = offsets.shape[0]
    half = k // 2
    taps = torch.arange(-half, half + 1, device=offsets.device, dtype=offsets.dtype)
    rows = torch.arange(height, device=offsets.device, dtype=offsets.dtype).view(1, 1, height, 1)
    cols = torch.arange(width, device=offsets.device, dtype=offsets.dtype).view(1, 1, 1, width)
    off = offsets.view(b, k * k, 2, height, width)
    y = rows + taps.repeat_interleave(k).view(1, k * k, 1, 1) + off[:, :, 0]
    x = cols + taps.repeat(k).view(1, k * k, 1, 1) + off[:, :, 1]
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
    return grid.view(b, k * k, height * width, 2)


def multi_branch_deform_conv_gather(x, offsets, weights, biases):
    """The reference's function from plain PyTorch ops: per branch, one ``grid_sample`` gathers
    the (B, C, k*k, H*W) bilinear samples (reading 0 outside the image, as torchvision) and
    one matmul with the (OB, C*k*k) weight contracts them.

    Its autograd is PyTorch's (grid_sample's backward gives the input and offset gradients),
    which on the CPU is several times faster than torchvision's deform_conv2d backward. Non-finite
    offsets give NaN at their pixel (as the fused kernels). Half types are computed in float32.
    """
    dtype = x.dtype
    up = (lambda t: t.float()) if dtype in (torch.bfloat16, torch.float16) else (lambda t: t)  # noqa: E731
    x = up(x)
    b, c, h, w = x.shape
    outs = []
    for off, weight, bias in zip(offsets, weights, biases):
        k = weight.shape[-1]
        samples = F.grid_sample(x, _sampling_grid(up(off), k, h, w), mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        out = torch.matmul(up(weight).reshape(weight.shape[0], c * k * k), samples.reshape(b, c * k * k, h * w))
        outs.append((out + up(bias).view(1, -1, 1)).view(b, -1, h, w))
    return torch.cat(outs, dim=1).to(dtype)


def pack_weights(weights) -> torch.Tensor:
    """Branch weights (OB, C, k, k) -> the kernels' layout (sum k^2, C, OB): tap-major, OB contiguous."""
    return torch.cat([w.permute(2, 3, 1, 0).reshape(-1, w.shape[1], w.shape[0]) for w in weights], dim=0)


def check_deform_args(x, offsets, weights, biases) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D floating-point tensor (B, C, H, W), got {got}")
    n = len(weights)
    if n == 0 or len(offsets) != n or (biases is not None and len(biases) != n):
        raise ValueError(
            f"offsets, weights and biases must be lists of one tensor per branch (same length >= 1), got "
            f"{len(offsets)}, {n}, {None if biases is None else len(biases)}"
        )
    b, c, h, w = x.shape
    ob = weights[0].shape[0]
    for i, (off, wt) in enumerate(zip(offsets, weights)):
        k = wt.shape[-1]
        if wt.dim() != 4 or wt.shape != (ob, c, k, k) or k % 2 == 0:
            raise ValueError(
                f"weights[{i}] must be (OB={ob}, C={c}, k, k) with odd k, got {tuple(wt.shape)}"
            )
        if off.shape != (b, 2 * k * k, h, w):
            raise ValueError(f"offsets[{i}] must be {(b, 2 * k * k, h, w)} for a {k}x{k} kernel, got {tuple(off.shape)}")
        if off.device != x.device or wt.device != x.device:
            raise ValueError(f"branch {i}: offsets and weights must be on x's device {x.device}")
    if biases is not None:
        for i, bias in enumerate(biases):
            if bias is not None and bias.shape != (ob,):
                raise ValueError(f"biases[{i}] must be ({ob},), got {tuple(bias.shape)}")


def multi_branch_deform_conv(x, offsets, weights, biases, *, backend="auto", fp32_precision=None):
    """All branches' deformable convolutions concatenated: (B, C, H, W) -> (B, NB * OB, H, W).

    ``offsets``, ``weights``, ``biases``: one tensor per branch; ``backend`` and
    ``fp32_precision``: see the module docstring (ValueError for an impossible "fused").
    """
    check_deform_args(x, offsets, weights, biases)
    path = deform_path(x, backend)
    check_fp32_precision(fp32_precision)
    if biases is None or any(b is None for b in biases):
        biases = [torch.zeros(w.shape[0], device=x.device, dtype=w.dtype) if b is None else b
                  for w, b in zip(weights, biases or [None] * len(weights))]
    if path == "gather":
        return multi_branch_deform_conv_gather(x, offsets, weights, biases)
    if path == "reference":
        return multi_branch_deform_conv_reference(x, offsets, weights, biases)
    kernel_sizes = [w.shape[-1] for w in weights]
    return fused_deform_conv_packed(
        x, torch.cat(list(offsets), dim=1), pack_weights(weights), torch.cat(list(biases)), kernel_sizes,
        fp32_precision=fp32_precision,
    )


def fused_deform_conv_packed(x, offsets, weight, bias, kernel_sizes, *, fp32_precision=None):
    """The fused op on packed arguments: offsets (B, 2T, H, W), weight (T, C, OB), bias (NB * OB,) or None.

    Weight, bias and offsets are cast to x's dtype (so the op runs under autocast); the result
    has x's dtype and memory format. Used by the loss mode, which packs once.
    """
    dtype = x.dtype
    precision = check_fp32_precision(fp32_precision)
    bias = torch.zeros(len(kernel_sizes) * weight.shape[-1], device=x.device, dtype=dtype) if bias is None else bias
    return _mbdc_op(
        x, offsets.to(dtype), weight.to(dtype), bias.to(dtype), [int(k) for k in kernel_sizes], precision
    )


DEFORM_BACKENDS = BACKENDS + ("gather",)
_INTERPRETER_FLOAT16 = "the Triton interpreter does not take float16 on CPU; use float32 or bfloat16"


def deform_path(x, backend) -> str:
    """Which computation serves ``x`` for ``backend``: "fused", "gather" or "reference".

    "auto": the gather path on the CPU, elsewhere the registry's rule (the fused kernels on
    CUDA with Triton, else the reference). ValueError for an unknown backend or an impossible
    "fused".
    """
    if backend not in DEFORM_BACKENDS:
        raise ValueError(f"backend must be one of {DEFORM_BACKENDS}, got {backend!r}")
    if backend == "gather" or (backend == "auto" and x.device.type == "cpu"):
        return "gather"
    unavailable = triton_unavailable_reason("the fused deformable convolution", x.device, x.dtype,
                                            interpreter_refuses={torch.float16: _INTERPRETER_FLOAT16})
    return "fused" if use_fused(backend, unavailable, auto_ok=triton_auto_ok(x.device)) else "reference"


def check_fp32_precision(fp32_precision) -> str:
    """``None`` -> ``epban.settings.fp32_precision("ieee")``; ValueError for an unknown name."""
    if fp32_precision is None:
        return settings.fp32_precision("ieee")
    if fp32_precision not in settings.FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {settings.FP32_PRECISIONS}, got {fp32_precision!r}")
    return fp32_precision


# ---------------------------------------------------------------------------------- launchers
_BLOCK_P = 64
# Channel block of the kernels' gathers and dots. 16 in the input-gradient kernel would halve
# its registers (two programs per SM instead of one) for twice the loop steps: it was slower.
_BLOCK_C = 32
# The 64-pixel bf16 tile's warps depend on the Triton version (see _pixel_tile).
_TRITON_BEFORE_3_7 = triton is not None and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)


def _precision(dtype, fp32_precision: str) -> str:
    if dtype != torch.float32:
        return "low"
    # The interpreter has no TF32: it computes every precision as fp32.
    return "ieee" if triton_interpret() else fp32_precision


def _pixel_tile(pixels: int, dtype=torch.float32) -> tuple[int, int]:
    """(BLOCK_P, num_warps) of the forward and input-gradient kernels.

    A program runs all k^2 taps of one branch, so the k = 9 programs set the critical path:
    below ~1000 programs, 32-pixel tiles cut it and fill the SMs; above, 64-pixel tiles halve
    the weight traffic. float32 64-pixel tiles need 8 warps to stay within registers (ptxas,
    sm_90). bf16/fp16 ones run faster with 4 warps under Triton before 3.7; later Tritons
    compile those with spills, so they keep 8 warps (``scripts/dev/deform_tile_sweep.py`` times
    the tiles).
    """
    if pixels < 256 * _BLOCK_P:
        return 32, 4
    if dtype != torch.float32 and _TRITON_BEFORE_3_7:
        return _BLOCK_P, 4
    return _BLOCK_P, 8


def _block_c(c: int) -> int:
    # The interpreter runs each tile op as one numpy call: fewer, wider tiles are faster there.
    return max(16, min(128, next_power_of_2(c))) if triton_interpret() else _BLOCK_C


def _block_o(ob: int) -> int:
    return max(16, min(64, next_power_of_2(ob)))


@functools.lru_cache(maxsize=None)
def _tables_cpu(kernel_sizes: tuple):
    ks = torch.tensor(kernel_sizes, dtype=torch.int32)
    taps = ks * ks
    tap0 = torch.cumsum(taps, 0, dtype=torch.int32) - taps
    order = torch.argsort(-ks, stable=True).to(torch.int32)  # largest kernel first: the long programs start early
    tap_branch = torch.repeat_interleave(torch.arange(len(kernel_sizes), dtype=torch.int32), taps)
    return ks, tap0.to(torch.int32), order, tap_branch


_TABLES: dict = {}


def _tables(kernel_sizes, device):
    """Per-branch kernel size, first global tap, launch order, and per-tap branch, cached per device.

    Cached so that a CUDA-graph capture or a compiled graph never copies them host->device.
    """
    key = (tuple(kernel_sizes), str(device))
    if key not in _TABLES:
        _TABLES[key] = tuple(t.to(device) for t in _tables_cpu(tuple(kernel_sizes)))
    return _TABLES[key]


def _strides(t):
    return tuple(int(s) for s in t.stride())


def _out_like(x, channels, dtype):
    b, _, h, w = x.shape
    fmt = memory_format(is_channels_last(x))
    return torch.empty((b, channels, h, w), device=x.device, dtype=dtype, memory_format=fmt)


def _launch_forward(x, offsets, weight, bias, kernel_sizes, precision):
    from epban.kernels.deform_conv import mbdc_fwd_kernel

    b, c, h, w = x.shape
    nb, ob = len(kernel_sizes), weight.shape[-1]
    out = _out_like(x, nb * ob, x.dtype)
    ks, tap0, order, _ = _tables(kernel_sizes, x.device)
    (block_p, warps), block_o = _pixel_tile(b * h * w, x.dtype), _block_o(ob)
    n_pblocks = cdiv(h * w, block_p)
    grid = (nb * n_pblocks, b, cdiv(ob, block_o))
    mbdc_fwd_kernel[grid](
        x, offsets, weight, bias, out, ks, tap0, order,
        c, h, w, ob, n_pblocks,
        *_strides(x), *_strides(offsets), *_strides(out),
        HAS_BIAS=True, PRECISION=_precision(x.dtype, precision), UPCAST=triton_interpret(),
        BLOCK_P=block_p, BLOCK_C=_block_c(c), BLOCK_O=block_o, num_warps=warps,
    )
    return out


def _launch_backward_data(grad, x, offsets, weight, kernel_sizes, precision):
    from epban.kernels.deform_conv import mbdc_bwd_data_kernel

    b, c, h, w = x.shape
    nb, ob = len(kernel_sizes), weight.shape[-1]
    grad_x = torch.zeros_like(x, dtype=torch.float32)  # keeps x's (dense) strides: the kernel indexes both alike
    grad_off = torch.empty_like(offsets)
    ks, tap0, order, _ = _tables(kernel_sizes, x.device)
    (block_p, warps), block_o = _pixel_tile(b * h * w, x.dtype), _block_o(ob)
    n_pblocks = cdiv(h * w, block_p)
    grid = (nb * n_pblocks, b)
    mbdc_bwd_data_kernel[grid](
        x, offsets, weight, grad, grad_x, grad_off, ks, tap0, order,
        c, h, w, ob, n_pblocks,
        *_strides(x), *_strides(offsets), *_strides(grad), *_strides(grad_off),
        PRECISION=_precision(x.dtype, precision), UPCAST=triton_interpret(),
        BLOCK_P=block_p, BLOCK_C=_block_c(c), BLOCK_O=block_o, ONE_OBLOCK=ob <= block_o,
        num_warps=warps,
    )
    return grad_x.to(x.dtype), grad_off


def _launch_backward_weight(grad, x, offsets, weight, kernel_sizes, precision):
    from epban.kernels.deform_conv import mbdc_bwd_weight_kernel

    b, c, h, w = x.shape
    ob = weight.shape[-1]
    grad_w = torch.empty(weight.shape, device=x.device, dtype=torch.float32)
    ks, tap0, _, tap_branch = _tables(kernel_sizes, x.device)
    block_o = _block_o(ob)
    # fp32 (FMA) tiles need 8 warps at 32 pixels to stay within registers; bf16 fits 64 in 4.
    block_p, warps = (32, 8) if x.dtype == torch.float32 else (_BLOCK_P, 4)
    grid = (weight.shape[0], cdiv(c, _block_c(c)), cdiv(ob, block_o))
    mbdc_bwd_weight_kernel[grid](
        x, offsets, grad, grad_w, ks, tap0, tap_branch,
        b, c, h, w, ob,
        *_strides(x), *_strides(offsets), *_strides(grad),
        PRECISION=_precision(x.dtype, precision), UPCAST=triton_interpret(),
        BLOCK_P=block_p, BLOCK_C=_block_c(c), BLOCK_O=block_o, num_warps=warps,
    )
    return grad_w.to(weight.dtype)


# ------------------------------------------------------------------------ the registered custom op
def _dense(t):
    """Kernels index with strides but need one dense layout: NCHW or channels_last."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


@torch.library.custom_op("epban::multi_branch_deform_conv", mutates_args=())
def _mbdc_op(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             kernel_sizes: list[int], fp32_precision: str) -> torch.Tensor:
    return _launch_forward(_dense(x), _dense(offsets), weight.contiguous(), bias.contiguous(), kernel_sizes,
                           fp32_precision)


@_mbdc_op.register_fake
def _(x, offsets, weight, bias, kernel_sizes, fp32_precision):
    return _out_like(x, len(kernel_sizes) * weight.shape[-1], x.dtype)


@torch.library.custom_op("epban::multi_branch_deform_conv_backward_data", mutates_args=())
def _mbdc_bwd_data_op(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                      kernel_sizes: list[int], fp32_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward_data(_dense(grad), _dense(x), _dense(offsets), weight.contiguous(), kernel_sizes,
                                 fp32_precision)


@_mbdc_bwd_data_op.register_fake
def _(grad, x, offsets, weight, kernel_sizes, fp32_precision):
    return torch.empty_like(x), torch.empty_like(offsets)


@torch.library.custom_op("epban::multi_branch_deform_conv_backward_weight", mutates_args=())
def _mbdc_bwd_weight_op(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                        kernel_sizes: list[int], fp32_precision: str) -> torch.Tensor:
    return _launch_backward_weight(_dense(grad), _dense(x), _dense(offsets), weight, kernel_sizes, fp32_precision)


@_mbdc_bwd_weight_op.register_fake
def _(grad, x, offsets, weight, kernel_sizes, fp32_precision):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, offsets, weight, bias, kernel_sizes, fp32_precision = inputs
    # Only the inputs are kept: S is recomputed in the backward, never stored (it is C * T / OB
    # times larger than the output).
    ctx.save_for_backward(x, offsets, weight)
    ctx.kernel_sizes = kernel_sizes
    ctx.fp32_precision = fp32_precision
    ctx.ob = weight.shape[-1]


def _backward(ctx, grad):
    x, offsets, weight = ctx.saved_tensors
    ks = ctx.kernel_sizes
    need_x, need_off, need_w, need_b = ctx.needs_input_grad[:4]
    grad_x = grad_off = grad_w = grad_b = None
    if need_x or need_off:
        grad_x, grad_off = _mbdc_bwd_data_op(grad, x, offsets, weight, ks, ctx.fp32_precision)
    if need_w:
        grad_w = _mbdc_bwd_weight_op(grad, x, offsets, weight, ks, ctx.fp32_precision)
    if need_b:
        grad_b = grad.sum(dim=(0, 2, 3)).to(weight.dtype)
    return grad_x, grad_off, grad_w, grad_b, None, None


_mbdc_op.register_autograd(_backward, setup_context=_setup_context)


def _auto_backend(device: torch.device) -> str:
    return deform_path(torch.empty(0, device=device), "auto")


register("deform_conv", kernels="Triton (kernels/deform_conv.py); gather: grid_sample + matmul in PyTorch",
         auto_backend=_auto_backend)
