"""Bi-directional axial attention of Efficient-PBAN: the reference, the fused op and the dispatch.

axial(q, k, v) = 0.5 * (row + col) for q, k, v of shape (B, C, H, W).
Row pass (one sequence along W per (b, h)):

    S[b,h,i,j]   = sum_c q[b,c,h,i] k[b,c,h,j]           (no 1/sqrt(C))
    sigma        = std(S, unbiased) + 1e-6                (per image, or over the whole batch)
    A[b,h,i,j]   = softmax_j(S[b,h,i,:] / sigma)
    row[b,c,h,j] = sum_i v[b,c,h,i] A[b,h,i,j]            (contracts the axis the softmax did NOT normalise)

The column pass is the same with H and W exchanged, with its own sigma.
``sigma_scope="batch"`` is the authors' whole-batch std (an image's output depends on its
batch-mates); ``"sample"`` (default) takes one std per image.

The fused path is the custom op ``epban::axial_attention`` (its backward is the custom op
``epban::axial_attention_backward``): the Triton kernels of ``epban.kernels.axial_attention``,
launched by ``axial_forward`` and ``axial_backward`` below, one or two directions per call
(``bi_axial_attention`` puts both directions of the block into the same launches).
``torch.compile`` traces it as one node. ``backend="fused"`` takes it, ``"auto"`` on CUDA where
it beats the reference (``_auto_takes_fused``). Under ``TRITON_INTERPRET=1`` it also runs on CPU
tensors (slowly: for tests). A failure of the kernels raises; nothing falls back silently.
"""
from __future__ import annotations

from typing import List

import torch

from epban import settings
from epban._extension import check_backend
from epban.ops._checks import cdiv, check_nchw_float, is_channels_last, memory_format, next_power_of_2
from epban.ops.registry import register, triton_auto_ok, triton_unavailable_reason, use_fused

SIGMA_SCOPES = ("sample", "batch")
SIGMA_EPS = 1e-6


# ----------------------------------------------------------------------------- reference


def _axial_pass_reference(q, k, v, sigma_scope):
    """One pass along the last axis: sequences of length W, one per (b, h)."""
    logits = torch.einsum("bchi,bchj->bhij", q, k)
    if sigma_scope == "batch":
        sigma = logits.std() + SIGMA_EPS
    else:
        sigma = logits.flatten(1).std(dim=1).view(-1, 1, 1, 1) + SIGMA_EPS
    attn = torch.softmax(logits / sigma, dim=-1)
    return torch.einsum("bchi,bhij->bchj", v, attn)


def axial_attention_reference(q, k, v, *, sigma_scope="sample"):
    row = _axial_pass_reference(q, k, v, sigma_scope)
    col = _axial_pass_reference(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), sigma_scope)
    return 0.5 * (row + col.transpose(2, 3))


def check_axial_args(q, k, v, sigma_scope) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_nchw_float(name, t)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if sigma_scope not in SIGMA_SCOPES:
        raise ValueError(f"sigma_scope must be one of {SIGMA_SCOPES}, got {sigma_scope!r}")


# ----------------------------------------------------------------------------- which path serves

# backend="auto" on CUDA takes the fused kernels only where they beat the reference. Their cost
# grows with B*H*W*(H+W) (every query against every key of its row and column), while the
# reference's cuBLAS path is launch-bound up to large maps: float32 (channel-chunked tiles) wins
# up to this much work; half-precision channels_last maps (resident tiles) win at every size
# (docs/performance.md).
AUTO_FUSED_MAX_WORK = 1 << 20


def _auto_takes_fused(t: torch.Tensor) -> bool:
    """The ``auto`` rule: CUDA, and a map where the kernels win (see AUTO_FUSED_MAX_WORK)."""
    if not triton_auto_ok(t.device):
        return False
    if t.dtype in (torch.float16, torch.bfloat16) and t.is_contiguous(memory_format=torch.channels_last):
        return True
    b, _, h, w = t.shape
    return b * h * w * (h + w) <= AUTO_FUSED_MAX_WORK


