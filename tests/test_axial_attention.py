"""Axial attention: the reference against a direct loop, its batch (in)dependence and
gradients, the custom op (opcheck, torch.compile), and the fused Triton kernels against the
reference.

Without a GPU the fused kernels run on CPU tensors under the Triton interpreter
(tests/conftest.py switches it on before anything imports Triton). With a GPU the
interpreter tests skip and the ``cuda`` tests run the compiled kernels.
"""
import math
import os

import pytest
import torch

from epban._extension import triton_available
from epban.ops import axial_attention as ops
from epban.ops.axial_attention import (
    axial_attention,
    axial_attention_reference,
    bi_axial_attention,
    fused_axial_available,
)
from epban.testing import poisoned_allocations

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _loop_axial(q, k, v, sigma_scope):
    """axial(q, k, v) written element by element, straight from docs/architecture.md."""
    B, C, H, W = q.shape

    def one_pass(n_seq, length, at):  # at(t, b, c, s, i): element i of sequence s
        logits = {}
        for b in range(B):
            for s in range(n_seq):
                for i in range(length):
                    for j in range(length):
                        logits[b, s, i, j] = sum(at(q, b, c, s, i) * at(k, b, c, s, j) for c in range(C))

        def std(values):
            mean = sum(values) / len(values)
            return math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))

        if sigma_scope == "batch":
            sigma = {b: std(list(logits.values())) + 1e-6 for b in range(B)}
        else:
            sigma = {b: std([x for key, x in logits.items() if key[0] == b]) + 1e-6 for b in range(B)}
        out = {}
        for b in range(B):
            for s in range(n_seq):
                for i in range(length):
                    z = [logits[b, s, i, j] / sigma[b] for j in range(length)]
                    m = max(z)
                    e = [math.exp(x - m) for x in z]
                    for j in range(length):
                        a = e[j] / sum(e)
                        for c in range(C):
                            out[b, c, s, j] = out.get((b, c, s, j), 0.0) + at(v, b, c, s, i) * a
        return out

    row = one_pass(H, W, lambda t, b, c, s, i: t[b, c, s, i].item())
    col = one_pass(W, H, lambda t, b, c, s, i: t[b, c, i, s].item())
    res = torch.empty(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    res[b, c, h, w] = 0.5 * (row[b, c, h, w] + col[b, c, w, h])
    return res


def _qkv(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple((scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)
                 .requires_grad_() for _ in range(3))


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("sigma_scope", ["sample", "batch"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 5), (1, 2, 4, 2)])
def test_reference_matches_loop(shape, sigma_scope):
    q, k, v = _qkv(shape, torch.float64)
    expected = _loop_axial(q, k, v, sigma_scope)
    got = axial_attention(q, k, v, sigma_scope=sigma_scope, backend="reference")
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)


def test_sample_scope_is_batch_independent():
    q, k, v = (t.detach() for t in _qkv((3, 4, 5, 6), torch.float64))
    whole = axial_attention(q, k, v, sigma_scope="sample", backend="reference")
    for b in range(3):
        alone = axial_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], sigma_scope="sample", backend="reference")
        torch.testing.assert_close(whole[b:b + 1], alone, rtol=1e-13, atol=1e-13)
    batch = axial_attention(q, k, v, sigma_scope="batch", backend="reference")
    assert not torch.allclose(batch[:1], whole[:1], rtol=1e-6, atol=1e-6)
    one = axial_attention(q[:1], k[:1], v[:1], sigma_scope="batch", backend="reference")
    torch.testing.assert_close(one, whole[:1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sigma_scope", ["sample", "batch"])
def test_reference_gradcheck(sigma_scope):
    q, k, v = _qkv((2, 2, 3, 4), torch.float64)
    assert torch.autograd.gradcheck(lambda *t: axial_attention_reference(*t, sigma_scope=sigma_scope), (q, k, v))


def test_bi_axial_pairs_the_directions():
    q1, k1, v1 = _qkv((1, 3, 4, 5), torch.float64, seed=1)
    q2, k2, v2 = _qkv((1, 3, 4, 5), torch.float64, seed=2)
    out1, out2 = bi_axial_attention(q1, k1, v1, q2, k2, v2, backend="reference")
    torch.testing.assert_close(out1, axial_attention_reference(q1, k2, v1), rtol=0, atol=0)
    torch.testing.assert_close(out2, axial_attention_reference(q2, k1, v2), rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 6), torch.randn(1, 3, 4, 5)),
    lambda: (torch.randn(3, 4, 5),) * 3,
    lambda: (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5), "v"),
    lambda: (torch.ones(1, 3, 4, 5, dtype=torch.int64),) * 3,
    lambda: (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5, dtype=torch.float64), torch.randn(1, 3, 4, 5)),
])
@pytest.mark.parametrize("backend", ["reference", "auto", "fused"])
def test_bad_inputs_raise_value_error(make, backend):
    with pytest.raises(ValueError):
        axial_attention(*make(), backend=backend)


