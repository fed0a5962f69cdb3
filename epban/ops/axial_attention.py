"""Bi-directional axial attention of Efficient-PBAN: the reference and the dispatch.

axial(q, k, v) = 0.5 * (row + col) for q, k, v of shape (B, C, H, W).
Row pass (one sequence along W per (b, h)):

    S[b,h,i,j]   = sum_c q[b,c,h,i] k[b,c,h,j]           (no 1/sqrt(C))
    sigma        = std(S, unbiased) + 1e-6                (per image, or over the whole batch)
    A[b,h,i,j]   = softmax_j(S[b,h,i,:] / sigma)
    row[b,c,h,j] = sum_i v[b,c,h,i] A[b,h,i,j]            (contracts the axis the softmax did NOT normalise)

The column pass is the same with H and W exchanged, with its own sigma.
``sigma_scope="batch"`` is the authors' whole-batch std (an image's output depends on its
batch-mates); ``"sample"`` (default) takes one std per image.

The fused path (``backend="fused"``, and ``"auto"`` on CUDA for small maps, where it wins)
runs the Triton kernels of ``epban.kernels.axial_attention`` through ``_AxialFunction``;
``bi_axial_attention`` puts both directions of the block into the same launches. Under
``TRITON_INTERPRET=1`` the fused path also runs on CPU tensors (slowly: for tests).
"""
from __future__ import annotations

import os
import warnings

import torch

from epban._extension import check_backend
from epban.ops._checks import check_nchw_float, fused_requested, triton_unavailable_reason