def _unavailable_reason(device, dtype=None) -> str | None:
    return triton_unavailable_reason(
        "fused axial attention", device, dtype, interpreter_also=(torch.float64,),
        interpreter_refuses={torch.bfloat16: "the Triton interpreter computes wrong bfloat16 dots; "
                                             "use float32, float64 or float16 on CPU"})


def fused_axial_available(device, dtype=None) -> bool:
    """Whether the fused path can serve ``dtype`` tensors on ``device`` (CUDA with Triton; CPU
    under TRITON_INTERPRET=1): what ``backend="fused"`` needs."""
    return _unavailable_reason(device, dtype) is None


def fused_axial_attention_serves(t: torch.Tensor, backend: str = "auto") -> bool:
    """Whether ``backend`` takes the fused kernels for tensors like ``t`` (the registry's rule)."""
    return use_fused(backend, _unavailable_reason(t.device, t.dtype), auto_ok=_auto_takes_fused(t))


def _auto_backend(device) -> str:
    device = torch.device(device)
    return "fused" if triton_auto_ok(device) and fused_axial_available(device, torch.float32) else "reference"


register("axial_attention", kernels="Triton", auto_backend=_auto_backend)


def _fp32_precision(device) -> str:
    """float32 dots of the kernels: "tf32x3" on CUDA (three TF32 tensor-core products, float32
    accuracy), "ieee" (plain fp32 FMAs) under the CPU interpreter; EPBAN_FP32_PRECISION overrides
    ("tf32": ~1e-3 relative, and the resident whole-C tiles)."""
    return settings.fp32_precision("tf32x3" if torch.device(device).type == "cuda" else "ieee")


# ----------------------------------------------------------------------------- public functions


def axial_attention(q, k, v, *, sigma_scope="sample", backend="auto"):
    """axial(q, k, v) of docs/architecture.md, both passes averaged; (B, C, H, W) -> (B, C, H, W).

    backend: "auto" (the fused kernels on CUDA when Triton is available and the maps are
    small enough for them to win, see ``AUTO_FUSED_MAX_WORK``; else the reference),
    "reference", or "fused" (ValueError when it cannot serve these tensors).
    """
    check_backend(backend)
    check_axial_args(q, k, v, sigma_scope)
    if fused_axial_attention_serves(q, backend):
        return fused_axial_attention(q, k, v, sigma_scope=sigma_scope)[0]
    return axial_attention_reference(q, k, v, sigma_scope=sigma_scope)


def bi_axial_attention(q1, k1, v1, q2, k2, v2, *, sigma_scope="sample", backend="auto"):
    """The two directions of the block: (axial(q1, k2, v1), axial(q2, k1, v2)).

    On the fused path both directions share every kernel launch.
    """
    check_backend(backend)
    check_axial_args(q1, k2, v1, sigma_scope)
    check_axial_args(q2, k1, v2, sigma_scope)
    if q1.shape == q2.shape and q1.device == q2.device and fused_axial_attention_serves(q1, backend):
        return fused_axial_attention(q1, k2, v1, q2, k1, v2, sigma_scope=sigma_scope)
    return (axial_attention(q1, k2, v1, sigma_scope=sigma_scope, backend=backend),
            axial_attention(q2, k1, v2, sigma_scope=sigma_scope, backend=backend))


