"""Triton kernels of the bi-directional axial attention, forward and backward.

epban.ops.axial_attention holds the reference, the plan and launchers, and the custom op.
For q, k, v of shape (B, C, H, W), axial(q, k, v) = 0.5 * (row + col). For one pass
(row: sequences along W, one per (b, h); col: along H, one per (b, w)) and one sequence
with positions i, j in [0, L) and channels c:

    S[i, j]   = sum_c q[c, i] k[c, j]
    mu, sigma = mean(S), std(S, unbiased) + eps    over all logits of the group
                                                   (group: one image, or the whole batch)
    A[i, j]   = exp(S[i, j] / sigma - lse[i]),     lse[i] = logsumexp_j S[i, j] / sigma
    out[c, j] = sum_i v[c, i] A[i, j]

Backward, with g = 0.5 * dL/d(axial) seen by each pass:

    dA[i, j] = sum_c v[c, i] g[c, j]                dv[c, i] = sum_j A[i, j] g[c, j]
    D[i]     = sum_j A[i, j] dA[i, j]               dZ[i, j] = A[i, j] (dA[i, j] - D[i])
    dsigma   = -(1 / sigma^2) sum_group sum_ij dZ[i, j] S[i, j]
             = -(1 / sigma^2) sum_group sum_i (E[i] - D[i] F[i]),
               E[i] = sum_j A dA (S - mu),  F[i] = sum_j A (S - mu)   (the shift by mu is
               exact because sum_j dZ[i, j] = 0, and it avoids cancellation)
    omega    = dsigma / ((N - 1) (sigma - eps))     (d std / dS = (S - mu) / ((N - 1) std))
    dS[i, j] = dZ[i, j] / sigma + omega (S[i, j] - mu)
    dq[c, i] = sum_j dS[i, j] k[c, j]               dk[c, j] = sum_i dS[i, j] q[c, i]

Why this shape:
- Nothing of size L x L reaches global memory: every kernel recomputes its S tiles from q
  and k, so memory stays linear in the map. The forward saves lse (one number per row,
  B*H*W per pass) and the group statistics (mu, sigma, N) for the backward.
- sigma needs every logit of a group before any softmax, so the forward contracts S at
  least twice (moments, then softmax and output); the backward contracts S and dA again
  for dv/D and for dq/dk. Moments of tiles are merged with Chan's formula (mean and M2
  about the mean), never as the sum of squares minus the squared sum.
- q, k, v (and g) are read as they are, all contiguous NCHW or all channels_last, through
  the strides (sB, sC, sH, sW) of that layout; outputs and gradients are written in it. A
  pass is a choice of two of them (row: sequence stride sH, position stride sW; column: sW
  and sH), picked by each kernel body's ``PASS``. In channels_last every (position x
  channel) tile loads contiguous channels in both passes; in NCHW the column pass's loads
  are strided (program ids put sequences fastest, so neighbours share cache lines).
- A program owns one tile of positions of one sequence, with all C channels, and loops
  over the tiles of the other side. ``RESIDENT`` tiles (half precision and "tf32" dots)
  hold the whole-C tile in registers for the whole loop; otherwise the logits are
  contracted over chunks of ``BLOCK_CK`` channels (fewer registers: "tf32x3" splits every
  operand in two).
- Both directions of the block share every launch (program_id(1) = direction). The row and
  column passes write the same elements, so they are ordered by launches rather than
  atomics: the result is deterministic and every output element is stored.

Launches, general tiles: forward 1 stats (S tile moments, both passes) -> 2 sigma (merge
per group) -> 3 lse (online logsumexp) -> 4 out, row pass (stores 0.5 row) -> 5 out, column
pass (adds 0.5 col); backward 1 dv/D, row -> 2 dv/D, column -> 3 omega per group -> 4 dq,
row -> 5 dk, row -> 6 dq, column -> 7 dk, column (a dq or dk launch nobody needs is skipped).
When every sequence of both passes fits one tile, the one-tile kernels serve instead:
forward 1 stats -> 2 sigma + lse + out, row -> 3 the same, column; backward 1 dv/D, row ->
2 dv/D, column -> 3 omega + dq + dk, row -> 4 the same, column. Each of their programs
merges its group's partials itself instead of waiting for a merge launch, and contracts S
(and dA) once for everything its tile needs.

Precision: float32 dots use ``PRECISION`` ("ieee": plain fp32 FMAs; "tf32x3" or "tf32" trade
accuracy for tensor-core speed). float16 and bfloat16 inputs use tensor cores with float32
accumulation and statistics; A and dS are rounded to the input dtype for their dots (as in
flash attention) and the row pass's result is stored in it before the column pass adds its
half. float64 (for the CPU interpreter) accumulates in float64.

Limits: C up to a few hundred (the whole-C tile is a register tile: BLOCK_C is the next
power of two >= C). Triton decides at import whether these kernels are interpreted
(TRITON_INTERPRET=1); the interpreter computes wrong bfloat16 dots, and that of Triton 3.6
fails on runtime loop bounds with numpy 2.4. This module imports Triton unconditionally:
import it only after checking that Triton is available.
"""
import inspect

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- helpers

