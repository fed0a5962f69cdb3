"""SR networks: EDSR-baseline, RRDBNet (the ESRGAN generator, narrow by default) and a tiny demo net.

All map LR (B, 3, h, w) in [0, 1] to SR (B, 3, s h, s w), unclamped. Parameter names
follow the original code (EDSR-PyTorch's ``head/body/tail``, BasicSR's RRDBNet) so
their layouts are recognisable.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def _check_scale(name: str, scale: int, allowed) -> None:
    if scale not in allowed:
        raise ValueError(f"{name} supports scales {sorted(allowed)}, got {scale}")


class PixelShuffleUpsampler(nn.Sequential):
    """conv (C -> r^2 C) + PixelShuffle(r), once for x2/x3, twice (r = 2) for x4."""

    def __init__(self, scale: int, channels: int):
        layers = []
        for r in ((2, 2) if scale == 4 else (scale,)):
            layers += [_conv(channels, r * r * channels), nn.PixelShuffle(r)]
        super().__init__(*layers)


class ResBlock(nn.Module):
    """conv-ReLU-conv with a scaled identity skip (EDSR's ResBlock, no BatchNorm)."""

    def __init__(self, channels: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels), nn.ReLU(inplace=True), _conv(channels, channels))
        self.res_scale = res_scale

    def forward(self, x):
        return x + self.res_scale * self.body(x)


class EDSR(nn.Module):
    """EDSR (Lim et al. 2017); the defaults are EDSR-baseline: 16 blocks, 64 channels, res_scale 1."""

    def __init__(self, scale: int = 4, n_resblocks: int = 16, n_feats: int = 64, res_scale: float = 1.0):
        super().__init__()
        _check_scale("EDSR", scale, (2, 3, 4))
        self.scale = scale
        self.register_buffer("rgb_mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Sequential(_conv(3, n_feats))
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)], _conv(n_feats, n_feats))
        self.tail = nn.Sequential(PixelShuffleUpsampler(scale, n_feats), _conv(n_feats, 3))

    def forward(self, lr):
        x = self.head(lr - self.rgb_mean)
        x = x + self.body(x)
        return self.tail(x) + self.rgb_mean


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs, LeakyReLU(0.2), residual scaled by 0.2 (ESRGAN)."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = _conv(num_feat, num_grow_ch)
        self.conv2 = _conv(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = _conv(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = _conv(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = _conv(num_feat + 4 * num_grow_ch, num_feat)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x + 0.2 * x5


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """The ESRGAN generator (BasicSR names). ESRGAN itself is num_feat=64, num_block=23, num_grow_ch=32;
    the default here is a narrow variant that trains in reasonable time."""

    def __init__(self, scale: int = 4, num_feat: int = 32, num_block: int = 8, num_grow_ch: int = 16):
        super().__init__()
        _check_scale("RRDBNet", scale, (2, 4))
        self.scale = scale
        self.conv_first = _conv(3, num_feat)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = _conv(num_feat, num_feat)
        self.conv_up1 = _conv(num_feat, num_feat)
        self.conv_up2 = _conv(num_feat, num_feat) if scale == 4 else None
        self.conv_hr = _conv(num_feat, num_feat)
        self.conv_last = _conv(num_feat, 3)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, lr):
        feat = self.conv_first(lr)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        if self.conv_up2 is not None:
            feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class TinySR(nn.Module):
    """A few residual blocks predicting the residual over a bicubic upsampling: trains on a CPU in minutes."""

    def __init__(self, scale: int = 2, n_feats: int = 24, n_resblocks: int = 3):
        super().__init__()
        _check_scale("TinySR", scale, (2, 3, 4))
        self.scale = scale
        self.head = _conv(3, n_feats)
        self.body = nn.Sequential(*[ResBlock(n_feats) for _ in range(n_resblocks)])
        self.tail = nn.Sequential(PixelShuffleUpsampler(scale, n_feats), _conv(n_feats, 3))
        # Start close to the bicubic skip: the residual branch begins small.
        self.tail[-1].weight.data.mul_(0.1)
        nn.init.zeros_(self.tail[-1].bias)

    def forward(self, lr):
        x = self.head(lr)
        x = x + self.body(x)
        up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.tail(x)


NETWORKS = {"edsr": EDSR, "rrdb": RRDBNet, "tiny": TinySR}


def build_network(name: str, scale: int, **kwargs) -> nn.Module:
    """``name`` in ``NETWORKS`` ("edsr" = EDSR-baseline, "rrdb" = narrow RRDBNet, "tiny")."""
    if name not in NETWORKS:
        raise ValueError(f"unknown SR network {name!r}; expected one of {sorted(NETWORKS)}")
    return NETWORKS[name](scale=scale, **kwargs)


def freeze_parameters(module: nn.Module, patterns, other_name: Callable[[str], str] | None = None) -> list[str]:
    """Stop training the parameters whose name matches one of the fnmatch ``patterns``
    (``requires_grad=False``); returns their names.

    ``other_name(name)`` gives a second name a parameter is matched by (a model loaded
    through spandrel: the name in its file). Each pattern must match a parameter, and at
    least one parameter must stay trainable (``ValueError`` otherwise).
    """
    named = list(module.named_parameters())
    names = {n: {n, other_name(n)} if other_name else {n} for n, _ in named}
    frozen = set()
    for pattern in patterns:
        hits = {n for n, aliases in names.items() if any(fnmatch.fnmatchcase(a, pattern) for a in aliases)}
        if not hits:
            examples = ", ".join(sorted({a for aliases in names.values() for a in aliases})[:4])
            raise ValueError(f"--freeze {pattern!r} matches no parameter (names look like {examples}, ...)")
        frozen |= hits
    if frozen and len(frozen) == len(named):
        raise ValueError(f"--freeze {' '.join(patterns)} freezes every parameter: nothing would train")
    for n, p in named:
        if n in frozen:
            p.requires_grad_(False)
    return [n for n, _ in named if n in frozen]