def fused_axial_attention(*qkv, sigma_scope="sample", precision=None) -> tuple:
    """(axial(q_d, k_d, v_d) for each direction d) of qkv = (q, k, v) or (q1, k1, v1, q2, k2, v2)
    through the custom op, without dispatch: tensors of one shape, device and dtype.
    ``precision``: the float32 dots (default ``_fp32_precision``). Inputs that are all
    channels_last are read as they are and give channels_last outputs; anything else is made
    contiguous NCHW."""
    if len(qkv) not in (3, 6):
        raise ValueError(f"fused_axial_attention takes 3 or 6 tensors, got {len(qkv)}")
    if len({t.dtype for t in qkv}) != 1:
        raise ValueError(f"the fused kernels need one dtype for all inputs, got {[t.dtype for t in qkv]}")
    precision = precision or _fp32_precision(qkv[0].device)
    if precision not in settings.FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {settings.FP32_PRECISIONS}, got {precision!r}")
    fmt = memory_format(all(is_channels_last(t) for t in qkv))
    outs = _axial_op([t.contiguous(memory_format=fmt) for t in qkv], sigma_scope, precision)
    return tuple(outs[:len(qkv) // 3])


# ----------------------------------------------------------------------------- the custom op


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation and statistics dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("epban::axial_attention", mutates_args=())
def _axial_op(qkv: List[torch.Tensor], sigma_scope: str, precision: str) -> List[torch.Tensor]:
    """[out_d for each direction d, lse, stats] of qkv = (q_0, k_0, v_0[, q_1, k_1, v_1]), all of
    one shape and dtype, all contiguous NCHW or all channels_last. lse (per row) and stats
    (per group: mu, sigma, N) are the state the backward needs."""
    outs, lse, stats = axial_forward(qkv[0::3], qkv[1::3], qkv[2::3], sigma_scope, precision=precision)
    return [*outs, lse, stats]


@_axial_op.register_fake
def _(qkv, sigma_scope, precision):
    q = qkv[0]
    B, _, H, W = q.shape
    ndir, acc = len(qkv) // 3, _acc_dtype(q.dtype)
    groups = B if sigma_scope == "sample" else 1
    return [*(torch.empty_like(t) for t in qkv[0::3]), q.new_empty((ndir, 2, B * H * W), dtype=acc),
            q.new_empty((ndir, 2, groups, 3), dtype=acc)]


@torch.library.custom_op("epban::axial_attention_backward", mutates_args=())
def _axial_backward_op(qkv: List[torch.Tensor], grads: List[torch.Tensor], lse: torch.Tensor, stats: torch.Tensor,
                       sigma_scope: str, precision: str, needs: List[bool]) -> List[torch.Tensor]:
    """[dq_0, dk_0, dv_0, ...] for the upstream gradients ``grads`` (one per direction, in the
    inputs' layout). A gradient whose entry of ``needs`` is False is not computed: an empty
    tensor stands in its place."""
    ndir = len(grads)
    dqs, dks, dvs = axial_backward(qkv[0::3], qkv[1::3], qkv[2::3], grads, lse, stats, sigma_scope,
                                   precision=precision, needs=[tuple(needs[3 * d:3 * d + 3]) for d in range(ndir)])
    return [t if t is not None else qkv[0].new_empty(0) for d in range(ndir) for t in (dqs[d], dks[d], dvs[d])]


@_axial_backward_op.register_fake
def _(qkv, grads, lse, stats, sigma_scope, precision, needs):
    return [torch.empty_like(qkv[i - i % 3]) if need else qkv[0].new_empty(0) for i, need in enumerate(needs)]


def _setup_context(ctx, inputs, output):
    qkv, sigma_scope, precision = inputs
    ndir = len(qkv) // 3
    lse, stats = output[ndir], output[ndir + 1]
    ctx.mark_non_differentiable(lse, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*qkv, lse, stats)
    ctx.sigma_scope, ctx.precision, ctx.ndir = sigma_scope, precision, ndir


def _backward(ctx, grads):
    *qkv, lse, stats = ctx.saved_tensors
    fmt = memory_format(is_channels_last(qkv[0]))
    grads = [torch.zeros_like(q) if g is None else g.contiguous(memory_format=fmt)
             for g, q in zip(grads[:ctx.ndir], qkv[0::3])]
    needs = [bool(n) for n in ctx.needs_input_grad[0]]
    res = _axial_backward_op(qkv, grads, lse, stats, ctx.sigma_scope, ctx.precision, needs)
    return [r if need else None for r, need in zip(res, needs)], None, None


_axial_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- plans and launchers

# Tile configuration; tests and the GPU check override entries (the plan cache keys on them).
# block_row, block_col: positions per tile in the row and column passes (None: 64 for resident
# half-precision tiles, else 32); block_ck: channels per step of a chunked logits contraction;
# resident: hold whole-C tiles in registers (None: for bfloat16/float16 and "tf32" dots, with
# C <= 512); num_warps per program (4 below 128 channels); num_stages: software-pipelining depth
# of the loops (None: 1 for resident float32 tiles, else Triton's default); single_tile: the
# one-tile kernels where every sequence of both passes fits one tile (False: the general tile
# loops serve every shape).
CONFIG = dict(block_row=None, block_col=None, block_ck=32, resident=None, num_warps=8, num_stages=None,
              single_tile=True)

# The one-tile kernels merge their group's partials in every program: beyond this many per
# group (large batches under sigma_scope="batch") the separate merge launches are cheaper.
SINGLE_TILE_MAX_PARTIALS = 4096


class _Plan:
    """Grid geometry and tile configuration shared by the forward and backward launches."""

    def __init__(self, shape, dtype, sigma_scope, precision, config=None, channels_last=False):
        import triton.language as tl

        cfg = {**CONFIG, **(config or {})}
        B, C, H, W = shape
        self.B, self.C, self.H, self.W = B, C, H, W
        self.sample = int(sigma_scope == "sample")
        self.NG = B if self.sample else 1
        self.block_c = max(16, next_power_of_2(C))
        if precision not in settings.FP32_PRECISIONS:
            raise ValueError(f"precision must be one of {settings.FP32_PRECISIONS}, got {precision!r}")
        self.precision = precision if dtype == torch.float32 else "ieee"
        half = dtype in (torch.float16, torch.bfloat16)
        self.resident = cfg["resident"]
        if self.resident is None:
            self.resident = (half or self.precision == "tf32") and self.block_c <= 512
        # resident float32 tiles of 64 positions need more shared memory than an SM has on
        # some strides (epban.testing.kernel_resources)
        block = 64 if self.resident and half else 32
        self.block_row = max(16, min(cfg["block_row"] or block, next_power_of_2(W)))
        self.block_col = max(16, min(cfg["block_col"] or block, next_power_of_2(H)))
        self.block_ck = max(16, min(cfg["block_ck"], self.block_c))
        self.per_row = H * cdiv(W, self.block_row)
        self.per_col = W * cdiv(H, self.block_col)
        self.n_row = B * self.per_row
        self.n_col = B * self.per_col
        self.n_progs = self.n_row + self.n_col
        group_partials = max(self.per_row, self.per_col) * (1 if self.sample else B)
        self.single_tile = bool(cfg["single_tile"]) and W <= self.block_row and H <= self.block_col \
            and group_partials <= SINGLE_TILE_MAX_PARTIALS
        self.block_p = max(16, min(1024, next_power_of_2(group_partials)))
        self.acc_torch = _acc_dtype(dtype)
        self.acc = tl.float64 if dtype == torch.float64 else tl.float32
        self.num_warps = cfg["num_warps"] if self.block_c >= 128 else 4
        self.launch = dict(num_warps=self.num_warps)
        num_stages = cfg.get("num_stages")
        if num_stages is None and self.resident and dtype == torch.float32:
            num_stages = 1  # resident float32 tiles leave no registers for pipelining buffers
        if num_stages is not None:
            self.launch["num_stages"] = num_stages

    def passes(self):
        """(PASS, BLOCK, number of programs, first program id, accumulate) for the row then column pass."""
        return ((0, self.block_row, self.n_row, 0, 0), (1, self.block_col, self.n_col, self.n_row, 1))

    def both(self):
        return dict(BLOCK_ROW=self.block_row, BLOCK_COL=self.block_col, **self.tiles())

    def tiles(self):
        return dict(BLOCK_C=self.block_c, BLOCK_CK=self.block_ck, RESIDENT=self.resident, PRECISION=self.precision,
                    ACC=self.acc, **self.launch)


_PLANS: dict = {}


def _plan(shape, dtype, sigma_scope, precision, config=None, channels_last=False) -> _Plan:
    """The _Plan of these arguments, built once (it is host time on every call otherwise)."""
    key = (tuple(shape), dtype, sigma_scope, precision, tuple(sorted({**CONFIG, **(config or {})}.items())),
           channels_last)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(shape, dtype, sigma_scope, precision, config, channels_last)
    return plan


def layout_strides(tensors, channels_last: bool) -> tuple:
    """(sB, sC, sH, sW) of every tensor of a call: all contiguous NCHW, or all channels_last.
    ValueError otherwise (fused_axial_attention converts before calling)."""
    fmt = memory_format(channels_last)
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape or not t.is_contiguous(memory_format=fmt):
            raise ValueError("the fused axial kernels need tensors of one shape, all contiguous NCHW or all "
                             f"channels_last; got {tuple(t.shape)} with strides {t.stride()}")
    B, C, H, W = shape
    return (H * W * C, 1, W * C, C) if channels_last else (C * H * W, H * W, W, 1)


def _pair(ts):
    return (ts[0], ts[-1])


def axial_forward(qs, ks, vs, sigma_scope, *, precision="ieee", outs=None, config=None):
    """Run axial(qs[d], ks[d], vs[d]) for one or two directions d (same shape, dtype, device).

    Inputs must all be contiguous NCHW or all channels_last (the outputs are made in the
    same layout). ``outs`` (optional, in that layout) are overwritten entirely. ``config``
    overrides entries of ``CONFIG``. Returns (outs, lse, stats): the state the backward needs.
    """
    from epban.kernels import axial_attention as K

    channels_last = is_channels_last(qs[0])
    plan = _plan(qs[0].shape, qs[0].dtype, sigma_scope, precision, config, channels_last)
    ndir = len(qs)
    dev = qs[0].device
    if outs is None:
        outs = tuple(torch.empty_like(q) for q in qs)
    strides = layout_strides(list(qs) + list(ks) + list(vs) + list(outs), channels_last)
    part = torch.empty((ndir, plan.n_progs, 3), dtype=plan.acc_torch, device=dev)
    stats = torch.empty((ndir, 2, plan.NG, 3), dtype=plan.acc_torch, device=dev)
    lse = torch.empty((ndir, 2, plan.B * plan.H * plan.W), dtype=plan.acc_torch, device=dev)
    B, C, H, W = plan.B, plan.C, plan.H, plan.W
    q0, q1 = _pair(qs)
    k0, k1 = _pair(ks)
    v0, v1 = _pair(vs)
    o0, o1 = _pair(outs)
    K._axial_fwd_stats_kernel[(plan.n_progs, ndir)](
        q0, k0, q1, k1, part, C, H, W, *strides, plan.n_row, plan.n_progs, **plan.both())
    if plan.single_tile:
        for pass_, block, n, _, accumulate in plan.passes():
            K._axial_fwd_single_kernel[(n, ndir)](
                q0, k0, v0, o0, q1, k1, v1, o1, part, stats, lse, B, C, H, W, *strides, plan.NG, plan.n_row,
                plan.n_progs, plan.per_row, plan.per_col, SIGMA_EPS, plan.sample, accumulate,
                PASS=pass_, BLOCK=block, BLOCK_P=plan.block_p, **plan.tiles())
        return outs, lse, stats
    K._axial_fwd_sigma_kernel[(ndir * 2 * plan.NG,)](
        part, stats, plan.NG, B, plan.n_row, plan.n_progs, plan.per_row, plan.per_col, SIGMA_EPS, plan.sample,
        BLOCK_P=1024, ACC=plan.acc, num_warps=4)
    K._axial_fwd_lse_kernel[(plan.n_progs, ndir)](
        q0, k0, q1, k1, stats, lse, B, C, H, W, *strides, plan.NG, plan.n_row, plan.sample, **plan.both())
    for pass_, block, n, _, accumulate in plan.passes():
        K._axial_fwd_out_kernel[(n, ndir)](
            q0, k0, v0, o0, q1, k1, v1, o1, stats, lse, B, C, H, W, *strides, plan.NG, plan.sample, accumulate,
            PASS=pass_, BLOCK=block, **plan.tiles())
    return outs, lse, stats


def axial_backward(qs, ks, vs, grads, lse, stats, sigma_scope, *, precision="ieee", config=None, needs=None):
    """Gradients (dqs, dks, dvs) of axial_forward for the upstream gradients ``grads`` (in the
    inputs' layout; the gradients are made in it too).

    needs[d] = (dq wanted, dk wanted, dv wanted) for direction d (default: all); an unwanted
    gradient is returned as None and costs no work beyond what the others need.
    """
    from epban.kernels import axial_attention as K

    channels_last = is_channels_last(qs[0])
    plan = _plan(qs[0].shape, qs[0].dtype, sigma_scope, precision, config, channels_last)
    strides = layout_strides(list(qs) + list(ks) + list(vs) + list(grads), channels_last)
    ndir = len(qs)
    dev = qs[0].device
    needs = needs or [(True, True, True)] * ndir
    dqs = tuple(torch.empty_like(q) if needs[d][0] else None for d, q in enumerate(qs))
    dks = tuple(torch.empty_like(q) if needs[d][1] else None for d, q in enumerate(qs))
    dvs = tuple(torch.empty_like(q) if needs[d][2] else None for d, q in enumerate(qs))
    need_q, need_k, need_v = (sum(1 << d for d in range(ndir) if needs[d][r]) for r in range(3))
    drow = torch.empty_like(lse)
    dpart = torch.empty((ndir, plan.n_progs), dtype=plan.acc_torch, device=dev)
    B, C, H, W = plan.B, plan.C, plan.H, plan.W
    # an unwanted gradient's pointer is never written through: any tensor of the dtype will do
    dq0, dq1 = _pair([t if t is not None else q for t, q in zip(dqs, qs)])
    dk0, dk1 = _pair([t if t is not None else q for t, q in zip(dks, qs)])
    dv0, dv1 = _pair([t if t is not None else q for t, q in zip(dvs, qs)])
    q0, q1 = _pair(qs)
    k0, k1 = _pair(ks)
    v0, v1 = _pair(vs)
    g0, g1 = _pair(grads)
    tiles = plan.tiles()
    for pass_, block, n, first, accumulate in plan.passes():
        K._axial_bwd_dv_kernel[(n, ndir)](
            q0, k0, v0, g0, dv0, q1, k1, v1, g1, dv1, stats, lse, drow, dpart, first, B, C, H, W, *strides, plan.NG,
            plan.n_progs, plan.sample, accumulate, need_v, PASS=pass_, BLOCK=block, **tiles)
    if plan.single_tile:
        for pass_, block, n, _, accumulate in plan.passes() if need_q or need_k else ():
            K._axial_bwd_single_dqk_kernel[(n, ndir)](
                q0, k0, v0, g0, dq0, dk0, q1, k1, v1, g1, dq1, dk1, stats, lse, drow, dpart, B, C, H, W, *strides,
                plan.NG, plan.n_row, plan.n_progs, plan.per_row, plan.per_col, SIGMA_EPS, plan.sample, accumulate,
                need_q, need_k, PASS=pass_, BLOCK=block, BLOCK_P=plan.block_p, **tiles)
        return dqs, dks, dvs
    omega = torch.empty((ndir, 2, plan.NG), dtype=plan.acc_torch, device=dev)
    K._axial_bwd_omega_kernel[(ndir * 2 * plan.NG,)](
        dpart, stats, omega, plan.NG, B, plan.n_row, plan.n_progs, plan.per_row, plan.per_col, SIGMA_EPS,
        plan.sample, BLOCK_P=1024, ACC=plan.acc, num_warps=4)
    for pass_, block, n, _, accumulate in plan.passes():
        for is_dk, needed in ((False, need_q), (True, need_k)):
            if needed:
                K._axial_bwd_dqk_kernel[(n, ndir)](
                    q0, k0, v0, g0, dq0, dk0, q1, k1, v1, g1, dq1, dk1, stats, omega, lse, drow, B, C, H, W,
                    *strides, plan.NG, plan.sample, accumulate, need_q, need_k, IS_DK=is_dk, PASS=pass_,
                    BLOCK=block, **tiles)
    return dqs, dks, dvs
