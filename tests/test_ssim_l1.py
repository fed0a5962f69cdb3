"""The L1 term in the fused SSIM pass (ssim_loss(..., l1=a)), and the fused SSIM's refusal of
double backward (create_graph=True) while the reference backend supports it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import epban
from epban.losses import SRLoss, SSIMLoss
from epban.ops import ssim as ssim_module
from epban.ops.ssim import fused_unavailable_reason, ssim_l1_loss_parts, ssim_loss, ssim_reference

needs_cpu_kernel = pytest.mark.skipif(fused_unavailable_reason("cpu") is not None, reason="epban._C is not built")
PADDINGS = ("valid", "same")
ODD_SHAPES = [(3, 1, 13, 29), (2, 3, 37, 23), (1, 2, 61, 50)]
C1, C2 = 1e-4, 9e-4


def image_pair(shape, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = (0.8 * x + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


def partly_equal(shape, *, dtype=torch.float32, seed=1):
    """y equal to x on about a third of the pixels (bit for bit), different elsewhere."""
    x, y = image_pair(shape, dtype=dtype, seed=seed)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.35
    return x, torch.where(mask, x, y)


def reference_loss(x, y, weight, l1, padding, reduction):
    ssim = ssim_reference(x, y, padding=padding, reduction=reduction)
    if reduction == "mean":
        return l1 * F.l1_loss(x, y) + weight * (1 - ssim)
    return l1 * F.l1_loss(x, y, reduction="none").flatten(1).mean(1) + weight * (1 - ssim)


def loss_and_grads(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    value = fn(x, y)
    value.sum().backward()
    return value.detach(), x.grad, y.grad


# ---------------------------------------------------------------- the L1 part alone


@needs_cpu_kernel
@pytest.mark.parametrize("batch_mean", [True, False])
@pytest.mark.parametrize("equal", ["none", "partly", "all"])
def test_l1_part_matches_pytorch_l1_loss(batch_mean, equal):
    """scale 0: the pass's value and gradients are the L1 term's alone, against F.l1_loss
    (sign(0) = 0 where x == y, as PyTorch's)."""
    shape = (2, 3, 19, 23)
    x, y = {"none": image_pair, "partly": partly_equal}.get(equal, image_pair)(shape)
    if equal == "all":
        y = x.clone()
    a = 0.7
    value, l1_value, gx, gy = torch.ops.epban.ssim_l1_and_grad(x, y, C1, C2, False, True, True, batch_mean, 0.0, a)
    ref = lambda x, y: a * (F.l1_loss(x, y) if batch_mean else F.l1_loss(x, y, reduction="none").flatten(1).mean(1))
    want, want_gx, want_gy = loss_and_grads(ref, x, y)
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(l1_value, want / a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gx, want_gx, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gy, want_gy, rtol=1e-6, atol=1e-12)
    if equal != "none":
        assert (gx[x == y] == 0).all() and (gy[x == y] == 0).all()


# ---------------------------------------------------------------- a * L1 + w * (1 - SSIM)


@needs_cpu_kernel
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_l1_ssim_matches_reference(shape, padding, reduction):
    x, y = partly_equal(shape)
    w, a = 0.6, 1.3
    fused = loss_and_grads(lambda x, y: ssim_loss(x, y, weight=w, l1=a, padding=padding, reduction=reduction,
                                                  backend="fused"), x, y)
    want = loss_and_grads(lambda x, y: reference_loss(x, y, w, a, padding, reduction), x, y)
    for got, ref in zip(fused, want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-6)


@needs_cpu_kernel
def test_fused_l1_takes_one_op(monkeypatch):
    """Training on the CPU runs the L1 term in the SSIM pass (ssim_l1_one_pass), not beside it."""
    calls = []
    real = torch.ops.epban.ssim_l1_one_pass
    monkeypatch.setattr(ssim_module.torch.ops.epban, "ssim_l1_one_pass",
                        lambda *args: calls.append(args) or real(*args), raising=False)
    monkeypatch.setattr(ssim_module.F, "l1_loss", lambda *args, **kw: pytest.fail("L1 computed beside the pass"))
    x, y = image_pair((2, 1, 20, 20))
    ssim_loss(x.requires_grad_(True), y, weight=0.5, l1=1.0).backward()
    assert len(calls) == 1


@needs_cpu_kernel
@pytest.mark.parametrize("wanted", ["x", "y"])
def test_fused_l1_gradient_of_one_input(wanted):
    x, y = partly_equal((2, 2, 24, 31))
    x.requires_grad_(wanted == "x")
    y.requires_grad_(wanted == "y")
    ssim_loss(x, y, weight=0.4, l1=0.9).backward()
    got = (x if wanted == "x" else y).grad
    xr, yr = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    reference_loss(xr, yr, 0.4, 0.9, "valid", "mean").backward()
    torch.testing.assert_close(got, (xr if wanted == "x" else yr).grad, rtol=1e-4, atol=2e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_l1_float64_gradcheck(padding, reduction):
    x, y = image_pair((2, 1, 11, 13), dtype=torch.float64)  # x != y everywhere: |x - y| is smooth there
    x.requires_grad_(True)
    y.requires_grad_(True)
    fn = lambda x, y: ssim_loss(x, y, weight=0.7, l1=1.1, padding=padding, reduction=reduction, backend="fused")
    assert torch.autograd.gradcheck(fn, (x, y))


@needs_cpu_kernel
def test_fused_l1_float64_matches_reference_closely():
    x, y = partly_equal((2, 3, 29, 17), dtype=torch.float64)
    fused = loss_and_grads(lambda x, y: ssim_loss(x, y, weight=0.3, l1=2.0, backend="fused"), x, y)
    want = loss_and_grads(lambda x, y: reference_loss(x, y, 0.3, 2.0, "valid", "mean"), x, y)
    for got, ref in zip(fused, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


@needs_cpu_kernel
def test_fused_l1_backward_twice_is_bit_identical():
    x, y = partly_equal((2, 2, 30, 21))
    x.requires_grad_(True)
    loss = ssim_loss(x, y, weight=0.5, l1=0.25)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward()
    assert torch.equal(x.grad, first)
    x.grad = None
    (3 * ssim_loss(x, y, weight=0.5, l1=0.25)).backward()  # an upstream gradient other than 1
    torch.testing.assert_close(x.grad, 3 * first, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("path", ["reference", "half", "two_pass", "no_grad"])
def test_l1_where_the_pass_cannot_serve(path, monkeypatch):
    """Reference backend, half types, the one-pass op switched off, no gradient: the L1 term is
    PyTorch's beside the SSIM, with the same value."""
    dtype = torch.bfloat16 if path == "half" else torch.float32
    x, y = partly_equal((2, 3, 21, 22), dtype=dtype)
    backend = "reference" if path == "reference" or fused_unavailable_reason("cpu") is not None else "auto"
    if path == "two_pass":
        monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset())
    want = reference_loss(x.float(), y.float(), 0.8, 0.5, "valid", "none")
    if path == "no_grad":
        with torch.no_grad():
            got = ssim_loss(x, y, weight=0.8, l1=0.5, reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    got, gx, _ = loss_and_grads(lambda x, y: ssim_loss(x, y, weight=0.8, l1=0.5, reduction="none", backend=backend),
                                x, y)
    tol = dict(rtol=2e-2, atol=2e-2) if path == "half" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want.to(got.dtype), **tol)
    _, want_gx, _ = loss_and_grads(lambda x, y: reference_loss(x, y, 0.8, 0.5, "valid", "none"), x.float(), y.float())
    torch.testing.assert_close(gx.float(), want_gx, **(dict(rtol=5e-2, atol=1e-3) if path == "half" else tol))


def test_l1_only_and_ssim_only():
    x, y = partly_equal((2, 1, 16, 16))
    torch.testing.assert_close(ssim_loss(x, y, weight=0.0, l1=2.0), 2.0 * F.l1_loss(x, y))
    torch.testing.assert_close(ssim_loss(x, y, weight=1.5, l1=0.0), 1.5 * (1 - epban.ssim(x, y)))


@pytest.mark.parametrize("l1", [float("nan"), float("inf"), "1", True])
def test_bad_l1_weight_raises(l1):
    x, y = image_pair((1, 1, 16, 16))
    with pytest.raises(ValueError, match="l1"):
        ssim_loss(x, y, l1=l1)
    with pytest.raises(ValueError, match="l1"):
        SSIMLoss(l1=-1.0 if l1 is True else l1)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_parts_from_one_pass(backend):
    x, y = partly_equal((3, 3, 25, 19))
    loss, l1_part, ssim_part = ssim_l1_loss_parts(x, y, weight=0.5, l1=2.0, backend=backend)
    torch.testing.assert_close(l1_part, F.l1_loss(x, y))
    torch.testing.assert_close(ssim_part, 1 - ssim_reference(x, y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 2.0 * l1_part + 0.5 * ssim_part, rtol=1e-5, atol=1e-6)


def test_ssim_loss_module_with_l1():
    x, y = partly_equal((2, 3, 24, 24))
    torch.testing.assert_close(SSIMLoss(weight=0.4, l1=1.5)(x, y), reference_loss(x, y, 0.4, 1.5, "valid", "mean"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 0.5), (1.0, 0.0), (0.0, 0.5)])
def test_sr_loss_fuses_l1_and_ssim_and_reports_parts(weights):
    a, w = weights
    x, y = partly_equal((2, 3, 33, 27))
    loss = SRLoss(l1=a, ssim=w)
    total, parts, gx = None, None, None
    xg = x.clone().requires_grad_(True)
    total, parts = loss(xg, y)
    total.backward()
    assert loss.l1_in_ssim == (a > 0 and w > 0)
    assert list(parts) == [name for name, on in (("l1", a > 0), ("ssim_loss", w > 0)) if on]
    assert all(not p.requires_grad for p in parts.values())
    if a > 0:
        torch.testing.assert_close(parts["l1"], F.l1_loss(x, y))
    if w > 0:
        torch.testing.assert_close(parts["ssim_loss"], 1 - ssim_reference(x, y), rtol=1e-5, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    want = reference_loss(xr, y, w, a, "valid", "mean")
    want.backward()
    torch.testing.assert_close(total.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=2e-6)


@needs_cpu_kernel
def test_opcheck_l1_ops():
    x, y = partly_equal((2, 2, 14, 17))
    bx, by = x.detach(), y.detach()
    for same in (False, True):
        for batch_mean in (False, True):
            for grad_x, grad_y in ((True, True), (True, False), (False, False)):
                torch.library.opcheck(torch.ops.epban.ssim_l1_and_grad.default,
                                      (bx, by, C1, C2, same, grad_x, grad_y, batch_mean, -0.5, 1.5))
            torch.library.opcheck(torch.ops.epban.ssim_l1_and_grad.default,
                                  (bx, by, C1, C2, same, True, True, batch_mean, 1.0, 0.0))
            args = (x.clone().requires_grad_(True), y.clone().requires_grad_(True), C1, C2, same, batch_mean, -0.5)
            torch.library.opcheck(torch.ops.epban.ssim_l1_one_pass.default, args + (1.5,))
            torch.library.opcheck(torch.ops.epban.ssim_l1_one_pass.default, args + (0.0,))


# ---------------------------------------------------------------- double backward


@needs_cpu_kernel
@pytest.mark.parametrize("reduction", ["mean", "none", "map"])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_pass"])
def test_fused_refuses_double_backward(reduction, one_pass, monkeypatch):
    monkeypatch.setattr(ssim_module, "ONE_PASS_DEVICES", frozenset({"cpu"} if one_pass else ()))
    x, y = image_pair((2, 1, 16, 16))
    x.requires_grad_(True)
    value = epban.ssim(x, y, reduction=reduction, backend="fused")
    with pytest.raises(RuntimeError, match="no double backward.*backend='reference'"):
        torch.autograd.grad(value.sum(), x, create_graph=True)
    # a plain backward still works on the same graph
    (gx,) = torch.autograd.grad(epban.ssim(x, y, reduction=reduction, backend="fused").sum(), x)
    assert torch.isfinite(gx).all()


@needs_cpu_kernel
@pytest.mark.parametrize("l1", [0.0, 0.5])
def test_fused_loss_refuses_double_backward(l1):
    x, y = image_pair((2, 1, 16, 16))
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(ssim_loss(x, y, weight=0.5, l1=l1, backend="fused"), x, create_graph=True)


@pytest.mark.parametrize("padding, reduction", [("valid", "mean"), ("same", "none"), ("valid", "map")])
def test_reference_gradgradcheck(padding, reduction):
    """The reference backend is differentiable twice (fast mode: the full check takes minutes)."""
    x, y = image_pair((1, 1, 11, 12), dtype=torch.float64)
    x.requires_grad_(True)
    y.requires_grad_(True)
    fn = lambda x, y: epban.ssim(x, y, padding=padding, reduction=reduction, backend="reference")
    assert torch.autograd.gradgradcheck(fn, (x, y), fast_mode=True)
