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
"""
from __future__ import annotations

import torch

from epban._extension import check_backend

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
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if sigma_scope not in SIGMA_SCOPES:
        raise ValueError(f"sigma_scope must be one of {SIGMA_SCOPES}, got {sigma_scope!r}")


def axial_attention(q, k, v, *, sigma_scope="sample", backend="auto"):
    """axial(q, k, v) of ARCHITECTURE.md, both passes averaged; (B, C, H, W) -> (B, C, H, W)."""
    check_backend(backend)
    check_axial_args(q, k, v, sigma_scope)
    return axial_attention_reference(q, k, v, sigma_scope=sigma_scope)


def bi_axial_attention(q1, k1, v1, q2, k2, v2, *, sigma_scope="sample", backend="auto"):
    """The two directions of the block: (axial(q1, k2, v1), axial(q2, k1, v2))."""
    return (
        axial_attention(q1, k2, v1, sigma_scope=sigma_scope, backend=backend),
        axial_attention(q2, k1, v2, sigma_scope=sigma_scope, backend=backend),
    )
