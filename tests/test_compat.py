"""epban.compat.pytorch_msssim: the pytorch-msssim drop-in against pytorch-msssim's own
functions and modules, for every argument; its signatures; what it refuses."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import epban.compat
from epban.compat import MS_SSIM, SSIM, ms_ssim, ssim
from epban.compat import pytorch_msssim as compat_module
from epban.ops.ssim import gaussian_window_1d
from test_ms_ssim import grads

pytorch_msssim = pytest.importorskip("pytorch_msssim")

NAMES = ("ssim", "ms_ssim", "SSIM", "MS_SSIM")


def image_pair(shape, *, data_range=255.0, dtype=torch.float64, seed=0, negative_channel=True):
    """x with some structure, y a noisy copy, in [0, data_range]; with ``negative_channel``,
    y's first channel is x's inverted (a negative SSIM there, positive elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    coarse = torch.rand((b, c, max(h // 8, 2), max(w // 8, 2)), generator=gen, dtype=torch.float64)
    x = 0.7 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    y = (0.9 * x + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    if negative_channel:
        y[:, 0] = 1 - x[:, 0]
    return (x * data_range).to(dtype), (y * data_range).to(dtype)


def assert_close(actual, expected, atol, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual, expected)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= atol, f"{what}: error {error:.3g} > {atol:.3g}"


def their_window(channels, win_size=11, sigma=1.5):
    """pytorch-msssim's own window (built in float32), as its modules hold it."""
    return pytorch_msssim.SSIM(win_size=win_size, win_sigma=sigma, channel=channels).win


# Our Gaussian window is computed in float64, pytorch-msssim's in float32: on float64 inputs
# the results differ by about 1e-7 (bounded here by 1e-5). A window passed as ``win`` is used
# as is, by both: then they agree to float64 rounding.
DEFAULT_WINDOW_TOL = 1e-5
SAME_WINDOW_TOL = 1e-12


def test_the_one_import_switch():
    assert set(epban.compat.__all__) == set(NAMES)
    for name in NAMES:
        assert getattr(epban.compat, name) is getattr(compat_module, name)


@pytest.mark.parametrize("name", NAMES)
def test_signatures_and_defaults_are_pytorch_msssims(name):
    def parameters(obj):
        return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]

    ours, theirs = getattr(compat_module, name), getattr(pytorch_msssim, name)
    if inspect.isclass(ours):
        assert parameters(ours.__init__) == parameters(theirs.__init__)
        assert parameters(ours.forward) == parameters(theirs.forward)
    else:
        assert parameters(ours) == parameters(theirs)


# ---------------------------------------------------------------- ssim


SSIM_CASES = [
    dict(),
    dict(size_average=False),
    dict(data_range=1.0),
    dict(data_range=1),
    dict(win_size=7),
    dict(win_sigma=2.0),
    dict(win_size=5, win_sigma=0.8, size_average=False),
    dict(K=(0.02, 0.4)),
    dict(K=[0.01, 0.05], size_average=False),
    dict(nonnegative_ssim=True),
    dict(nonnegative_ssim=True, size_average=False),
    dict(nonnegative_ssim=True, data_range=1.0, win_size=9, K=(0.03, 0.05)),
]


def _case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items()) or "defaults"


@pytest.mark.parametrize("kwargs", SSIM_CASES, ids=_case_id)
def test_ssim_matches_pytorch_msssim(kwargs):
    x, y = image_pair((2, 3, 37, 44), data_range=kwargs.get("data_range", 255))
    ours, theirs = ssim(x, y, **kwargs), pytorch_msssim.ssim(x, y, **kwargs)
    assert_close(ours, theirs, DEFAULT_WINDOW_TOL, "value")


def test_ssim_nonnegative_clamps_each_channel():
    x, y = image_pair((2, 3, 37, 44))
    per_channel = pytorch_msssim.ssim(x[:, :1], y[:, :1], size_average=False)
    assert (per_channel < 0).all() and ssim(x, y, size_average=False).min() > 0  # only channel 0 is negative
    clamped = ssim(x, y, nonnegative_ssim=True, size_average=False)
    assert (clamped > ssim(x, y, size_average=False) + 0.05).all()


@pytest.mark.parametrize("kwargs", [dict(), dict(nonnegative_ssim=True, size_average=False)], ids=_case_id)
def test_ssim_gradients_match_pytorch_msssim(kwargs):
    x, y = image_pair((2, 3, 33, 35), seed=1)
    win = their_window(3)
    ours = grads(lambda a, b: ssim(a, b, win=win, **kwargs), x, y)
    theirs = grads(lambda a, b: pytorch_msssim.ssim(a, b, win=win, **kwargs), x, y)
    for a, b, what in zip(ours, theirs, ("value", "grad x", "grad y")):
        assert_close(a, b, SAME_WINDOW_TOL * max(1.0, b.abs().max().item()), what)
    ours = grads(lambda a, b: ssim(a, b, **kwargs), x, y)  # epban.ssim's own window and path
    for a, b, what in zip(ours, theirs, ("value", "grad x", "grad y")):
        assert_close(a, b, 1e-4 * max(1.0, b.abs().max().item()), what)


@pytest.mark.parametrize("make_win", [
    lambda c: their_window(c),
    lambda c: their_window(c, 7, 1.0).double(),
    lambda c: torch.full((c, 1, 1, 5), 0.2, dtype=torch.float64),   # a box: any window is used as is
    lambda c: torch.tensor([[[[0.1, 0.2, 0.4, 0.2, 0.1]]], [[[0.0, 0.3, 0.4, 0.3, 0.0]]], [[[0.2] * 5]]],
                           dtype=torch.float64),                    # one window per channel
], ids=["theirs", "theirs-7", "box", "per-channel"])
@pytest.mark.parametrize("nonnegative_ssim", [False, True])
def test_ssim_with_win_given(make_win, nonnegative_ssim):
    x, y = image_pair((2, 3, 30, 41), seed=2)
    win = make_win(3)
    ours = ssim(x, y, win=win, size_average=False, nonnegative_ssim=nonnegative_ssim)
    theirs = pytorch_msssim.ssim(x, y, win=win, size_average=False, nonnegative_ssim=nonnegative_ssim)
    assert_close(ours, theirs, SAME_WINDOW_TOL)


def test_ssim_is_served_by_epban_ssim(monkeypatch):
    calls = []
    served = compat_module._epban_ssim
    monkeypatch.setattr(compat_module, "_epban_ssim", lambda *a, **k: calls.append(k["reduction"]) or served(*a, **k))
    x, y = image_pair((1, 3, 24, 24))
    ssim(x, y)
    ssim(x, y, size_average=False)
    ssim(x, y, nonnegative_ssim=True)
    SSIM()(x, y)
    assert calls == ["mean", "none", "none", "mean"]


# ---------------------------------------------------------------- ms_ssim

MS_SSIM_CASES = [
    dict(),
    dict(size_average=False),
    dict(data_range=1.0),
    dict(win_size=7),
    dict(win_sigma=2.0, size_average=False),
    dict(weights=[0.2, 0.3, 0.5]),
    dict(weights=(0.1, 0.2, 0.3, 0.2, 0.2), K=(0.02, 0.4)),
    dict(K=[0.01, 0.05], data_range=1, size_average=False),
]


@pytest.mark.parametrize("kwargs", MS_SSIM_CASES, ids=_case_id)
def test_ms_ssim_matches_pytorch_msssim(kwargs):
    x, y = image_pair((2, 1, 161, 167), data_range=kwargs.get("data_range", 255), negative_channel=False)
    ours, theirs = ms_ssim(x, y, **kwargs), pytorch_msssim.ms_ssim(x, y, **kwargs)
    assert_close(ours, theirs, DEFAULT_WINDOW_TOL, "value")


@pytest.mark.parametrize("kwargs", [dict(size_average=False), dict(weights=[0.5, 0.5], data_range=1.0)],
                         ids=_case_id)
def test_ms_ssim_with_win_given(kwargs):
    x, y = image_pair((1, 2, 165, 161), data_range=kwargs.get("data_range", 255), negative_channel=False, seed=3)
    win = their_window(2)
    ours = grads(lambda a, b: ms_ssim(a, b, win=win, **kwargs), x, y)
    theirs = grads(lambda a, b: pytorch_msssim.ms_ssim(a, b, win=win, **kwargs), x, y)
    for a, b, what in zip(ours, theirs, ("value", "grad x", "grad y")):
        assert_close(a, b, SAME_WINDOW_TOL * max(1.0, b.abs().max().item()), what)


def test_ms_ssim_gradients_match_pytorch_msssim():
    x, y = image_pair((1, 1, 161, 163), negative_channel=False, seed=4)
    ours = grads(ms_ssim, x, y)
    theirs = grads(pytorch_msssim.ms_ssim, x, y)
    for a, b, what in zip(ours, theirs, ("value", "grad x", "grad y")):
        assert_close(a, b, 1e-4 * max(1.0, b.abs().max().item()), what)


def test_ms_ssim_fewer_scales_serve_smaller_images():
    x, y = image_pair((1, 1, 48, 50), data_range=1.0, negative_channel=False)
    with pytest.raises(AssertionError):  # pytorch-msssim wants 161 px whatever the scales
        pytorch_msssim.ms_ssim(x, y, data_range=1.0, weights=[0.3, 0.3, 0.4])
    value = ms_ssim(x, y, data_range=1.0, weights=[0.3, 0.3, 0.4])
    assert 0 < value.item() < 1


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(data_range=1.0, size_average=False, win_size=7, win_sigma=2.0, channel=3, K=(0.02, 0.4)),
    dict(nonnegative_ssim=True, size_average=False),
    dict(channel=1),
], ids=_case_id)
def test_ssim_module(kwargs):
    ours, theirs = SSIM(**kwargs), pytorch_msssim.SSIM(**kwargs)
    channels = kwargs.get("channel", 3)
    x, y = image_pair((2, channels, 31, 40), data_range=kwargs.get("data_range", 255))
    assert_close(ours(x, y), theirs(x, y), DEFAULT_WINDOW_TOL)
    assert torch.equal(ours.win, theirs.win)
    for name in ("win_size", "size_average", "data_range", "K", "nonnegative_ssim"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(data_range=1.0, size_average=False, win_size=7, win_sigma=2.0, channel=2, K=(0.02, 0.4)),
    dict(weights=[0.2, 0.3, 0.5], channel=2),
], ids=_case_id)
def test_ms_ssim_module(kwargs):
    ours, theirs = MS_SSIM(**kwargs), pytorch_msssim.MS_SSIM(**kwargs)
    channels = kwargs.get("channel", 3)
    x, y = image_pair((1, channels, 163, 161), data_range=kwargs.get("data_range", 255), negative_channel=False)
    assert_close(ours(x, y), theirs(x, y), DEFAULT_WINDOW_TOL)
    assert torch.equal(ours.win, theirs.win)
    for name in ("win_size", "size_average", "data_range", "K", "weights"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_a_module_uses_a_replaced_win():
    ours, theirs = SSIM(data_range=1.0), pytorch_msssim.SSIM(data_range=1.0)
    box = torch.full((3, 1, 1, 7), 1 / 7, dtype=torch.float64)
    ours.win = theirs.win = box
    x, y = image_pair((1, 3, 30, 30), data_range=1.0)
    assert_close(ours(x, y), theirs(x, y), SAME_WINDOW_TOL)


@pytest.mark.parametrize("module", ["SSIM", "MS_SSIM"])
@pytest.mark.parametrize("edit", ["copy_", "data"])
def test_a_module_uses_a_win_edited_in_place(module, edit):
    """``win`` is a plain attribute: an edit in place (the same tensor, new values) is seen, and
    the edited window serves, as in pytorch-msssim."""
    ours, theirs = getattr(compat_module, module)(), getattr(pytorch_msssim, module)()
    wide = pytorch_msssim.ssim.__globals__["_fspecial_gauss_1d"](11, 3.0).repeat(3, 1, 1, 1)
    for m in (ours, theirs):
        if edit == "copy_":
            m.win.copy_(wide)
        else:
            m.win.data = wide.clone()
    x, y = image_pair((1, 3, 161, 165), negative_channel=False, seed=9)
    assert_close(ours(x, y), theirs(x, y), SAME_WINDOW_TOL)
    assert_close(ours(x, y), getattr(compat_module, module.lower())(x, y, win_sigma=3.0), DEFAULT_WINDOW_TOL)


def test_a_module_trains_like_pytorch_msssims():
    x, y = image_pair((1, 3, 32, 35), data_range=1.0, seed=5)
    ours, theirs = SSIM(data_range=1.0), pytorch_msssim.SSIM(data_range=1.0)
    a, b = grads(lambda p, q: 1 - ours(p, q), x, y), grads(lambda p, q: 1 - theirs(p, q), x, y)
    for u, v, what in zip(a, b, ("value", "grad x", "grad y")):
        assert_close(u, v, 1e-4 * max(1.0, v.abs().max().item()), what)


# ---------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("fn", ["ssim", "ms_ssim"])
def test_float32_matches_pytorch_msssim(fn):
    x, y = image_pair((1, 3, 161, 170), dtype=torch.float32, negative_channel=False, seed=6)
    ours, theirs = getattr(compat_module, fn)(x, y), getattr(pytorch_msssim, fn)(x, y)
    assert_close(ours, theirs, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_return_their_dtype(dtype):
    x, y = image_pair((1, 3, 40, 40), data_range=1.0, negative_channel=False, seed=7)
    value = ssim(x.to(dtype), y.to(dtype), data_range=1.0)
    assert value.dtype == dtype
    assert abs(value.item() - ssim(x, y, data_range=1.0).item()) <= 2e-2


def test_size_one_dimensions_are_squeezed_as_pytorch_msssim_does():
    x, y = image_pair((2, 1, 161, 165), negative_channel=False, seed=8)
    x5, y5 = x.unsqueeze(2), y.unsqueeze(2)  # (N, C, 1, H, W)
    for fn in ("ssim", "ms_ssim"):
        ours = getattr(compat_module, fn)(x5, y5, size_average=False)
        assert_close(ours, getattr(pytorch_msssim, fn)(x5, y5, size_average=False), DEFAULT_WINDOW_TOL, fn)


def test_data_range_may_be_a_tensor():
    x, y = image_pair((1, 3, 30, 30))
    assert_close(ssim(x, y, data_range=torch.tensor(255.0)), ssim(x, y), 1e-15)


@pytest.mark.parametrize("fn", ["ssim", "ms_ssim"])
@pytest.mark.parametrize("kwargs", [
    dict(data_range=np.float32(255)),
    dict(data_range=torch.tensor(255.0)),
    dict(K=(np.float32(0.01), np.float32(0.03))),
    dict(K=torch.tensor([0.01, 0.03])),
    dict(win_sigma=np.float32(1.5)),
    dict(win_size=np.int64(7)),
    dict(win_size=np.int64(7), win=their_window(3, 7)),
    dict(data_range=np.float32(255), K=torch.tensor([0.01, 0.03]), win=their_window(3)),
], ids=_case_id)
def test_numpy_and_tensor_arguments_as_pytorch_msssim(fn, kwargs):
    """NumPy scalars and tensors where pytorch-msssim takes them: the same values."""
    x, y = image_pair((1, 3, 161, 163), negative_channel=False, seed=10)
    ours, theirs = getattr(compat_module, fn)(x, y, **kwargs), getattr(pytorch_msssim, fn)(x, y, **kwargs)
    assert_close(ours, theirs, DEFAULT_WINDOW_TOL)


@pytest.mark.parametrize("fn", ["ssim", "ms_ssim"])
@pytest.mark.parametrize("win", [False, True])
def test_nan_inputs_give_nan_as_pytorch_msssim(fn, win):
    x, y = image_pair((1, 3, 161, 163), negative_channel=False)
    x[0, 1, 70, 90] = float("nan")
    kwargs = dict(win=their_window(3)) if win else {}
    ours, theirs = getattr(compat_module, fn)(x, y, **kwargs), getattr(pytorch_msssim, fn)(x, y, **kwargs)
    assert torch.isnan(ours) and torch.isnan(theirs)


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize("fn", ["ssim", "ms_ssim"])
@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 171)), {}, "same dimensions"),
    (lambda: (torch.rand(3, 170, 170), torch.rand(3, 170, 170)), {}, "4-d"),
    (lambda: (torch.rand(1, 3, 4, 170, 170), torch.rand(1, 3, 4, 170, 170)), {}, "pytorch_msssim itself"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(win_size=10), "win_size"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(win=torch.rand(3, 1, 1, 4)), "odd"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(win=torch.rand(2, 1, 1, 5)), "win"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(win=torch.rand(3, 1, 2, 5)), "win"),
    (lambda: (torch.rand(1, 3, 10, 170), torch.rand(1, 3, 10, 170)), {}, "at least"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(K=(0.01,)), "K must be a pair"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(K=0.01), "K must be a pair"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(K=(-0.01, 0.03)), "k1"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)), dict(data_range=float("inf")), "data_range"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)),
     dict(data_range=0, win=torch.full((3, 1, 1, 5), 0.2)), "data_range"),
    (lambda: (torch.rand(1, 3, 170, 170), torch.rand(1, 3, 170, 170)),
     dict(K=(0.01, float("nan")), win=torch.full((3, 1, 1, 5), 0.2)), "k2"),
    (lambda: (torch.rand(1, 0, 170, 170), torch.rand(1, 0, 170, 170)), {}, "at least one channel"),
])
def test_bad_inputs_raise_value_error(fn, make, kwargs, match):
    x, y = make()
    with pytest.raises(ValueError, match=match):
        getattr(compat_module, fn)(x, y, **kwargs)


def test_ms_ssim_too_small_says_the_minimum_side():
    x, y = torch.rand(1, 3, 160, 200), torch.rand(1, 3, 160, 200)
    with pytest.raises(ValueError, match="at least 161x161"):
        ms_ssim(x, y)
    with pytest.raises(ValueError, match="at least 161x161"):
        MS_SSIM()(x, y)


@pytest.mark.parametrize("module", [SSIM, MS_SSIM])
def test_volumes_are_refused_at_construction(module):
    with pytest.raises(ValueError, match="spatial_dims"):
        module(spatial_dims=3)


def test_ssim_window_given_on_a_too_small_image():
    x, y = torch.rand(1, 1, 6, 9), torch.rand(1, 1, 6, 9)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(x, y, win=their_window(1, 7))