SIGMA_SCOPES = ("sample", "batch")
SIGMA_EPS = 1e-6


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
        raise ValueError(f"q, k and v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if sigma_scope not in SIGMA_SCOPES:
        raise ValueError(f"sigma_scope must be one of {SIGMA_SCOPES}, got {sigma_scope!r}")


# float32 dots of the fused kernels: "ieee" (plain fp32 FMAs), "tf32x3" (three TF32 tensor-core
# products, float32 accuracy: 3.4e-7 relative L2 against float64 at 1x256x135x240 on an H100,
# where "ieee" gave 6.5e-7, at about half the time) or "tf32" (~1e-3, and the kernels' resident
# whole-C tiles: 9.0 ms against 22.8 for tf32x3 at 1x256x135x240 channels_last). Default:
# "tf32x3" on CUDA, "ieee" under the CPU interpreter. EPBAN_AXIAL_FP32_PRECISION overrides.
FP32_PRECISION = os.environ.get("EPBAN_AXIAL_FP32_PRECISION")

# backend="auto" on CUDA takes the fused kernels only where they beat the reference. Their
# cost grows with B*H*W*(H+W) (every query against every key of its row and column), while
# the reference's cuBLAS path is launch-bound (~4-5 ms fwd+bwd) up to large maps. Measured on
# an H100 (fwd+bwd, both directions, 2026-11-27): float32 (tf32x3, channel-chunked tiles)
# 16x16 maps x16 images 1.1 ms vs 5.4 ms, 64x64 1.5 vs 5.5, but 128x128 10.0 vs 4.2 and
# 135x240 30.6 vs 6.2; bfloat16 channels_last (resident tiles) wins at every size (3.1 ms at
# 135x240), so half-precision channels_last maps skip the work limit.
AUTO_FUSED_MAX_WORK = 1 << 20


def _fp32_precision(device: torch.device) -> str:
    if FP32_PRECISION:
        return FP32_PRECISION
    return "tf32x3" if device.type == "cuda" else "ieee"


def _fused_pays_off(t: torch.Tensor) -> bool:
    if t.dtype in (torch.float16, torch.bfloat16) and t.is_contiguous(memory_format=torch.channels_last):
        return True  # resident-tile kernels (see above)
    b, _, h, w = t.shape
    return b * h * w * (h + w) <= AUTO_FUSED_MAX_WORK


def _fused_unavailable_reason(device, dtype=None) -> str | None:
    """Why the fused kernels cannot serve tensors on ``device`` (None when they can)."""
    return triton_unavailable_reason(
        "fused axial attention", device, dtype, interpreter_also=(torch.float64,),
        interpreter_refuses={torch.bfloat16: "the Triton interpreter computes wrong bfloat16 dots; "
                                             "use float32, float64 or float16 on CPU"})


def fused_axial_available(device) -> bool:
    """Whether ``backend="fused"`` can run on ``device`` (CUDA with Triton; CPU under TRITON_INTERPRET=1)."""
    return _fused_unavailable_reason(device) is None


# (device, dtype) where the kernels failed to compile or launch under backend="auto"
_FUSED_FAILED: set = set()


def _use_fused(t: torch.Tensor, backend: str) -> bool:
    if backend == "auto" and t.device.type != "cuda":
        return False
    if not fused_requested(backend, _fused_unavailable_reason(t.device, t.dtype)):
        return False
    return backend == "fused" or ((str(t.device), t.dtype) not in _FUSED_FAILED and _fused_pays_off(t))


def _run_fused(t: torch.Tensor, backend: str, fused, reference):
    """``fused()``; under backend="auto" a failure of the kernels themselves (an old GPU, a
    Triton that cannot compile them) is reported once and the reference serves from then on."""
    if backend == "fused":
        return fused()
    try:
        return fused()
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # Triton's compile and launch errors have no common base class
        _FUSED_FAILED.add((str(t.device), t.dtype))
        warnings.warn(f"epban: fused axial attention failed on {t.device} ({t.dtype}), using the reference: "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
        return reference()


class _AxialFunction(torch.autograd.Function):
    """axial(q_d, k_d, v_d) for one or two directions d through the Triton kernels.

    Saves the inputs plus the per-row logsumexp and the per-group (mu, sigma, N): the
    backward recomputes the logits tile by tile instead of storing them.
    """

    @staticmethod
    def forward(ctx, sigma_scope, precision, *qkv):
        from epban.kernels import axial_attention as kernels

        ndir = len(qkv) // 3
        # The kernels read either layout through its strides: channels_last inputs (the loss
        # mode's) are read as they are and give channels_last outputs; anything else is made
        # contiguous NCHW.
        fmt = torch.channels_last if all(kernels.is_channels_last(t) for t in qkv) else torch.contiguous_format
        qkv = tuple(t.contiguous(memory_format=fmt) for t in qkv)
        qs, ks, vs = qkv[0::3], qkv[1::3], qkv[2::3]
        outs, lse, stats = kernels.axial_forward(qs, ks, vs, sigma_scope, precision=precision)
        ctx.save_for_backward(*qkv, lse, stats)
        ctx.sigma_scope, ctx.precision, ctx.ndir, ctx.fmt = sigma_scope, precision, ndir, fmt
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        from epban.kernels import axial_attention as kernels

        *qkv, lse, stats = ctx.saved_tensors
        qs, ks, vs = qkv[0::3], qkv[1::3], qkv[2::3]
        grads = tuple(torch.zeros_like(q) if g is None else g.contiguous(memory_format=ctx.fmt)
                      for g, q in zip(grad_outs, qs))
        wanted = ctx.needs_input_grad[2:]
        needs = [tuple(wanted[3 * d:3 * d + 3]) for d in range(ctx.ndir)]
        dqs, dks, dvs = kernels.axial_backward(qs, ks, vs, grads, lse, stats, ctx.sigma_scope,
                                               precision=ctx.precision, needs=needs)
        out = [None, None]
        for d in range(ctx.ndir):
            out += [dqs[d], dks[d], dvs[d]]
        return tuple(out)


def axial_attention_fused(q, k, v, *, sigma_scope="sample", precision=None):
    """axial(q, k, v) through the Triton kernels (no dispatch, no checks beyond the reference's)."""
    return _AxialFunction.apply(sigma_scope, precision or _fp32_precision(q.device), q, k, v)[0]


def axial_attention(q, k, v, *, sigma_scope="sample", backend="auto"):
    """axial(q, k, v) of ARCHITECTURE.md, both passes averaged; (B, C, H, W) -> (B, C, H, W).

    backend: "auto" (the fused kernels on CUDA when Triton is available and the maps are
    small enough for them to win, see ``AUTO_FUSED_MAX_WORK``; else the reference),
    "reference", or "fused" (ValueError when it cannot serve these tensors).
    """
    check_backend(backend)
    check_axial_args(q, k, v, sigma_scope)
    reference = lambda: axial_attention_reference(q, k, v, sigma_scope=sigma_scope)  # noqa: E731
    if _use_fused(q, backend):
        _check_same_dtype((q, k, v))
        return _run_fused(q, backend, lambda: axial_attention_fused(q, k, v, sigma_scope=sigma_scope), reference)
    return reference()


def _check_same_dtype(ts) -> None:
    if len({t.dtype for t in ts}) != 1:
        raise ValueError(f"the fused kernels need one dtype for all inputs, got {[t.dtype for t in ts]}")


def bi_axial_attention(q1, k1, v1, q2, k2, v2, *, sigma_scope="sample", backend="auto"):
    """The two directions of the block: (axial(q1, k2, v1), axial(q2, k1, v2)).

    On the fused path both directions share every kernel launch.
    """
    check_backend(backend)
    check_axial_args(q1, k2, v1, sigma_scope)
    check_axial_args(q2, k1, v2, sigma_scope)
    def separately():
        return (
            axial_attention(q1, k2, v1, sigma_scope=sigma_scope, backend=backend),
            axial_attention(q2, k1, v2, sigma_scope=sigma_scope, backend=backend),
        )

    same = q1.shape == q2.shape and q1.device == q2.device
    if same and _use_fused(q1, backend):
        _check_same_dtype((q1, k1, v1, q2, k2, v2))
        precision = _fp32_precision(q1.device)
        fused = lambda: _AxialFunction.apply(sigma_scope, precision, q1, k2, v1, q2, k1, v2)  # noqa: E731
        return _run_fused(q1, backend, fused, separately)
    return separately()