def test_bad_options_raise_value_error():
    q = torch.randn(1, 3, 4, 5)
    with pytest.raises(ValueError, match="sigma_scope"):
        axial_attention(q, q, q, sigma_scope="image")
    with pytest.raises(ValueError, match="backend"):
        axial_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError):
        bi_axial_attention(q, q, q, q, q, torch.randn(1, 3, 5, 4))


def test_fused_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 3, 4, 5)
    assert not fused_axial_available("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        axial_attention(q, q, q, backend="fused")
    axial_attention(q, q, q, backend="auto")


def test_auto_on_cpu_is_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("auto must not take the fused path on CPU")

    monkeypatch.setattr(ops, "axial_forward", boom)
    q, k, v = _qkv((1, 3, 4, 5))
    axial_attention(q, k, v)
    bi_axial_attention(q, k, v, q, k, v)


def test_registered_with_its_auto_backend():
    from epban.ops.registry import REGISTRY

    entry = REGISTRY["axial_attention"]
    assert entry.kernels == "Triton"
    assert entry.auto_backend(torch.device("cpu")) == "reference"
    assert entry.auto_backend(torch.device("cuda")) == ("fused" if triton_available() else "reference")


# ----------------------------------------------------------------------------- fused, interpreted on CPU


def _interpreted():
    if torch.cuda.is_available():
        return False
    if os.environ.get("TRITON_INTERPRET") != "1" or not fused_axial_available("cpu"):
        return False
    from epban.kernels import axial_attention as kernels

    return "Interpreted" in type(kernels._axial_fwd_out_kernel).__name__


interpreted = pytest.mark.skipif(not _interpreted(), reason="needs Triton and TRITON_INTERPRET=1 set before import")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def _check_against_reference(q, k, v, sigma_scope, fused_fn, tol):
    out = fused_fn(q, k, v)
    ref = axial_attention_reference(*(t.double() for t in (q, k, v)), sigma_scope=sigma_scope)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype).to(out.device))
    want = torch.autograd.grad(ref, (q, k, v), grad.to(ref.device))
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == q.dtype
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"d{name}: {m}")


@interpreted
@pytest.mark.parametrize("shape, sigma_scope, dtype", [
    ((3, 5, 7, 13), "sample", torch.float32),
    ((3, 5, 7, 13), "batch", torch.float32),
    ((2, 5, 13, 7), "sample", torch.float64),
    ((2, 5, 1, 13), "sample", torch.float32),
    ((2, 5, 9, 1), "batch", torch.float32),
    ((1, 4, 6, 6), "sample", torch.float16),
])
@pytest.mark.parametrize("tile_mode", ["single", "looped"])
def test_fused_matches_reference(shape, sigma_scope, dtype, tile_mode, rng_seed, monkeypatch):
    """Every sequence here fits one tile: the one-tile kernels ("single", the default) and the
    general tile loops with their separate sigma, lse and omega launches ("looped")."""
    monkeypatch.setitem(ops.CONFIG, "single_tile", tile_mode == "single")
    q, k, v = _qkv(shape, dtype, seed=rng_seed)
    fused = lambda *t: axial_attention(*t, sigma_scope=sigma_scope, backend="fused")  # noqa: E731
    _check_against_reference(q, k, v, sigma_scope, fused, TOL[dtype])


