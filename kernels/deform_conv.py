"""Triton kernels of the fused multi-branch deformable convolution (GMDC's four branches in one launch).

Notation: ``x`` (B, C, H, W); branch ``b`` has a k_b x k_b kernel, padding k_b // 2, stride 1,
dilation 1, one offset group, no mask (torchvision ``deform_conv2d`` semantics). All branches'
taps are numbered globally, ``g = tap0[b] + i * k_b + j``, and packed:

    offsets  (B, 2T, H, W)   channel 2g = dy, 2g + 1 = dx     (torch.cat of the branches' offsets)
    weight   (T, C, OB)      weight[g, c, o] = W_b[o, c, i, j]
    out      (B, NB * OB, H, W), branch b in channels [b * OB, (b + 1) * OB)

Forward, for pixel p = (h, w), tap g of branch b at (i, j):

    y = h - k_b // 2 + i + dy[g, p]        x' = w - k_b // 2 + j + dx[g, p]
    S[c, g, p] = sum over the 4 integer corners (yc, xc) of (y, x') of
                 (1 - |y - yc|) (1 - |x' - xc|) x[c, yc, xc]      (corners outside the image read 0)
    out[b * OB + o, p] = bias[b * OB + o] + sum_{g in b, c} weight[g, c, o] S[c, g, p]

an implicit GEMM: per tap, an (pixels x C) tile of S is built in registers from four gathers of
channels-contiguous rows of ``x`` and multiplied by a (C x OB) weight slice; no im2col buffer.

Backward, with G = dL/dout and dS[c, g, p] = sum_o weight[g, c, o] G[b * OB + o, p]:

    dL/dx[c, yc, xc]  += (1 - |y - yc|) (1 - |x' - xc|) dS[c, g, p]        (atomic scatter, fp32)
    dL/ddy[g, p]       = sum_c dS[c, g, p] ((1 - lx)(x[c, y1, x0] - x[c, y0, x0]) + lx (x[c, y1, x1] - x[c, y0, x1]))
    dL/ddx[g, p]       = sum_c dS[c, g, p] ((1 - ly)(x[c, y0, x1] - x[c, y0, x0]) + ly (x[c, y1, x1] - x[c, y1, x0]))
    dL/dweight[g, c, o] = sum_{B, p} G[b * OB + o, p] S[c, g, p]
    dL/dbias[b * OB + o] = sum_{B, p} G[b * OB + o, p]                      (done by torch)

with (y0, x0) = floor(y, x'), ly = y - y0, lx = x' - x0; the offset gradient is torchvision's
``get_coordinate_weight`` (per-corner validity, so a sample exactly on -1 has a gradient).

Work, GMDC of the official model at 1x256x64x64 (the 1024x1024 input's feature map),
4 branches k = 3, 5, 7, 9 (T = 164 taps), OB = 64:
    forward GEMM   2 * 4096 * 64 * 256 * 164 = 22.0 GFLOP; bilinear blend 7 FLOP per
                   (p, g, c) sample = 1.2 GFLOP; 172 M samples, 688 M corner reads (L1/L2).
    backward data  the same GEMM (22.0 GFLOP) + blend/offset terms ~3 GFLOP + 688 M fp32
                   atomic adds into dL/dx (4 per sample): the atomics, not DRAM, bound it.
    DRAM           x 4.2 MB + offsets 5.4 MB + weight 10.7 MB + out 4.2 MB = 24.5 MB (fp32):
                   not the bound.
    on-chip        the corner gathers move 2.75 GB (fp32; 1.4 GB bf16) through L1: neighbouring
                   pixels share corners, so most hit L1.
    so             float32 with IEEE dots (FMA) is compute-bound on the GEMM; bf16 on tensor
                   cores is bound by the gathers instead (docs/performance.md has the figures).
fp32 uses ``input_precision="ieee"`` by default (no TF32: matches torchvision to ~1e-6; "tf32x3"
is the faster near-fp32 choice, the op's ``fp32_precision`` argument); bf16 multiplies
bf16 tiles with fp32 accumulation; bilinear weights and coordinates are always fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sample_setup(off_base, g, t, k, ph, pw, mask_p, soc, soh, sow, H, W):
    """Positions, bilinear weights and corner validity of tap g (local index t) for a pixel block."""
    i = t // k
    j = t - i * k
    pad = k // 2
    dy = tl.load(off_base + (2 * g) * soc + ph * soh + pw * sow, mask=mask_p, other=0.0).to(tl.float32)
    dx = tl.load(off_base + (2 * g + 1) * soc + ph * soh + pw * sow, mask=mask_p, other=0.0).to(tl.float32)
    y = (ph - pad + i).to(tl.float32) + dy
    xx = (pw - pad + j).to(tl.float32) + dx
    y0f = tl.floor(y)
    x0f = tl.floor(xx)
    ly = y - y0f
    lx = xx - x0f
    # Clamp before the int cast: far-away samples read nothing, the cast must not overflow, and a
    # NaN offset reads nothing (its NaN weights make the output NaN).
    y0 = tl.where(y0f == y0f, tl.minimum(tl.maximum(y0f, -2.0), H + 1.0), -2.0).to(tl.int32)
    x0 = tl.where(x0f == x0f, tl.minimum(tl.maximum(x0f, -2.0), W + 1.0), -2.0).to(tl.int32)
    y1 = y0 + 1
    x1 = x0 + 1
    vy0 = (y0 >= 0) & (y0 < H) & mask_p
    vy1 = (y1 >= 0) & (y1 < H) & mask_p
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x1 >= 0) & (x1 < W)
    return y0, x0, ly, lx, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@triton.jit
def _gather_corners(x_base, y0, x0, cc, mc, m00, m01, m10, m11, sxc, sxh, sxw):
    """The four corner values (pixels x channels), fp32, 0 where a corner is outside the image."""
    p00 = y0 * sxh + x0 * sxw
    coff = (cc * sxc)[None, :]
    v00 = tl.load(x_base + p00[:, None] + coff, mask=m00[:, None] & mc[None, :], other=0.0).to(tl.float32)
    v01 = tl.load(x_base + (p00 + sxw)[:, None] + coff, mask=m01[:, None] & mc[None, :], other=0.0).to(tl.float32)
    v10 = tl.load(x_base + (p00 + sxh)[:, None] + coff, mask=m10[:, None] & mc[None, :], other=0.0).to(tl.float32)
    v11 = tl.load(x_base + (p00 + sxh + sxw)[:, None] + coff, mask=m11[:, None] & mc[None, :],
                  other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, fp32 accumulation. PRECISION "ieee"/"tf32x3"/"tf32": fp32 tiles with that
    ``input_precision``; "low": tiles in b's dtype (bf16/fp16 tensor cores).

    UPCAST multiplies the low-precision tiles as fp32 (the same products; the Triton
    interpreter's dot mishandles bf16 tiles).
    """
    if PRECISION != "low":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    elif UPCAST:
        acc = tl.dot(a.to(b.dtype).to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


# Image sizes are not specialised on: one compile serves every input size (the loss runs at
# many). C and OB are (a multiple of 16 lets the channel gathers and weight loads vectorise,
# and they are fixed per model).
_SIZES = ["H", "W", "n_pblocks"]


@triton.jit(do_not_specialize=_SIZES)
def mbdc_fwd_kernel(
    x_ptr, off_ptr, w_ptr, bias_ptr, out_ptr, ks_ptr, tap0_ptr, order_ptr,
    C, H, W, OB, n_pblocks,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    syb, syc, syh, syw,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """out = bias + sum over taps and channels of weight * bilinear(x), one (pixels x OB) tile per program."""
    pid = tl.program_id(0)
    br = tl.load(order_ptr + pid // n_pblocks)  # the host orders branches largest kernel first
    pblk = pid % n_pblocks
    bidx = tl.program_id(1).to(tl.int64)
    oblk = tl.program_id(2)
    k = tl.load(ks_ptr + br)
    tap0 = tl.load(tap0_ptr + br)

    p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = p < H * W
    ph = p // W
    pw = p - ph * W
    o = oblk * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = o < OB
    x_base = x_ptr + bidx * sxb
    off_base = off_ptr + bidx * sob

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for t in range(0, k * k):
        g = tap0 + t
        y0, x0, ly, lx, m00, m01, m10, m11 = _sample_setup(off_base, g, t, k, ph, pw, mask_p, soc, soh, sow, H, W)
        w00 = ((1.0 - ly) * (1.0 - lx))[:, None]
        w01 = ((1.0 - ly) * lx)[:, None]
        w10 = (ly * (1.0 - lx))[:, None]
        w11 = (ly * lx)[:, None]
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            mc = cc < C
            v00, v01, v10, v11 = _gather_corners(x_base, y0, x0, cc, mc, m00, m01, m10, m11, sxc, sxh, sxw)
            a = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            wt = tl.load(w_ptr + (g * C + cc)[:, None] * OB + o[None, :], mask=mc[:, None] & mo[None, :], other=0.0)
            acc = _mma(a, wt, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + br * OB + o, mask=mo, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + bidx * syb + (br * OB + o)[None, :] * syc + (ph * syh + pw * syw)[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mo[None, :])


@triton.jit(do_not_specialize=_SIZES)
def mbdc_bwd_data_kernel(
    x_ptr, off_ptr, w_ptr, gy_ptr, gx_ptr, goff_ptr, ks_ptr, tap0_ptr, order_ptr,
    C, H, W, OB, n_pblocks,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    sgb, sgc, sgh, sgw,
    sdb, sdc, sdh, sdw,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, ONE_OBLOCK: tl.constexpr,
):
    """dL/dx (atomic scatter into an fp32 buffer with x's strides) and dL/doffsets (one store per tap).

    ONE_OBLOCK (OB <= BLOCK_O): the program's dL/dout tile is loaded once, not once per tap.
    """
    pid = tl.program_id(0)
    br = tl.load(order_ptr + pid // n_pblocks)
    pblk = pid % n_pblocks
    bidx = tl.program_id(1).to(tl.int64)
    k = tl.load(ks_ptr + br)
    tap0 = tl.load(tap0_ptr + br)

    p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = p < H * W
    ph = p // W
    pw = p - ph * W
    x_base = x_ptr + bidx * sxb
    gx_base = gx_ptr + bidx * sxb
    off_base = off_ptr + bidx * sob
    gy_base = gy_ptr + bidx * sgb + (ph * sgh + pw * sgw)[:, None]
    goff_base = goff_ptr + bidx * sdb + ph * sdh + pw * sdw
    if ONE_OBLOCK:
        o_all = tl.arange(0, BLOCK_O)
        mo_all = o_all < OB
        gy_all = tl.load(gy_base + ((br * OB + o_all) * sgc)[None, :], mask=mask_p[:, None] & mo_all[None, :],
                         other=0.0)

    for t in range(0, k * k):
        g = tap0 + t
        y0, x0, ly, lx, m00, m01, m10, m11 = _sample_setup(off_base, g, t, k, ph, pw, mask_p, soc, soh, sow, H, W)
        w00 = ((1.0 - ly) * (1.0 - lx))[:, None]
        w01 = ((1.0 - ly) * lx)[:, None]
        w10 = (ly * (1.0 - lx))[:, None]
        w11 = (ly * lx)[:, None]
        p00 = y0 * sxh + x0 * sxw
        gdy = tl.zeros((BLOCK_P,), dtype=tl.float32)
        gdx = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            mc = cc < C
            ds = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            if ONE_OBLOCK:
                wt = tl.load(w_ptr + (g * C + cc)[None, :] * OB + o_all[:, None], mask=mo_all[:, None] & mc[None, :],
                             other=0.0)
                ds = _mma(gy_all, wt, ds, PRECISION, UPCAST)
            else:
                for o0 in range(0, OB, BLOCK_O):
                    o = o0 + tl.arange(0, BLOCK_O)
                    mo = o < OB
                    gy = tl.load(gy_base + ((br * OB + o) * sgc)[None, :], mask=mask_p[:, None] & mo[None, :],
                                 other=0.0)
                    wt = tl.load(w_ptr + (g * C + cc)[None, :] * OB + o[:, None], mask=mo[:, None] & mc[None, :],
                                 other=0.0)
                    ds = _mma(gy, wt, ds, PRECISION, UPCAST)
            v00, v01, v10, v11 = _gather_corners(x_base, y0, x0, cc, mc, m00, m01, m10, m11, sxc, sxh, sxw)
            gdy += tl.sum(ds * ((1.0 - lx)[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)), axis=1)
            gdx += tl.sum(ds * ((1.0 - ly)[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)), axis=1)
            coff = (cc * sxc)[None, :]
            tl.atomic_add(gx_base + p00[:, None] + coff, ds * w00, mask=m00[:, None] & mc[None, :], sem="relaxed")
            tl.atomic_add(gx_base + (p00 + sxw)[:, None] + coff, ds * w01, mask=m01[:, None] & mc[None, :],
                          sem="relaxed")
            tl.atomic_add(gx_base + (p00 + sxh)[:, None] + coff, ds * w10, mask=m10[:, None] & mc[None, :],
                          sem="relaxed")
            tl.atomic_add(gx_base + (p00 + sxh + sxw)[:, None] + coff, ds * w11, mask=m11[:, None] & mc[None, :],
                          sem="relaxed")
        tl.store(goff_base + (2 * g) * sdc, gdy.to(goff_ptr.dtype.element_ty), mask=mask_p)
        tl.store(goff_base + (2 * g + 1) * sdc, gdx.to(goff_ptr.dtype.element_ty), mask=mask_p)


@triton.jit(do_not_specialize=["B", "H", "W"])
def mbdc_bwd_weight_kernel(
    x_ptr, off_ptr, gy_ptr, gw_ptr, ks_ptr, tap0_ptr, tap_branch_ptr,
    B, C, H, W, OB,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    sgb, sgc, sgh, sgw,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """dL/dweight[g, c, o] = sum over batch and pixels of G[o, p] S[c, g, p]; one (OB x C) tile per program."""
    g = tl.program_id(0)
    cblk = tl.program_id(1)
    oblk = tl.program_id(2)
    br = tl.load(tap_branch_ptr + g)
    k = tl.load(ks_ptr + br)
    t = g - tl.load(tap0_ptr + br)
    cc = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cc < C
    o = oblk * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = o < OB

    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for bidx in range(0, B):
        x_base = x_ptr + bidx * sxb
        off_base = off_ptr + bidx * sob
        gy_base = gy_ptr + bidx * sgb
        for p0 in range(0, H * W, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask_p = p < H * W
            ph = p // W
            pw = p - ph * W
            y0, x0, ly, lx, m00, m01, m10, m11 = _sample_setup(off_base, g, t, k, ph, pw, mask_p, soc, soh, sow, H, W)
            v00, v01, v10, v11 = _gather_corners(x_base, y0, x0, cc, mc, m00, m01, m10, m11, sxc, sxh, sxw)
            s = (((1.0 - ly) * (1.0 - lx))[:, None] * v00 + ((1.0 - ly) * lx)[:, None] * v01
                 + (ly * (1.0 - lx))[:, None] * v10 + (ly * lx)[:, None] * v11)
            gyt = tl.load(gy_base + ((br * OB + o) * sgc)[:, None] + (ph * sgh + pw * sgw)[None, :],
                          mask=mo[:, None] & mask_p[None, :], other=0.0)
            acc = _mma(gyt, s.to(gyt.dtype), acc, PRECISION, UPCAST)
    tl.store(gw_ptr + (g * C + cc)[None, :] * OB + o[:, None], acc.to(gw_ptr.dtype.element_ty),
             mask=mo[:, None] & mc[None, :])