_RUNTIME_INTS = ("B", "C", "H", "W", "NG", "n_row_progs", "n_progs", "per_row", "per_col",
                 "pid_offset", "sample", "accumulate", "need_q", "need_k", "need_v")


def _sized_jit(fn):
    """triton.jit without specialising sizes and flags on their values: one compilation
    serves every shape and both sigma scopes."""
    names = [a for a in inspect.signature(fn).parameters if a in _RUNTIME_INTS]
    return triton.jit(fn, do_not_specialize=names)


@triton.jit
def _geometry(local, H, W, sH, sW, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``local`` of a pass -> (image b, sequence s, tile of positions) and the pass's
    sequence count NS, length L, sequence and position strides (elements). sH, sW: the row
    and column strides of every tensor of the call (W and 1 in NCHW, W C and C in
    channels_last).

    Sequences vary fastest, then tiles, then images: an image's programs are contiguous
    (its partial sums too), and neighbouring sequences (which share cache lines in the NCHW
    column pass) run side by side.
    """
    if PASS == 0:
        NS = H
        L = W
        s_seq = sH
        s_pos = sW
    else:
        NS = W
        L = H
        s_seq = sW
        s_pos = sH
    n_tiles = (L + BLOCK - 1) // BLOCK
    s = local % NS
    tile = (local // NS) % n_tiles
    b = local // (NS * n_tiles)
    return b, s, tile, NS, L, s_seq, s_pos


@triton.jit
def _pick(d, first, second):
    """``first`` for direction 0, ``second`` for direction 1 (each launch serves both)."""
    if d == 0:
        chosen = first
    else:
        chosen = second
    return chosen


@triton.jit
def _operands(d, q0, k0, v0, g0, q1, k1, v1, g1):
    """Direction d's q, k, v and upstream-gradient pointers (the backward kernels serve both)."""
    return _pick(d, q0, q1), _pick(d, k0, k1), _pick(d, v0, v1), _pick(d, g0, g1)


@triton.jit
def _tile_setup(local, H, W, sB, sH, sW, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets shared by every kernel body: seq_off / s_pos address the program's sequence
    (inputs and outputs alike); offs_t / mask_t: the program's tile of positions; rows: the
    sequence's first entry in the per-row state."""
    b, s, tile, NS, L, s_seq, s_pos = _geometry(local, H, W, sH, sW, PASS, BLOCK)
    seq_off = b.to(tl.int64) * sB + s * s_seq
    offs_t = tile * BLOCK + tl.arange(0, BLOCK)
    mask_t = offs_t < L
    rows = (b * NS + s).to(tl.int64) * L
    return b, L, s_pos, seq_off, offs_t, mask_t, rows


@triton.jit
def _by_position(ptr, seq_off, offs_p, mask_p, offs_c, mask_c, s_pos, sC):
    """x[c, p] of one sequence as a (positions, channels) tile: a dot's left operand."""
    return tl.load(ptr + seq_off + offs_p[:, None] * s_pos + offs_c[None, :] * sC,
                   mask=mask_p[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _by_channel(ptr, seq_off, offs_c, mask_c, offs_p, mask_p, s_pos, sC):
    """x[c, p] of one sequence as a (channels, positions) tile."""
    return tl.load(ptr + seq_off + offs_c[:, None] * sC + offs_p[None, :] * s_pos,
                   mask=mask_c[:, None] & mask_p[None, :], other=0.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _resident(ptr, seq_off, offs_p, mask_p, offs_c, mask_c, s_pos, sC, BY_CHANNEL: tl.constexpr,
              RESIDENT: tl.constexpr):
    """x's (positions, channels) tile (_by_position), or its (channels, positions) tile with
    BY_CHANNEL, when the logits are contracted from resident tiles; else nothing (0.0)."""
    if RESIDENT:
        if BY_CHANNEL:
            tile = _by_channel(ptr, seq_off, offs_c, mask_c, offs_p, mask_p, s_pos, sC)
        else:
            tile = _by_position(ptr, seq_off, offs_p, mask_p, offs_c, mask_c, s_pos, sC)
    else:
        tile = 0.0
    return tile


@triton.jit
def _whole(tile, ptr, seq_off, offs_p, mask_p, offs_c, mask_c, s_pos, sC, BY_CHANNEL: tl.constexpr,
           RESIDENT: tl.constexpr):
    """The whole-C tile of _resident: ``tile`` itself when resident, else loaded now."""
    if RESIDENT:
        whole = tile
    elif BY_CHANNEL:
        whole = _by_channel(ptr, seq_off, offs_c, mask_c, offs_p, mask_p, s_pos, sC)
    else:
        whole = _by_position(ptr, seq_off, offs_p, mask_p, offs_c, mask_c, s_pos, sC)
    return whole


@triton.jit
def _logits(a_tile, b_tile, a_ptr, b_ptr, seq_off, offs_m, mask_m, offs_n, mask_n, C, sC, s_pos,
            BLOCK: tl.constexpr, BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
            ACC: tl.constexpr):
    """sum_c a[c, m] b[c, n] as a (BLOCK, BLOCK) tile. RESIDENT: one dot of the (m x all C) and
    (all C x n) tiles a_tile, b_tile already in registers. Otherwise a loop over chunks of
    BLOCK_CK channels loaded from a_ptr, b_ptr (a_tile, b_tile are unused): fewer registers,
    which the float32-exact precisions need ("tf32x3" splits every operand in two)."""
    acc = tl.zeros([BLOCK, BLOCK], dtype=ACC)
    if RESIDENT:
        acc = _dot(a_tile, b_tile, acc, PRECISION)
    else:
        for c0 in range(0, C, BLOCK_CK):
            offs_k = c0 + tl.arange(0, BLOCK_CK)
            mask_k = offs_k < C
            at = _by_position(a_ptr, seq_off, offs_m, mask_m, offs_k, mask_k, s_pos, sC)
            bt = _by_channel(b_ptr, seq_off, offs_k, mask_k, offs_n, mask_n, s_pos, sC)
            acc = _dot(at, bt, acc, PRECISION)
    return acc


@triton.jit
def _store_channels(ptr, seq_off, offs_c, mask_c, offs_p, mask_p, sC, s_pos, res, accumulate, ACC: tl.constexpr):
    """x[c, p] = res (a (channels, positions) tile), or x += res when ``accumulate`` (the
    column pass after the row pass)."""
    ptrs = ptr + seq_off + offs_c[:, None] * sC + offs_p[None, :] * s_pos
    mask = mask_c[:, None] & mask_p[None, :]
    res += tl.load(ptrs, mask=mask & (accumulate != 0), other=0.0).to(ACC)
    tl.store(ptrs, res.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- forward
# RESIDENT (bfloat16/float16 and "tf32" dots): every kernel body holds its program's own
# tile of positions of one sequence, all C channels (BLOCK_C = next power of two >= C), in
# registers for the whole loop, so the logits' contraction over channels is one dot per
# step, and each step loads only the other side's tile (k or q, and v or g): half the loads
# of a channel-chunked contraction, and plain "load, dot" steps that Triton pipelines.
# Otherwise ("ieee" and "tf32x3", whose split operands would not fit) the logits are
# contracted over chunks of BLOCK_CK channels, both sides loaded per chunk.


@triton.jit
def _stats_body(qp, kp, part, local, C, H, W, sB, sC, sH, sW, PASS: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                ACC: tl.constexpr):
    b, L, s_pos, seq_off, offs_i, mask_i, rows = _tile_setup(local, H, W, sB, sH, sW, PASS, BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    q_blk = _resident(qp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC, False, RESIDENT)
    n_i = tl.sum(mask_i.to(ACC), axis=0)
    n = tl.full([], 0.0, ACC)
    mean = tl.full([], 0.0, ACC)
    m2 = tl.full([], 0.0, ACC)
    for j0 in range(0, L, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        mask_j = offs_j < L
        k_blk = _resident(kp, seq_off, offs_j, mask_j, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        S = _logits(q_blk, k_blk, qp, kp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK, BLOCK_CK,
                    RESIDENT, PRECISION, ACC)
        valid = mask_i[:, None] & mask_j[None, :]
        t_n = n_i * tl.sum(mask_j.to(ACC), axis=0)
        t_mean = tl.sum(tl.sum(tl.where(valid, S, 0.0), axis=1), axis=0) / t_n
        dev = tl.where(valid, S - t_mean, 0.0)
        t_m2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
        tot = n + t_n
        delta = t_mean - mean
        mean = mean + delta * (t_n / tot)
        m2 = m2 + t_m2 + delta * delta * (n * t_n / tot)
        n = tot
    tl.store(part, n)
    tl.store(part + 1, mean)
    tl.store(part + 2, m2)


@_sized_jit
def _axial_fwd_stats_kernel(q0, k0, q1, k1, part_ptr, C, H, W, sB, sC, sH, sW, n_row_progs, n_progs,
                            BLOCK_ROW: tl.constexpr, BLOCK_COL: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                            ACC: tl.constexpr):
    """Moments of the logits of one strip of rows: part = (n, mean, M2), row programs first.

    Tiles are merged with Chan's formula (mean and M2 about the mean, never the sum of
    squares minus the squared sum), so a large mean does not cancel the variance.
    """
    pid = tl.program_id(0)
    d = tl.program_id(1)
    part = part_ptr + (d * n_progs + pid) * 3
    if pid < n_row_progs:
        _stats_body(_pick(d, q0, q1), _pick(d, k0, k1), part, pid, C, H, W, sB, sC, sH, sW, 0, BLOCK_ROW, BLOCK_C,
                    BLOCK_CK, RESIDENT, PRECISION, ACC)
    else:
        _stats_body(_pick(d, q0, q1), _pick(d, k0, k1), part, pid - n_row_progs, C, H, W, sB, sC, sH, sW, 1,
                    BLOCK_COL, BLOCK_C, BLOCK_CK, RESIDENT, PRECISION, ACC)


@triton.jit
def _group_span(p, g, B, n_row_progs, per_row, per_col, sample):
    """Group g of pass p -> (its first partial, their count, programs per image): the
    partials of one image's programs are contiguous, row programs first (_geometry)."""
    per_image = per_row + p * (per_col - per_row)
    count = per_image * (sample + (1 - sample) * B)
    return p * n_row_progs + g * per_image, count, per_image


@triton.jit
def _group_range(pid, NG, B, n_row_progs, per_row, per_col, sample):
    """Program pid of a (direction, pass, group) grid -> direction and its partials' range."""
    start, count, _ = _group_span((pid // NG) % 2, pid % NG, B, n_row_progs, per_row, per_col, sample)
    return pid // (2 * NG), start, count


@triton.jit
def _merge_moments(base, count, eps, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """(mu, sigma = sqrt(M2 / (N - 1)) + eps, N) of ``count`` strip moments (n, mean, M2) at base."""
    tot_n = tl.zeros([BLOCK_P], dtype=ACC)
    tot_s = tl.zeros([BLOCK_P], dtype=ACC)
    for i0 in range(0, count, BLOCK_P):
        offs = i0 + tl.arange(0, BLOCK_P)
        m = offs < count
        cnt = tl.load(base + offs * 3, mask=m, other=0.0)
        mu = tl.load(base + offs * 3 + 1, mask=m, other=0.0)
        tot_n += cnt
        tot_s += cnt * mu
    n = tl.sum(tot_n, axis=0)
    mean = tl.sum(tot_s, axis=0) / n
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for i0 in range(0, count, BLOCK_P):
        offs = i0 + tl.arange(0, BLOCK_P)
        m = offs < count
        cnt = tl.load(base + offs * 3, mask=m, other=0.0)
        mu = tl.load(base + offs * 3 + 1, mask=m, other=0.0)
        m2 = tl.load(base + offs * 3 + 2, mask=m, other=0.0)
        acc += m2 + cnt * (mu - mean) * (mu - mean)
    std = tl.sqrt(tl.sum(acc, axis=0) / (n - 1.0))
    return mean, std + eps, n


@triton.jit
def _own_group(local, b, B, sample, n_row_progs, per_row, per_col, PASS: tl.constexpr):
    """The group of image b in pass PASS -> (group g, its first partial, their count, whether
    program ``local`` is the group's first)."""
    g = b * sample
    start, count, per_image = _group_span(PASS, g, B, n_row_progs, per_row, per_col, sample)
    return g, start, count, local == g * per_image


@_sized_jit
def _axial_fwd_sigma_kernel(part_ptr, stats_ptr, NG, B, n_row_progs, n_progs, per_row, per_col, eps, sample,
                            BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """Merge the strip moments of one group: stats = (mu, sigma, N)."""
    pid = tl.program_id(0)
    d, start, count = _group_range(pid, NG, B, n_row_progs, per_row, per_col, sample)
    mean, sigma, n = _merge_moments(part_ptr + (d * n_progs + start) * 3, count, eps, BLOCK_P, ACC)
    tl.store(stats_ptr + pid * 3, mean)
    tl.store(stats_ptr + pid * 3 + 1, sigma)
    tl.store(stats_ptr + pid * 3 + 2, n)


@triton.jit
def _lse_body(qp, kp, stats, lse_ptr, local, C, H, W, sB, sC, sH, sW, sample,
              PASS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CK: tl.constexpr,
              RESIDENT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    b, L, s_pos, seq_off, offs_i, mask_i, rows = _tile_setup(local, H, W, sB, sH, sW, PASS, BLOCK)
    inv_sigma = 1.0 / tl.load(stats + (b * sample) * 3 + 1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    q_blk = _resident(qp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC, False, RESIDENT)
    m_i = tl.full([BLOCK], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK], dtype=ACC)
    for j0 in range(0, L, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        mask_j = offs_j < L
        k_blk = _resident(kp, seq_off, offs_j, mask_j, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        S = _logits(q_blk, k_blk, qp, kp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK, BLOCK_CK,
                    RESIDENT, PRECISION, ACC)
        z = tl.where(mask_j[None, :], S * inv_sigma, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows + offs_i, m_i + tl.log(l_i), mask=mask_i)


@_sized_jit
def _axial_fwd_lse_kernel(q0, k0, q1, k1, stats_ptr, lse_ptr, B, C, H, W, sB, sC, sH, sW, NG,
                          n_row_progs, sample, BLOCK_ROW: tl.constexpr, BLOCK_COL: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr,
                          PRECISION: tl.constexpr, ACC: tl.constexpr):
    """lse[i] = logsumexp_j S[i, j] / sigma for one strip of rows (online over j tiles)."""
    pid = tl.program_id(0)
    d = tl.program_id(1)
    if pid < n_row_progs:
        _lse_body(_pick(d, q0, q1), _pick(d, k0, k1), stats_ptr + (d * 2) * NG * 3,
                  lse_ptr + (d * 2).to(tl.int64) * B * H * W, pid, C, H, W, sB, sC, sH, sW, sample, 0, BLOCK_ROW,
                  BLOCK_C, BLOCK_CK, RESIDENT, PRECISION, ACC)
    else:
        _lse_body(_pick(d, q0, q1), _pick(d, k0, k1), stats_ptr + (d * 2 + 1) * NG * 3,
                  lse_ptr + (d * 2 + 1).to(tl.int64) * B * H * W, pid - n_row_progs, C, H, W, sB, sC, sH, sW,
                  sample, 1, BLOCK_COL, BLOCK_C, BLOCK_CK, RESIDENT, PRECISION, ACC)


@_sized_jit
def _axial_fwd_out_kernel(q0, k0, v0, o0, q1, k1, v1, o1, stats_ptr, lse_ptr, B, C, H, W, sB, sC, sH, sW, NG, sample,
                          accumulate, PASS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                          ACC: tl.constexpr):
    """out[c, j] (+)= 0.5 sum_i v[c, i] exp(S[i, j] / sigma - lse[i]) for one strip of columns j."""
    d = tl.program_id(1)
    kp = _pick(d, k0, k1)
    b, L, s_pos, seq_off, offs_j, mask_j, rows = _tile_setup(tl.program_id(0), H, W, sB, sH, sW, PASS, BLOCK)
    inv_sigma = 1.0 / tl.load(stats_ptr + ((d * 2 + PASS) * NG + b * sample) * 3 + 1)
    lse_base = lse_ptr + (d * 2 + PASS).to(tl.int64) * B * H * W + rows
    qp = _pick(d, q0, q1)
    vp = _pick(d, v0, v1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    k_blk = _resident(kp, seq_off, offs_j, mask_j, offs_c, mask_c, s_pos, sC, True, RESIDENT)
    acc = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
    for i0 in range(0, L, BLOCK):
        offs_i = i0 + tl.arange(0, BLOCK)
        mask_i = offs_i < L
        q_blk = _resident(qp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC, False, RESIDENT)
        S = _logits(q_blk, k_blk, qp, kp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK, BLOCK_CK,
                    RESIDENT, PRECISION, ACC)
        lse = tl.load(lse_base + offs_i, mask=mask_i, other=0.0)
        a = tl.where(mask_i[:, None], tl.exp(S * inv_sigma - lse[:, None]), 0.0)
        v_blk = _by_channel(vp, seq_off, offs_c, mask_c, offs_i, mask_i, s_pos, sC)
        acc = _dot(v_blk, a.to(v_blk.dtype), acc, PRECISION)
    _store_channels(_pick(d, o0, o1), seq_off, offs_c, mask_c, offs_j, mask_j, sC, s_pos, 0.5 * acc, accumulate, ACC)


@_sized_jit
def _axial_fwd_single_kernel(q0, k0, v0, o0, q1, k1, v1, o1, part_ptr, stats_ptr, lse_ptr, B, C, H, W, sB, sC, sH, sW,
                             NG, n_row_progs, n_progs, per_row, per_col, eps, sample, accumulate, PASS: tl.constexpr,
                             BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CK: tl.constexpr,
                             BLOCK_P: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                             ACC: tl.constexpr):
    """Sequences of one tile (L <= BLOCK), one per program: the sigma, lse and out kernels in one.

    Every program merges its group's strip moments itself (the group's first program stores
    them for the backward), and with all of j in its tile it needs no online logsumexp: S is
    contracted once for lse and out (3 products in the forward instead of 4, and 3 launches
    instead of 5).
    """
    d = tl.program_id(1)
    local = tl.program_id(0)
    b, L, s_pos, seq_off, offs_t, mask_t, rows = _tile_setup(local, H, W, sB, sH, sW, PASS, BLOCK)
    g, start, count, first = _own_group(local, b, B, sample, n_row_progs, per_row, per_col, PASS)
    mu, sigma, n = _merge_moments(part_ptr + (d * n_progs + start) * 3, count, eps, BLOCK_P, ACC)
    if first:
        st = stats_ptr + ((d * 2 + PASS) * NG + g) * 3
        tl.store(st, mu)
        tl.store(st + 1, sigma)
        tl.store(st + 2, n)
    qp = _pick(d, q0, q1)
    kp = _pick(d, k0, k1)
    vp = _pick(d, v0, v1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    q_blk = _resident(qp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, False, RESIDENT)
    k_blk = _resident(kp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, True, RESIDENT)
    S = _logits(q_blk, k_blk, qp, kp, seq_off, offs_t, mask_t, offs_t, mask_t, C, sC, s_pos, BLOCK, BLOCK_CK,
                RESIDENT, PRECISION, ACC)
    z = tl.where(mask_t[None, :], S * (1.0 / sigma), float("-inf"))
    m_i = tl.max(z, axis=1)
    e = tl.exp(z - m_i[:, None])
    l_i = tl.sum(e, axis=1)
    tl.store(lse_ptr + (d * 2 + PASS).to(tl.int64) * B * H * W + rows + offs_t, m_i + tl.log(l_i), mask=mask_t)
    a = tl.where(mask_t[:, None], e / l_i[:, None], 0.0)
    v_blk = _by_channel(vp, seq_off, offs_c, mask_c, offs_t, mask_t, s_pos, sC)
    acc = _dot(v_blk, a.to(v_blk.dtype), tl.zeros([BLOCK_C, BLOCK], dtype=ACC), PRECISION)
    _store_channels(_pick(d, o0, o1), seq_off, offs_c, mask_c, offs_t, mask_t, sC, s_pos, 0.5 * acc, accumulate, ACC)


# ----------------------------------------------------------------------------- backward


@_sized_jit
def _axial_bwd_dv_kernel(q0, k0, v0, g0, dv0, q1, k1, v1, g1, dv1, stats_ptr, lse_ptr, drow_ptr, dpart_ptr,
                         pid_offset, B, C, H, W, sB, sC, sH, sW, NG, n_progs, sample, accumulate, need_v,
                         PASS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                         ACC: tl.constexpr):
    """For one strip of rows i: dv[c, i] (+)= sum_j A g[c, j], D[i], and sum_i (E[i] - D[i] F[i])."""
    d = tl.program_id(1)
    local = tl.program_id(0)
    b, L, s_pos, seq_off, offs_i, mask_i, rows = _tile_setup(local, H, W, sB, sH, sW, PASS, BLOCK)
    st = stats_ptr + ((d * 2 + PASS) * NG + b * sample) * 3
    mu = tl.load(st)
    inv_sigma = 1.0 / tl.load(st + 1)
    row_ptrs = (d * 2 + PASS).to(tl.int64) * B * H * W + rows + offs_i
    lse = tl.load(lse_ptr + row_ptrs, mask=mask_i, other=0.0)
    qp, kp, vp, gp = _operands(d, q0, k0, v0, g0, q1, k1, v1, g1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    q_blk = _resident(qp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC, False, RESIDENT)
    vt_blk = _resident(vp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC, False, RESIDENT)
    acc = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
    d_i = tl.zeros([BLOCK], dtype=ACC)
    e_i = tl.zeros([BLOCK], dtype=ACC)
    f_i = tl.zeros([BLOCK], dtype=ACC)
    for j0 in range(0, L, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        mask_j = offs_j < L
        k_blk = _resident(kp, seq_off, offs_j, mask_j, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        g_blk = _by_channel(gp, seq_off, offs_c, mask_c, offs_j, mask_j, s_pos, sC)
        S = _logits(q_blk, k_blk, qp, kp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK, BLOCK_CK,
                    RESIDENT, PRECISION, ACC)
        valid = mask_i[:, None] & mask_j[None, :]
        a = tl.where(valid, tl.exp(S * inv_sigma - lse[:, None]), 0.0)
        da = 0.5 * _logits(vt_blk, g_blk, vp, gp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK,
                           BLOCK_CK, RESIDENT, PRECISION, ACC)
        ada = a * da
        sc = S - mu
        d_i += tl.sum(ada, axis=1)
        e_i += tl.sum(ada * sc, axis=1)
        f_i += tl.sum(a * sc, axis=1)
        acc = _dot(g_blk, tl.trans(a).to(g_blk.dtype), acc, PRECISION)
    tl.store(drow_ptr + row_ptrs, d_i, mask=mask_i)
    tl.store(dpart_ptr + d * n_progs + pid_offset + local, tl.sum(e_i - d_i * f_i, axis=0))
    _store_channels(_pick(d, dv0, dv1), seq_off, offs_c, mask_c & (((need_v >> d) & 1) != 0), offs_i, mask_i, sC,
                    s_pos, 0.5 * acc, accumulate, ACC)


@triton.jit
def _omega(base, count, sigma, n, eps, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """omega = dsigma / ((N - 1) (sigma - eps)), dsigma = -sum_group (E - D F) / sigma^2, from the
    ``count`` per-program sums of (E - D F) at base."""
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for i0 in range(0, count, BLOCK_P):
        offs = i0 + tl.arange(0, BLOCK_P)
        acc += tl.load(base + offs, mask=offs < count, other=0.0)
    dsigma = -tl.sum(acc, axis=0) / (sigma * sigma)
    return dsigma / ((n - 1.0) * (sigma - eps))


@_sized_jit
def _axial_bwd_omega_kernel(dpart_ptr, stats_ptr, omega_ptr, NG, B, n_row_progs, n_progs, per_row, per_col, eps,
                            sample, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """omega of one group (see _omega)."""
    pid = tl.program_id(0)
    d, start, count = _group_range(pid, NG, B, n_row_progs, per_row, per_col, sample)
    sigma = tl.load(stats_ptr + pid * 3 + 1)
    n = tl.load(stats_ptr + pid * 3 + 2)
    tl.store(omega_ptr + pid, _omega(dpart_ptr + d * n_progs + start, count, sigma, n, eps, BLOCK_P, ACC))


@triton.jit
def _logit_grad_tile(q_blk, k_blk, vt_blk, g_blk, qp, kp, vp, gp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos,
                     lse, d_i, mu, inv_sigma, omega, BLOCK: tl.constexpr, BLOCK_CK: tl.constexpr,
                     RESIDENT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dS[i, j] = A (dA - D[i]) / sigma + omega (S - mu), zero outside the sequence."""
    S = _logits(q_blk, k_blk, qp, kp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK, BLOCK_CK,
                RESIDENT, PRECISION, ACC)
    a = tl.exp(S * inv_sigma - lse[:, None])
    da = 0.5 * _logits(vt_blk, g_blk, vp, gp, seq_off, offs_i, mask_i, offs_j, mask_j, C, sC, s_pos, BLOCK,
                       BLOCK_CK, RESIDENT, PRECISION, ACC)
    ds = a * (da - d_i[:, None]) * inv_sigma + omega * (S - mu)
    return tl.where(mask_i[:, None] & mask_j[None, :], ds, 0.0)


@_sized_jit
def _axial_bwd_dqk_kernel(q0, k0, v0, g0, dq0, dk0, q1, k1, v1, g1, dq1, dk1,
                          stats_ptr, omega_ptr, lse_ptr, drow_ptr, B, C, H, W, sB, sC, sH, sW, NG, sample,
                          accumulate, need_q, need_k, IS_DK: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_CK: tl.constexpr, RESIDENT: tl.constexpr,
                          PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dq[c, i] (+)= sum_j dS[i, j] k[c, j] for a strip of rows i, or with IS_DK
    dk[c, j] (+)= sum_i dS[i, j] q[c, i] for a strip of columns j. dq and dk are separate
    launches, each compiled for one of them: one kernel holding both bodies needs the
    registers of both loops at once and spills more (epban.testing.kernel_resources).

    need_q, need_k: bit d set when direction d's dq (dk) is wanted; the other direction's
    programs skip their loop and store nothing (a loss through one input of each direction
    halves the work).
    """
    d = tl.program_id(1)
    qp, kp, vp, gp = _operands(d, q0, k0, v0, g0, q1, k1, v1, g1)
    if IS_DK:
        outp = _pick(d, dk0, dk1)
        need = (need_k >> d) & 1
    else:
        outp = _pick(d, dq0, dq1)
        need = (need_q >> d) & 1
    b, L, s_pos, seq_off, offs_t, mask_t, rows = _tile_setup(tl.program_id(0), H, W, sB, sH, sW, PASS, BLOCK)
    st = (d * 2 + PASS) * NG + b * sample
    mu = tl.load(stats_ptr + st * 3)
    inv_sigma = 1.0 / tl.load(stats_ptr + st * 3 + 1)
    omega = tl.load(omega_ptr + st)
    row_base = (d * 2 + PASS).to(tl.int64) * B * H * W + rows
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
    if IS_DK:
        k_blk = _resident(kp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        g_blk = _resident(gp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        for i0 in range(0, L * need, BLOCK):
            offs_i = i0 + tl.arange(0, BLOCK)
            mask_i = offs_i < L
            lse = tl.load(lse_ptr + row_base + offs_i, mask=mask_i, other=0.0)
            d_i = tl.load(drow_ptr + row_base + offs_i, mask=mask_i, other=0.0)
            q_blk = _by_position(qp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC)
            vt_blk = _resident(vp, seq_off, offs_i, mask_i, offs_c, mask_c, s_pos, sC, False, RESIDENT)
            ds = _logit_grad_tile(q_blk, k_blk, vt_blk, g_blk, qp, kp, vp, gp, seq_off, offs_i, mask_i, offs_t, mask_t,
                                  C, sC, s_pos, lse, d_i, mu, inv_sigma, omega, BLOCK, BLOCK_CK, RESIDENT, PRECISION,
                                  ACC)
            acc = _dot(tl.trans(q_blk), ds.to(q_blk.dtype), acc, PRECISION)
    else:
        lse = tl.load(lse_ptr + row_base + offs_t, mask=mask_t, other=0.0)
        d_i = tl.load(drow_ptr + row_base + offs_t, mask=mask_t, other=0.0)
        q_blk = _resident(qp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, False, RESIDENT)
        vt_blk = _resident(vp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, False, RESIDENT)
        for j0 in range(0, L * need, BLOCK):
            offs_j = j0 + tl.arange(0, BLOCK)
            mask_j = offs_j < L
            k_blk = _by_channel(kp, seq_off, offs_c, mask_c, offs_j, mask_j, s_pos, sC)
            g_blk = _resident(gp, seq_off, offs_j, mask_j, offs_c, mask_c, s_pos, sC, True, RESIDENT)
            ds = _logit_grad_tile(q_blk, k_blk, vt_blk, g_blk, qp, kp, vp, gp, seq_off, offs_t, mask_t, offs_j, mask_j,
                                  C, sC, s_pos, lse, d_i, mu, inv_sigma, omega, BLOCK, BLOCK_CK, RESIDENT, PRECISION,
                                  ACC)
            acc = _dot(k_blk, tl.trans(ds).to(k_blk.dtype), acc, PRECISION)
    _store_channels(outp, seq_off, offs_c, mask_c & (need != 0), offs_t, mask_t, sC, s_pos, acc, accumulate, ACC)


@_sized_jit
def _axial_bwd_single_dqk_kernel(q0, k0, v0, g0, dq0, dk0, q1, k1, v1, g1, dq1, dk1, stats_ptr, lse_ptr, drow_ptr,
                                 dpart_ptr, B, C, H, W, sB, sC, sH, sW, NG, n_row_progs, n_progs, per_row, per_col,
                                 eps, sample, accumulate, need_q, need_k, PASS: tl.constexpr, BLOCK: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_P: tl.constexpr,
                                 RESIDENT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Sequences of one tile (L <= BLOCK), one per program: the omega, dq and dk kernels in one.

    The program sums its group's (E - D F) partials itself, contracts S and dA once, and
    takes both dq[c, i] = sum_j dS[i, j] k[c, j] and dk[c, j] = sum_i dS[i, j] q[c, i] from
    that dS (4 products instead of 6; one launch per pass instead of omega + 2 per pass).
    A direction that wants neither gradient does nothing; one that wants one skips the other's dot.
    """
    d = tl.program_id(1)
    local = tl.program_id(0)
    want_q = (need_q >> d) & 1
    want_k = (need_k >> d) & 1
    if (want_q | want_k) != 0:
        b, L, s_pos, seq_off, offs_t, mask_t, rows = _tile_setup(local, H, W, sB, sH, sW, PASS, BLOCK)
        g, start, count, _ = _own_group(local, b, B, sample, n_row_progs, per_row, per_col, PASS)
        st = stats_ptr + ((d * 2 + PASS) * NG + g) * 3
        mu = tl.load(st)
        sigma = tl.load(st + 1)
        omega = _omega(dpart_ptr + d * n_progs + start, count, sigma, tl.load(st + 2), eps, BLOCK_P, ACC)
        row_base = (d * 2 + PASS).to(tl.int64) * B * H * W + rows
        lse = tl.load(lse_ptr + row_base + offs_t, mask=mask_t, other=0.0)
        d_i = tl.load(drow_ptr + row_base + offs_t, mask=mask_t, other=0.0)
        qp, kp, vp, gp = _operands(d, q0, k0, v0, g0, q1, k1, v1, g1)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        q_blk = _resident(qp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, False, RESIDENT)
        k_blk = _resident(kp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        vt_blk = _resident(vp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, False, RESIDENT)
        g_blk = _resident(gp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, True, RESIDENT)
        ds = _logit_grad_tile(q_blk, k_blk, vt_blk, g_blk, qp, kp, vp, gp, seq_off, offs_t, mask_t, offs_t, mask_t,
                              C, sC, s_pos, lse, d_i, mu, 1.0 / sigma, omega, BLOCK, BLOCK_CK, RESIDENT, PRECISION,
                              ACC)
        zero = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
        # the chunked contraction loads whole q and k tiles only now, after dS: live across
        # its loop they would spill
        if want_q != 0:
            k_all = _whole(k_blk, kp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, True, RESIDENT)
            dq = _dot(k_all, tl.trans(ds).to(k_all.dtype), zero, PRECISION)
            _store_channels(_pick(d, dq0, dq1), seq_off, offs_c, mask_c, offs_t, mask_t, sC, s_pos, dq, accumulate,
                            ACC)
        if want_k != 0:
            q_all = _whole(q_blk, qp, seq_off, offs_t, mask_t, offs_c, mask_c, s_pos, sC, False, RESIDENT)
            dk = _dot(tl.trans(q_all), ds.to(q_all.dtype), zero, PRECISION)
            _store_channels(_pick(d, dk0, dk1), seq_off, offs_c, mask_c, offs_t, mask_t, sC, s_pos, dk, accumulate,
                            ACC)