def _in_layout(ts, layout):
    """The same values as leaves in ``layout`` ("nchw" or "channels_last")."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return tuple(t.detach().contiguous(memory_format=fmt).requires_grad_() for t in ts)


@interpreted
@pytest.mark.parametrize("layouts, sigma_scope", [(("nchw", "nchw"), "batch"),
                                                  (("channels_last", "channels_last"), "sample"),
                                                  (("channels_last", "nchw"), "batch")])
def test_fused_bi_axial_matches_reference(rng_seed, layouts, sigma_scope):
    """Both directions in one call, in either layout; a call mixing layouts is served in NCHW."""
    q1, k1, v1 = _in_layout(_qkv((2, 5, 5, 7), seed=rng_seed), layouts[0])
    q2, k2, v2 = _in_layout(_qkv((2, 5, 5, 7), seed=rng_seed + 1, scale=0.5), layouts[1])
    out1, out2 = bi_axial_attention(q1, k1, v1, q2, k2, v2, sigma_scope=sigma_scope, backend="fused")
    inputs = tuple(t.double() for t in (q1, k1, v1, q2, k2, v2))
    ref1, ref2 = bi_axial_attention(*inputs, sigma_scope=sigma_scope, backend="reference")
    torch.testing.assert_close(out1.double(), ref1, **TOL[torch.float32])
    torch.testing.assert_close(out2.double(), ref2, **TOL[torch.float32])
    g1, g2 = torch.randn_like(ref1), torch.randn_like(ref2)
    got = torch.autograd.grad((out1, out2), (q1, k1, v1, q2, k2, v2), (g1.float(), g2.float()))
    want = torch.autograd.grad((ref1, ref2), inputs, (g1, g2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("shape, sigma_scope, dtype", [
    ((3, 5, 7, 13), "sample", torch.float32),
    ((2, 6, 13, 7), "batch", torch.float32),
    ((2, 5, 1, 13), "sample", torch.float32),
    ((2, 5, 9, 1), "batch", torch.float64),
])
def test_fused_reads_channels_last_as_it_is(shape, sigma_scope, dtype, rng_seed, monkeypatch):
    """channels_last inputs (the loss mode's layout) go through the kernels' strides with no
    copy, in both passes, and give channels_last outputs and gradients."""
    q, k, v = _in_layout(_qkv(shape, dtype, seed=rng_seed), "channels_last")
    assert ops.is_channels_last(q)
    copies = []
    real_contiguous = torch.Tensor.contiguous

    def counting_contiguous(t, *args, **kwargs):
        out = real_contiguous(t, *args, **kwargs)
        copies.append(out.data_ptr() != t.data_ptr())
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", counting_contiguous)
    fused = lambda *t: axial_attention(*t, sigma_scope=sigma_scope, backend="fused")  # noqa: E731
    out = fused(q, k, v)
    assert out.is_contiguous(memory_format=torch.channels_last) and not any(copies)
    (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    assert dq.is_contiguous(memory_format=torch.channels_last)
    _check_against_reference(q, k, v, sigma_scope, fused, TOL[dtype])


def test_kernels_refuse_mixed_layouts():
    a = torch.zeros(1, 3, 4, 5)
    with pytest.raises(ValueError, match="one shape"):
        ops.layout_strides([a, a.contiguous(memory_format=torch.channels_last)], False)
    with pytest.raises(ValueError, match="one shape"):
        ops.layout_strides([a.contiguous(memory_format=torch.channels_last), a], True)
    assert ops.layout_strides([a], False) == (60, 20, 5, 1)
    assert ops.layout_strides([a.contiguous(memory_format=torch.channels_last)], True) == (60, 1, 15, 3)


def test_auto_takes_the_fused_kernels_where_they_win(monkeypatch):
    """On CUDA: half-precision channels_last maps at every size (resident tiles); float32 or
    NCHW up to AUTO_FUSED_MAX_WORK (B H W (H + W)). Elsewhere never."""
    small = torch.empty(16, 8, 16, 16)
    assert not ops._auto_takes_fused(small)
    monkeypatch.setattr(ops, "triton_auto_ok", lambda device: True)  # these CPU tensors stand for CUDA ones
    big = torch.empty(1, 8, 135, 240)
    assert not ops._auto_takes_fused(big)
    assert not ops._auto_takes_fused(big.bfloat16())
    assert ops._auto_takes_fused(big.bfloat16().contiguous(memory_format=torch.channels_last))
    assert not ops._auto_takes_fused(big.contiguous(memory_format=torch.channels_last))
    assert ops._auto_takes_fused(small)


@interpreted
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_a_failing_kernel_raises(backend, monkeypatch):
    """A failure of the kernels reaches the caller, under "auto" too: no silent fallback."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(ops, "triton_auto_ok", lambda device: True)  # auto takes the kernels on CPU
    monkeypatch.setattr(ops, "axial_forward", broken)
    q, k, v = _qkv((1, 3, 4, 5))
    with pytest.raises(RuntimeError, match="out of resource"):
        axial_attention(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match="out of resource"):
        bi_axial_attention(q, k, v, q, k, v, backend=backend)


def test_bad_precision_raises_value_error(monkeypatch):
    q = torch.randn(1, 3, 4, 5)
    with pytest.raises(ValueError, match="precision"):
        ops.fused_axial_attention(q, q, q, precision="fp8")
    monkeypatch.setenv("EPBAN_FP32_PRECISION", "fp8")
    with pytest.raises(ValueError, match="EPBAN_FP32_PRECISION"):
        ops.fused_axial_attention(q, q, q)
    with pytest.raises(ValueError, match="3 or 6"):
        ops.fused_axial_attention(q, q)


def test_one_tile_kernels_serve_maps_that_fit_one_tile(monkeypatch):
    """The plan takes the one-tile kernels when both passes' sequences fit one tile and the
    group's partials are few enough for every program to merge them."""
    pytest.importorskip("triton")

    def plan(shape, dtype=torch.bfloat16, scope="sample", **config):
        return ops._Plan(shape, dtype, scope, "ieee", config, channels_last=True)

    assert plan((16, 256, 16, 16)).single_tile and plan((1, 256, 64, 64)).single_tile
    assert plan((1, 256, 64, 33), torch.float32, block_row=64, block_col=64).single_tile
    assert not plan((1, 256, 64, 33), torch.float32, block_row=64).single_tile  # columns of 64 > 32
    assert not plan((1, 256, 64, 64), torch.float32).single_tile  # 32-position float32 tiles
    assert not plan((1, 256, 128, 128)).single_tile and not plan((1, 256, 135, 240)).single_tile
    assert not plan((1, 256, 64, 64), single_tile=False).single_tile
    assert plan((64, 256, 64, 64), scope="batch").single_tile  # 64 x 64 partials per group
    assert not plan((65, 256, 64, 64), scope="batch").single_tile


class _Refused:
    """Stands in for a kernel the plan must not launch."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched")


@interpreted
@pytest.mark.parametrize("tile_mode", ["single", "looped"])
def test_each_tile_mode_launches_only_its_kernels(tile_mode, rng_seed, monkeypatch):
    from epban.kernels import axial_attention as kernels

    monkeypatch.setitem(ops.CONFIG, "single_tile", tile_mode == "single")
    refused = (["_axial_fwd_sigma_kernel", "_axial_fwd_lse_kernel", "_axial_fwd_out_kernel",
                "_axial_bwd_omega_kernel", "_axial_bwd_dqk_kernel"] if tile_mode == "single"
               else ["_axial_fwd_single_kernel", "_axial_bwd_single_dqk_kernel"])
    for name in refused:
        monkeypatch.setattr(kernels, name, _Refused(name))
    q, k, v = _qkv((2, 5, 5, 7), seed=rng_seed)
    out = axial_attention(q, k, v, backend="fused")
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


@interpreted
@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 18, 3, 20), (1, 18, 19, 3)])
def test_fused_tiles_long_sequences_and_many_channels(shape, layout, resident, rng_seed):
    """Sequences longer than one tile (every loop runs several times, with tails) and more
    channels than one chunk of the logits' contraction; both ways of contracting them (whole-C
    tiles held in registers, the GPU's bfloat16 and "tf32" path, or chunks of channels)."""
    SMALL_TILES = dict(block_row=16, block_col=16, block_ck=16, resident=resident)
    q, k, v = _in_layout(_qkv(shape, seed=rng_seed), layout)

    def fused(q, k, v):
        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                outs, lse, stats = ops.axial_forward((q,), (k,), (v,), "sample", config=SMALL_TILES)
                ctx.save_for_backward(q, k, v, lse, stats)
                return outs[0]

            @staticmethod
            def backward(ctx, g):
                q, k, v, lse, stats = ctx.saved_tensors
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                dq, dk, dv = ops.axial_backward((q,), (k,), (v,), (g.contiguous(memory_format=fmt),), lse, stats,
                                                "sample", config=SMALL_TILES)
                return dq[0], dk[0], dv[0]

        return F.apply(q, k, v)

    _check_against_reference(q, k, v, "sample", fused, TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("resident, tile_mode, wanted", [
    (False, "looped", (0, 1, 5)), (True, "looped", (0, 1, 5)), (False, "single", (0, 1, 5)),
    (True, "single", (0, 1, 5)), (False, "single", (0, 5)), (True, "single", (2, 5)), (False, "looped", (0, 5))])
def test_fused_bi_axial_some_gradients_only(rng_seed, resident, tile_mode, wanted, monkeypatch):
    """Only some of q1, k1, v1, q2, k2, v2 (indices ``wanted``) want gradients, e.g. q1, k1, v2
    (the loss mode's: one direction's dq, the other's dk): the kernels skip the rest (a
    direction wanting neither dq nor dk, or no dq or dk at all) and the wanted ones stay exact."""
    monkeypatch.setitem(ops.CONFIG, "resident", resident)
    monkeypatch.setitem(ops.CONFIG, "single_tile", tile_mode == "single")
    tensors = _qkv((2, 5, 5, 7), seed=rng_seed) + _qkv((2, 5, 5, 7), seed=rng_seed + 1)
    q1, k1, v1, q2, k2, v2 = (t.detach().requires_grad_(i in wanted) for i, t in enumerate(tensors))
    out1, out2 = bi_axial_attention(q1, k1, v1, q2, k2, v2, backend="fused")
    inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in (q1, k1, v1, q2, k2, v2)]
    ref1, ref2 = bi_axial_attention(*inputs, backend="reference")
    g1, g2 = torch.randn_like(ref1), torch.randn_like(ref2)
    # the inputs in the order bi_axial_attention pairs them (direction 1: q1, k2, v1; 2: q2, k1, v2)
    got = torch.autograd.grad((out1, out2), [(q1, k1, v1, q2, k2, v2)[i] for i in wanted], (g1.float(), g2.float()))
    want = torch.autograd.grad((ref1, ref2), [inputs[i] for i in wanted], (g1, g2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL[torch.float32])


@interpreted
def test_fused_keeps_float32_accuracy_when_logits_have_a_large_mean(rng_seed):
    """q, k with a common offset: the logits' mean dwarfs their spread. The std (Chan merge of
    tile moments) and its gradient (row sums shifted by the mean) stay as accurate as the
    float32 reference is."""
    g = torch.Generator().manual_seed(rng_seed)
    q, k, v = (torch.randn(1, 16, 6, 9, generator=g, dtype=torch.float64) + 3.0 for _ in range(3))
    grad = torch.randn(q.shape, generator=g, dtype=torch.float64)
    truth = _value_and_grads(axial_attention_reference, (q, k, v), grad)
    fused = _value_and_grads(lambda *t: axial_attention(*t, backend="fused"), (q.float(), k.float(), v.float()), grad)
    ref32 = _value_and_grads(axial_attention_reference, (q.float(), k.float(), v.float()), grad)
    for name, f, r, t in zip(["out", "dq", "dk", "dv"], fused, ref32, truth):
        err_fused = ((f.double() - t).norm() / t.norm()).item()
        err_ref32 = ((r.double() - t).norm() / t.norm()).item()
        assert err_fused <= 4 * err_ref32 + 1e-7, f"{name}: fused {err_fused:.2e}, float32 reference {err_ref32:.2e}"


def _value_and_grads(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad.to(out.dtype)))


@interpreted
@pytest.mark.parametrize("layout, tile_mode", [("nchw", "single"), ("nchw", "looped"), ("channels_last", "single"),
                                               ("channels_last", "looped")])
def test_fused_overwrites_poisoned_memory(monkeypatch, rng_seed, layout, tile_mode):
    """Every buffer the op allocates starts as NaN (the statistics the one-tile kernels store
    for the backward too): the results must still be exact."""
    monkeypatch.setitem(ops.CONFIG, "single_tile", tile_mode == "single")
    q, k, v = _in_layout(_qkv((2, 3, 5, 6), seed=rng_seed), layout)
    fused = lambda *t: axial_attention(*t, backend="fused")  # noqa: E731
    with poisoned_allocations():
        _check_against_reference(q, k, v, "sample", fused, TOL[torch.float32])


@interpreted
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fused_single_logit_is_nan_like_the_reference():
    q, k, v = _qkv((1, 3, 1, 1))
    with pytest.warns(UserWarning):
        ref = axial_attention_reference(q, k, v)
    assert torch.isnan(ref).all()
    assert torch.isnan(axial_attention(q, k, v, backend="fused")).all()


@interpreted
def test_fused_refuses_bfloat16_in_the_interpreter():
    q = torch.randn(1, 3, 4, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        axial_attention(q, q, q, backend="fused")


def test_fused_availability_on_cpu_follows_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_axial_available("cpu") == triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused_axial_available(torch.device("cpu"))


@interpreted
def test_model_score_fused_equals_reference(rng_seed, sigma_scope="sample"):
    """The tiny model's score with the fused attention agrees with the reference to 1e-5."""
    from epban.models.pban import EfficientPBAN, PBANConfig

    torch.manual_seed(rng_seed)
    model = EfficientPBAN(PBANConfig.tiny(sigma_scope=sigma_scope)).eval()
    sr, hr = torch.rand(2, 3, 48, 56), torch.rand(2, 3, 48, 56)
    with torch.no_grad():
        model.attention_backend = "reference"
        expected = model(sr, hr)
        model.attention_backend = "fused"
        got = model(sr, hr)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the custom op


@interpreted
@pytest.mark.parametrize("ndir, layout, sigma_scope", [(1, "nchw", "sample"), (2, "channels_last", "batch")])
def test_opcheck_custom_ops(ndir, layout, sigma_scope):
    """Schema, fake kernels, autograd registration and AOT dispatch of the forward and backward
    ops (float64 under the interpreter)."""
    qkv = [t for d in range(ndir) for t in _in_layout(_qkv((2, 3, 4, 5), torch.float64, seed=d), layout)]
    torch.library.opcheck(ops._axial_op, (qkv, sigma_scope, "ieee"))
    out = ops._axial_op([t.detach() for t in qkv], sigma_scope, "ieee")
    lse, stats = out[ndir], out[ndir + 1]
    grads = [torch.randn_like(o) for o in out[:ndir]]
    needs = [True, False, True] + [False, True, True] * (ndir - 1)
    torch.library.opcheck(ops._axial_backward_op,
                          ([t.detach() for t in qkv], grads, lse, stats, sigma_scope, "ieee", needs))


@interpreted
def test_gradcheck_fused(rng_seed):
    """Both directions through the op, float64 (fast mode: random directions, few interpreted calls)."""
    tensors = _qkv((2, 2, 3, 4), torch.float64, seed=rng_seed) + _qkv((2, 2, 3, 4), torch.float64, seed=rng_seed + 1)
    assert torch.autograd.gradcheck(lambda *t: bi_axial_attention(*t, backend="fused"), tensors, fast_mode=True)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not _interpreted(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[cuda, needs_gpu]),
])
def test_compile_traces_the_custom_op(device, rng_seed):
    """torch.compile traces both directions, forward and backward, with no graph break: the
    fused op is one node of the graph (aot_eager: no Inductor compile)."""
    tensors = [t.to(device).detach().requires_grad_() for t in _qkv((2, 3, 5, 7), seed=rng_seed)
               + _qkv((2, 3, 5, 7), seed=rng_seed + 1)]

    def step(*t):
        out1, out2 = bi_axial_attention(*t, backend="fused")
        return out1.square().sum() + out2.sum()

    eager = torch.autograd.grad(step(*tensors), tensors)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*tensors), tensors)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- fused, compiled on CUDA
# All with C=256 and shapes that share compiled variants (tiles of 16 or 32 positions), so the
# Triton JIT, warmed in parallel processes first, stays a small part of the run.

_CUDA_WARM = [((1, 256, 7, 13), "float32"), ((1, 256, 40, 1), "float32"), ((1, 256, 33, 47), "float32"),
              ((1, 256, 33, 47), "bfloat16"), ((1, 256, 7, 13), "float16"),
              ((1, 256, 33, 47), "bfloat16", "channels_last"), ((1, 256, 135, 240), "bfloat16", "channels_last")]
_WARM_SCRIPT = r"""
import sys, torch
from epban.ops.axial_attention import bi_axial_attention
shape, dtype = eval(sys.argv[1]), getattr(torch, sys.argv[2])
fmt = torch.channels_last if sys.argv[3:] == ["channels_last"] else torch.contiguous_format
x = [(0.1 * torch.randn(shape, device="cuda")).to(dtype).contiguous(memory_format=fmt).requires_grad_()
     for _ in range(6)]
torch.autograd.backward(bi_axial_attention(*x, backend="fused"), [torch.ones_like(x[0])] * 2)
torch.cuda.synchronize()
"""


@pytest.fixture(scope="module")
def warm_cuda_kernels():
    """Compile the kernel variants these tests use in parallel processes (Triton's on-disk cache)."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WARM_SCRIPT, repr(shape), *rest], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for shape, *rest in _CUDA_WARM]
    for proc in procs:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _check_rel_l2(q, k, v, sigma_scope, tol):
    out = axial_attention(q, k, v, sigma_scope=sigma_scope, backend="fused")
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = axial_attention_reference(*inputs, sigma_scope=sigma_scope)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.device)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, grad)
    for name, a, b in zip(["out", "dq", "dk", "dv"], (out, *got), (ref, *want)):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err <= tol, f"{name}: relative L2 error {err:.2e} > {tol:.0e}"


@cuda
@needs_gpu
@pytest.mark.parametrize("shape, sigma_scope, dtype, layout", [
    ((3, 256, 7, 13), "sample", torch.float32, "nchw"),
    ((3, 256, 13, 7), "batch", torch.float32, "nchw"),
    ((2, 256, 40, 1), "sample", torch.float32, "nchw"),
    ((2, 256, 33, 47), "batch", torch.bfloat16, "nchw"),
    ((2, 256, 47, 33), "sample", torch.bfloat16, "nchw"),
    ((3, 256, 7, 13), "batch", torch.float16, "nchw"),
    ((4, 256, 64, 64), "sample", torch.float32, "nchw"),
    ((1, 256, 135, 240), "sample", torch.float32, "nchw"),
    ((1, 256, 135, 240), "batch", torch.bfloat16, "nchw"),
    # channels_last inputs, read through their strides (the loss mode's layout).
    ((3, 256, 7, 13), "sample", torch.float32, "channels_last"),
    ((2, 256, 33, 47), "batch", torch.bfloat16, "channels_last"),
    ((4, 256, 64, 64), "sample", torch.float32, "channels_last"),
    ((1, 256, 135, 240), "batch", torch.float32, "channels_last"),
    # the loss mode's maps up to 64x64 in bfloat16: the one-tile kernels; and the tile loops on one of them
    ((16, 256, 16, 16), "batch", torch.bfloat16, "channels_last"),
    ((1, 256, 64, 64), "sample", torch.bfloat16, "channels_last"),
    ((2, 256, 33, 47), "sample", torch.bfloat16, "looped"),
])
def test_cuda_fused_matches_reference(shape, sigma_scope, dtype, layout, rng_seed, warm_cuda_kernels, monkeypatch):
    monkeypatch.setitem(ops.CONFIG, "single_tile", layout != "looped")
    q, k, v = _qkv(shape, dtype, "cuda", seed=rng_seed, scale=0.1)
    if layout == "channels_last":
        q, k, v = _in_layout((q, k, v), "channels_last")
    _check_rel_l2(q, k, v, sigma_scope, 1e-5 if dtype == torch.float32 else 3e-2)


@cuda
@needs_gpu
@pytest.mark.parametrize("shape, layout", [((3, 256, 7, 13), "nchw"), ((2, 256, 47, 33), "nchw"),
                                           ((1, 256, 135, 240), "channels_last")])
def test_cuda_fused_tf32_dots_with_resident_tiles(shape, layout, rng_seed, warm_cuda_kernels, monkeypatch):
    """float32 with "tf32" dots takes the resident-tile kernels (as bfloat16 does): TF32's
    10-bit mantissa bounds the accuracy."""
    monkeypatch.setenv("EPBAN_FP32_PRECISION", "tf32")
    q, k, v = _in_layout(_qkv(shape, torch.float32, "cuda", seed=rng_seed, scale=0.1), layout)
    _check_rel_l2(q, k, v, "sample", 1e-2)


@cuda
@needs_gpu
def test_cuda_auto_uses_the_fused_kernels(monkeypatch, warm_cuda_kernels):
    called = []
    real = ops.axial_forward
    monkeypatch.setattr(ops, "axial_forward", lambda *a, **k: called.append(len(a[0])) or real(*a, **k))
    q, k, v = _qkv((1, 256, 7, 13), torch.float32, "cuda")
    bi_axial_attention(q, k, v, q, k, v)
    assert called == [2]


# ----------------------------------------------------------------------------- compiled for a GPU, without one

_COMPILE_SCRIPT = r"""
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from epban.kernels import axial_attention as K

pointers = {"q0", "k0", "v0", "o0", "q1", "k1", "v1", "o1", "g0", "g1", "dv0", "dv1", "dq0", "dq1", "dk0", "dk1"}
kernels = sorted(n for n in dir(K) if n.startswith("_axial_") and n.endswith("_kernel"))
# every kernel; the column pass of the kernels with a PASS; bfloat16
# (chunked contraction: float32 "ieee"/"tf32x3"; resident tiles: bfloat16 and "tf32")
variants = [("fp32", 0, False, name) for name in kernels]
variants += [("fp32", 1, False, name) for name in ("_axial_fwd_out_kernel", "_axial_bwd_dv_kernel",
                                                    "_axial_fwd_single_kernel", "_axial_bwd_single_dqk_kernel")]
variants += [("bf16", 0, True, "_axial_bwd_dqk_kernel")]
variants += [("bf16", 1, True, name) for name in ("_axial_fwd_stats_kernel", "_axial_fwd_lse_kernel",
                                                   "_axial_fwd_out_kernel", "_axial_bwd_dv_kernel",
                                                   "_axial_fwd_single_kernel", "_axial_bwd_single_dqk_kernel")]
# the dqk kernel compiles for dq and (below) for dk
variants = [v + (False,) for v in variants]
variants += [("bf16", 0, True, "_axial_bwd_dqk_kernel", True), ("fp32", 1, False, "_axial_bwd_dqk_kernel", True)]
for dtype, pass_, resident, name, is_dk in variants:
    constexprs = dict(PASS=pass_, BLOCK=16, BLOCK_ROW=16, BLOCK_COL=16, BLOCK_C=32, BLOCK_CK=16, RESIDENT=resident,
                      IS_DK=is_dk, BLOCK_P=256, PRECISION="ieee", ACC=tl.float32)
    fn = getattr(K, name)
    signature = {a: "constexpr" if a in constexprs else ("*" + dtype) if a in pointers
                 else "*fp32" if a.endswith("_ptr") else "fp32" if a == "eps" else "i32" for a in fn.arg_names}
    given = {a: v for a, v in constexprs.items() if a in fn.arg_names}
    compile(ASTSource(fn, signature, given), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(name, dtype, pass_, resident, is_dk, "compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The kernels go through Triton's whole NVIDIA pipeline (ptxas included) for an H100,
    so a GPU-only compile error shows up on a CPU machine too."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 22, result.stdout


_RESOURCES_SCRIPT = r"""
import triton.language as tl
from epban.testing import kernel_resources as kr
from epban.kernels import axial_attention as K

fn = K._axial_fwd_sigma_kernel
cx = dict(BLOCK_P=1024, ACC=tl.float32)
r = kr.resources(fn, kr.signature(fn, cx, {}), cx, num_warps=4)
assert 0 < r["regs"] <= 255 and r["spill"] == 0 and r["blocks_by_regs"] >= 1 and r["mma"] == "fma", r
# the axial rows take their tiles from the ops' own plan (first row only: one compile)
name, desc, warps, r = next(kr.axial_rows("bf16", "tf32x3"))
assert name == "_axial_fwd_stats_kernel" and "block 64 resident" in desc and r["regs"] > 0, (desc, r)
print("ok", r)
"""


def test_kernel_resources_script_reads_ptxas(tmp_path):
    """epban.testing.kernel_resources (registers and spills of the kernels on sm90, no GPU needed) keeps working."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _RESOURCES_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=root)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
