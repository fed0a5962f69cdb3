"""Efficient-PBAN, as docs/architecture.md describes it; module names are the authors' state-dict names.

    sr, hr ─ normalise ─ stem (shared ResNet-34 conv1..layer2) ─ layer2_1 / layer2_2 (one shared ResNet layer3)
           ─ block2: q/k/v convs, GMDC on the queries, bi-directional axial attention, SE gate,
                     residual, after_block1/2 (conv s2 + BN + ReLU)
           ─ pool1/pool2 (2x2) ─ fc11/fc12 ─ fc21/fc22 ─ cat ─ fc ─ out ─ score (B,)
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock
from epban.ops._checks import check_image_pair
from epban.ops.axial_attention import SIGMA_SCOPES, bi_axial_attention
from epban.ops.deform_conv import multi_branch_deform_conv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The authors' RealSRQ statistics (docs/architecture.md, "Normalisation").
REALSRQ_SR_MEAN = (0.05605867, 0.050786886, 0.04435081)
REALSRQ_SR_STD = (0.028125687, 0.027141795, 0.02876606)
REALSRQ_HR_MEAN = (0.05608858, 0.050779864, 0.044556625)
REALSRQ_HR_STD = (0.027764285, 0.026925579, 0.028313829)

TORCHVISION_RESNET34_FILE = "resnet34-b627a593.pth"  # torchvision ResNet34_Weights.IMAGENET1K_V1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "epban.EfficientPBAN"
FORMAT_VERSION = 1
# Stride of the feature map the attention sees; the pair needs at least 2x2 of it so a
# per-image std has two logits to work with.
FEATURE_STRIDE = 16
MIN_INPUT_SIZE = 2 * FEATURE_STRIDE
# Scoring refuses inputs beyond this range (with its finite check): values there are not an
# image in [0, 1] with some overshoot but, most likely, one in 0..255.
INPUT_RANGE = (-0.5, 1.5)


@dataclass
class PBANConfig:
    """Architecture and preprocessing of an EfficientPBAN; saved beside its weights.

    Checked when made (``ValueError`` naming the field): widths and block counts positive,
    ``stem_width`` a multiple of 4, GMDC kernel sizes odd, two dropout rates in [0, 1], three
    normalisation values per image (std positive), ``score_range`` = (low, high) with
    high > low. Lists are stored as tuples.
    """

    stem_width: int = 64  # ResNet conv1/layer1 width; layer2 = 2x, layer3 (the attention's C) = 4x
    blocks: tuple[int, int, int] = (3, 4, 6)  # BasicBlocks in ResNet layer1, layer2, layer3
    gmdc_kernel_sizes: tuple[int, ...] = (3, 5, 7, 9)
    pixel_gate_width: int = 32
    head_widths: tuple[int, int, int] = (512, 128, 256)  # fc11/fc12, fc21/fc22, fc
    dropout: tuple[float, float] = (0.3, 0.2)
    sigma_scope: str = "sample"
    sr_mean: tuple[float, float, float] = IMAGENET_MEAN
    sr_std: tuple[float, float, float] = IMAGENET_STD
    hr_mean: tuple[float, float, float] = IMAGENET_MEAN
    hr_std: tuple[float, float, float] = IMAGENET_STD
    score_range: tuple[float, float] = (0.0, 1.0)  # the scale of the training scores; PBANLoss rescales by it
    name: str = "custom"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        self.validate()

    @property
    def channels(self) -> int:
        return 4 * self.stem_width

    @classmethod
    def official(cls, **overrides) -> "PBANConfig":
        """The authors' architecture with their RealSRQ normalisation (for their checkpoints)."""
        base = dict(
            name="official",
            sr_mean=REALSRQ_SR_MEAN,
            sr_std=REALSRQ_SR_STD,
            hr_mean=REALSRQ_HR_MEAN,
            hr_std=REALSRQ_HR_STD,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def resnet34(cls, **overrides) -> "PBANConfig":
        """The authors' architecture with ImageNet normalisation: the default for a new metric."""
        return cls(**{"name": "resnet34", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "PBANConfig":
        """Same structure, narrow and shallow: trains on a CPU in minutes (demos, tests)."""
        base = dict(
            name="tiny", stem_width=16, blocks=(1, 1, 1), pixel_gate_width=8, head_widths=(64, 32, 32)
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PBANConfig":
        presets = {"official": cls.official, "resnet34": cls.resnet34, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown config preset {name!r}; expected one of {sorted(presets)}")
        return presets[name](**overrides)

    def validate(self) -> None:
        """ValueError naming the first field that cannot make a model."""

        def fail(name: str, expected: str):
            raise ValueError(f"PBANConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        if not _is_positive_int(self.stem_width) or self.stem_width % 4:
            fail("stem_width", "a positive multiple of 4 (the SE gate's 16 groups divide 4 * stem_width)")
        for name, count in (("blocks", 3), ("head_widths", 3)):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == count and all(map(_is_positive_int, value))):
                fail(name, f"{count} positive integers")
        if not _is_positive_int(self.pixel_gate_width):
            fail("pixel_gate_width", "a positive integer")
        k = self.gmdc_kernel_sizes
        if not (isinstance(k, (tuple, list)) and k and all(_is_positive_int(v) and v % 2 == 1 for v in k)):
            fail("gmdc_kernel_sizes", "one or more odd positive integers")
        if self.channels % len(k):
            fail("gmdc_kernel_sizes", f"as many branches as divide 4 * stem_width = {self.channels}")
        d = self.dropout
        if not (isinstance(d, (tuple, list)) and len(d) == 2 and all(_is_finite(p) and 0 <= p <= 1 for p in d)):
            fail("dropout", "2 rates in [0, 1] (after fc11/fc12 and after fc21/fc22)")
        if self.sigma_scope not in SIGMA_SCOPES:
            fail("sigma_scope", f"one of {SIGMA_SCOPES}")
        for name in ("sr_mean", "sr_std", "hr_mean", "hr_std"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(map(_is_finite, value))):
                fail(name, "3 finite numbers (RGB)")
            if name.endswith("std") and min(value) <= 0:
                fail(name, "positive")
        r = self.score_range
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and all(map(_is_finite, r)) and r[1] > r[0]):
            fail("score_range", "(low, high), finite, with high > low")
        if not isinstance(self.name, str):
            fail("name", "a string")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PBANConfig":
        """The config of ``to_dict`` (JSON lists become tuples); ValueError for unknown or bad fields."""
        if not isinstance(d, dict):
            raise ValueError(f"a PBANConfig is a dict of its fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PBANConfig fields {unknown}")
        return cls(**d)


def _is_positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def _is_finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class GMDC(nn.Module):
    """Multi-branch deformable convolution: one branch per kernel size, offsets from a 3x3 conv, 1x1 merge."""

    def __init__(self, channels: int, kernel_sizes=(3, 5, 7, 9)):
        super().__init__()
        branch = channels // len(kernel_sizes)
        self.kernel_sizes = tuple(kernel_sizes)
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(branch, channels, k, k)) for k in kernel_sizes])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(branch)) for _ in kernel_sizes])
        self.param_generators = nn.ModuleList([nn.Conv2d(channels, 2 * k * k, 3, padding=1) for k in kernel_sizes])
        self.merge_conv = nn.Conv2d(channels, channels, 1)
        self.backend = "auto"  # of the deformable convolution: "auto" | "reference" | "gather" | "fused"
        for w in self.weights:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.merge_conv.weight, a=math.sqrt(5))
        nn.init.zeros_(self.merge_conv.bias)
        # Offsets start at zero: each branch starts as a plain convolution.
        for gen in self.param_generators:
            nn.init.zeros_(gen.weight)
            nn.init.zeros_(gen.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = [gen(x) for gen in self.param_generators]
        out = multi_branch_deform_conv(x, offsets, list(self.weights), list(self.biases), backend=self.backend)
        return self.merge_conv(out)


class ChannelShuffle(nn.Module):
    """Mixes the three groups of each channel with a Linear(3, 3); channel index becomes c*3 + g."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.conv = nn.Conv2d(3, 3, 1)  # in the authors' state dict, unused by their forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c3, h, w = x.shape
        x = x.view(b, 3, c3 // 3, h, w).permute(0, 2, 3, 4, 1)
        x = self.linear(x).permute(0, 1, 4, 2, 3)
        return x.reshape(b, c3, h, w)


class SE(nn.Module):
    """Pixel and channel gating: SE(x) = x * z(x) * y(x)."""

    def __init__(self, channels: int, pixel_gate_width: int = 32):
        super().__init__()
        self.subchannel_before = nn.Sequential(nn.Conv2d(channels, 3 * channels, 1, groups=4), nn.Tanh())
        self.subchannel_after = nn.Sequential(nn.Conv2d(3 * channels, channels, 1), nn.Sigmoid())
        # Present in the authors' state dict, unused by their forward.
        self.subchannel = nn.Sequential(
            nn.Conv2d(channels, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, channels, 1, groups=16)
        )
        self.shuffle = ChannelShuffle()
        self.pixelse = nn.Sequential(
            nn.Conv2d(channels, pixel_gate_width, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(pixel_gate_width, 9, 3, padding=1),
            nn.PixelShuffle(3),
            nn.Tanh(),
            nn.Conv2d(1, 1, 3, stride=3, padding=1),
            nn.Sigmoid(),
        )

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(x, 1)
        return self.subchannel_after(self.shuffle(self.subchannel_before(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pixelse(x) * self.channel_gate(x)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BiAttentionBlock(nn.Module):
    """block2: SR queries attend to HR keys and HR queries to SR keys (docs/architecture.md, on block2)."""

    def __init__(self, channels: int, config: PBANConfig):
        super().__init__()
        conv = lambda: nn.Conv2d(channels, channels, 3, padding=1)  # noqa: E731
        # Registration order reproduces the authors' state-dict order.
        self.q1, self.q2, self.k1 = conv(), conv(), conv()
        self.br1 = GMDC(channels, config.gmdc_kernel_sizes)
        self.k2 = conv()
        self.br2 = GMDC(channels, config.gmdc_kernel_sizes)
        self.v1, self.v2 = conv(), conv()
        self.SE = SE(channels, config.pixel_gate_width)
        self.after_block1 = _conv_bn_relu(channels, 2 * channels, 2)
        self.after_block2 = _conv_bn_relu(channels, 2 * channels, 2)
        # upchannel=False variants: in the authors' state dict, unused by their forward.
        self.after_block3 = _conv_bn_relu(channels, channels, 1)
        self.after_block4 = _conv_bn_relu(channels, channels, 1)
        self.sigma_scope = config.sigma_scope
        self.attention_backend = "auto"

    def forward(self, f_sr: torch.Tensor, f_hr: torch.Tensor):
        q1, k1, v1 = self.br1(self.q1(f_sr)), self.k1(f_sr), self.v1(f_sr)
        q2, k2, v2 = self.br2(self.q2(f_hr)), self.k2(f_hr), self.v2(f_hr)
        out1, out2 = bi_axial_attention(
            q1, k1, v1, q2, k2, v2, sigma_scope=self.sigma_scope, backend=self.attention_backend
        )
        out1, out2 = self.SE(out1), self.SE(out2)
        return self.after_block1(out1 + f_sr), self.after_block2(out2 + f_hr)


def _resnet_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class EfficientPBAN(nn.Module):
    """Full-reference quality of a super-resolved image: ``model(sr, hr) -> scores (B,)``, higher is better.

    Inputs are RGB in [0, 1], (B, 3, H, W) with B >= 1 and H, W >= 32, any float dtype (cast
    to the model's after normalisation); each is normalised with its own statistics from the
    config. ``higher_is_better`` (pyiqa: ``lower_better``) and ``score_range`` (the scale of
    the scores it was trained on, from its config) describe the scores.
    """

    higher_is_better = True
    lower_better = False  # pyiqa's name for the same fact

    def __init__(self, config: PBANConfig | None = None):
        super().__init__()
        if config is None:
            config = PBANConfig()
        if not isinstance(config, PBANConfig):
            raise ValueError(f"config must be a PBANConfig (e.g. PBANConfig.tiny(), PBANConfig(**fields)), "
                            f"got {type(config).__name__}")
        config.validate()
        self.config = config
        w, c = config.stem_width, config.channels
        fc1, fc2, fc = config.head_widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            _resnet_layer(w, w, config.blocks[0], 1),
            _resnet_layer(w, 2 * w, config.blocks[1], 2),
        )
        self.block2 = BiAttentionBlock(c, config)
        # ONE module under two names, as in the reference: both keys appear in the state dict.
        self.layer2_1 = _resnet_layer(2 * w, c, config.blocks[2], 2)
        self.layer2_2 = self.layer2_1
        self.pool1 = nn.AdaptiveAvgPool2d((2, 2))
        self.pool2 = nn.AdaptiveAvgPool2d((2, 2))
        self.fc11 = nn.Linear(8 * c, fc1)
        self.fc12 = nn.Linear(8 * c, fc1)
        self.fc21 = nn.Linear(fc1, fc2)
        self.fc22 = nn.Linear(fc1, fc2)
        self.fc = nn.Linear(2 * fc2, fc)
        self.out = nn.Linear(fc, 1)
        self.drop1 = nn.Dropout(config.dropout[0])
        self.drop2 = nn.Dropout(config.dropout[1])
        for name in ("sr_mean", "sr_std", "hr_mean", "hr_std"):
            self.register_buffer(name, torch.tensor(getattr(config, name)).view(1, 3, 1, 1), persistent=False)

    @property
    def score_range(self) -> tuple[float, float]:
        """(low, high) of the scores the metric was trained on (``config.score_range``); a
        score may fall outside it."""
        return tuple(self.config.score_range)

    # -- the parts of the stem the authors keep frozen while training the metric --
    def frozen_stem_modules(self) -> list[nn.Module]:
        return [self.stem[0], self.stem[1], self.stem[4]]

    @property
    def deform_backend(self) -> str:
        return self.block2.br1.backend

    @deform_backend.setter
    def deform_backend(self, backend: str) -> None:
        self.block2.br1.backend = self.block2.br2.backend = backend

    @property
    def attention_backend(self) -> str:
        return self.block2.attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        self.block2.attention_backend = backend

    def check_inputs(self, sr: torch.Tensor, hr: torch.Tensor, check_finite: bool = True) -> None:
        """``check_score_inputs``: shapes always; with ``check_finite``, also the values (finite
        and within ``INPUT_RANGE``), in one host sync."""
        check_score_inputs(sr, hr, check_finite=check_finite)

    def normalise(self, sr: torch.Tensor, hr: torch.Tensor):
        """Each image normalised by its statistics, in the dtype of the model's weights."""
        dtype = self.stem[0].weight.dtype
        return ((sr - self.sr_mean) / self.sr_std).to(dtype), ((hr - self.hr_mean) / self.hr_std).to(dtype)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """Scores (B,). ``check_finite=False`` skips the value check (NaN, inf, and values beyond
        ``INPUT_RANGE``, which look like 0..255 images), which costs a host sync."""
        self.check_inputs(sr, hr, check_finite)
        sr, hr = self.normalise(sr, hr)
        f_sr = self.layer2_1(self.stem(sr))
        f_hr = self.layer2_2(self.stem(hr))
        f1, f2 = self.block2(f_sr, f_hr)
        f1 = self.pool1(f1).flatten(1)
        f2 = self.pool2(f2).flatten(1)
        f1 = self.drop1(F.relu(self.fc11(f1)))
        f2 = self.drop1(F.relu(self.fc12(f2)))
        f1 = self.drop2(F.relu(self.fc21(f1)))
        f2 = self.drop2(F.relu(self.fc22(f2)))
        x = self.fc(torch.cat([f1, f2], dim=1))
        return self.out(x).squeeze(1)

    # ------------------------------------------------------------------ weights
    def load_authors_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in the authors' naming, strictly; errors list missing and unknown keys."""
        state_dict = _strip_prefix(dict(state_dict), "module.")
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unknown = sorted(set(state_dict) - set(expected))
        if missing or unknown:
            raise ValueError(_key_report(missing, unknown))
        wrong = [
            f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
            for k, v in state_dict.items()
            if tuple(v.shape) != tuple(expected[k].shape)
        ]
        if wrong:
            raise ValueError("parameter shapes differ from this config:\n  " + "\n  ".join(wrong[:20]))
        for key in state_dict:
            if key.startswith("layer2_2.") and not key.endswith("num_batches_tracked"):
                twin = "layer2_1." + key[len("layer2_2."):]
                if not torch.equal(state_dict[key], state_dict[twin]):
                    warnings.warn(
                        f"{key} differs from {twin}; the two names are one shared module, so layer2_1's values are used"
                    )
                    break
        # Load layer2_2 first so that layer2_1's copy is the one the shared module keeps.
        ordered = {k: v for k, v in state_dict.items() if k.startswith("layer2_2.")}
        ordered.update({k: v for k, v in state_dict.items() if not k.startswith("layer2_2.")})
        with torch.no_grad():
            for key, value in ordered.items():
                expected[key].copy_(value)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_pretrained writes a directory; {directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        # safetensors refuses aliased tensors: the shared layer3 is stored once, under layer2_1.
        tensors = {
            k: v.detach().cpu().contiguous().clone()
            for k, v in self.state_dict().items()
            if not k.startswith("layer2_2.")
        }
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        tmp_weights = directory / (WEIGHTS_FILE + ".tmp")
        tmp_config = directory / (CONFIG_FILE + ".tmp")
        save_file(tensors, str(tmp_weights), metadata={"format": FORMAT_NAME})
        tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
        os.replace(tmp_config, directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        preset: str | None = None,
        config: PBANConfig | None = None,
        map_location="cpu",
        trusted: bool = False,
    ) -> "EfficientPBAN":
        """Load our format (a directory from ``save_pretrained``) or the authors' ``.pth`` file.

        A directory carries its own config (``preset`` and ``config`` are refused with one);
        every malformed file in it is a ``ValueError`` naming the file. The authors' file is a
        dict with ``model_state_dict`` or a bare state dict with their 358 names.
        ``preset="official"`` uses their RealSRQ normalisation; otherwise the config is
        ``config`` or the official architecture with ImageNet statistics. ``trusted=True``
        allows unpickling arbitrary objects (only for files you trust); ``map_location`` is
        ``torch.load``'s, for that file. The model is returned on the CPU, in eval mode.
        """
        if not isinstance(path, (str, os.PathLike)):
            what = "a module that is not an EfficientPBAN" if isinstance(path, nn.Module) else type(path).__name__
            raise ValueError(f"expected an EfficientPBAN or a checkpoint path, got {what}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.is_dir():
            if preset is not None or config is not None:
                raise ValueError(
                    f"{path} is a checkpoint directory, which carries its own config ({CONFIG_FILE}); "
                    "preset= and config= apply to the authors' .pth files only"
                )
            return cls._from_pretrained_dir(path)
        if preset is not None and config is not None:
            raise ValueError("give either preset or config, not both")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=not trusted)
        except Exception as exc:
            raise ValueError(f"cannot read checkpoint {path}: {_unreadable_checkpoint_reason(path, exc)}") from None
        state_dict = _extract_state_dict(obj, path)
        if config is None:
            config = PBANConfig.preset(preset) if preset else PBANConfig.resnet34()
        model = cls(config)
        try:
            model.load_authors_state_dict(state_dict)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return model.eval()

    @classmethod
    def _from_pretrained_dir(cls, directory: Path) -> "EfficientPBAN":
        from safetensors.torch import load_file

        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"{directory} is not an epban checkpoint: {p.name} is missing")
        model = cls(_read_config_file(cfg_path))
        try:
            tensors = load_file(str(w_path), device="cpu")  # the model is made on the CPU
        except Exception as exc:  # safetensors' own error type for a truncated or foreign file
            raise ValueError(f"{w_path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        tensors.update({"layer2_2." + k[len("layer2_1."):]: v for k, v in tensors.items() if k.startswith("layer2_1.")})
        try:
            model.load_authors_state_dict(tensors)
        except ValueError as exc:
            raise ValueError(f"{w_path}: {exc}") from None
        return model.eval()

    def load_imagenet_backbone(self, path: str | os.PathLike | None = None) -> None:
        """Initialise stem and layer3 from torchvision's ImageNet ResNet-34 file, read locally.

        ``path`` defaults to the torch hub cache (``$TORCH_HOME/hub/checkpoints``). Nothing is downloaded.
        """
        if self.config.stem_width != 64 or tuple(self.config.blocks) != (3, 4, 6):
            raise ValueError("ImageNet ResNet-34 weights need the ResNet-34 backbone (stem_width=64, blocks=(3, 4, 6))")
        if path is None:
            path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_RESNET34_FILE
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"ImageNet backbone weights not found at {path}. epban never downloads: copy torchvision's "
                f"{TORCHVISION_RESNET34_FILE} (ResNet34_Weights.IMAGENET1K_V1) there, or pass its path."
            )
        try:
            src = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read ImageNet backbone weights {path}: "
                             f"{_unreadable_checkpoint_reason(path, exc)}") from None
        if not isinstance(src, dict) or not all(isinstance(v, torch.Tensor) for v in src.values()):
            raise ValueError(f"{path}: expected torchvision's ResNet-34 state dict (a dict of tensors), "
                             f"got {type(src).__name__}")
        mapping = {"conv1.": "stem.0.", "bn1.": "stem.1.", "layer1.": "stem.4.", "layer2.": "stem.5.", "layer3.": "layer2_1."}
        own = self.state_dict()
        # Every stem and layer3 tensor must come from the file, with its shape: a file of another
        # network (or with prefixed names) would otherwise leave part of the backbone untouched.
        wanted = {prefix + key[len(target):]: key for prefix, target in mapping.items()
                  for key in own if key.startswith(target) and not key.endswith("num_batches_tracked")}
        missing = sorted(k for k in wanted if k not in src)
        wrong = sorted(k for k in wanted if k in src and tuple(src[k].shape) != tuple(own[wanted[k]].shape))
        if missing or wrong:
            detail = (f"{len(missing)} of its {len(wanted)} tensors missing (e.g. {', '.join(missing[:3])})" if missing
                      else f"shapes differ for {', '.join(wrong[:3])}")
            raise ValueError(f"{path} is not torchvision's ResNet-34 state dict: {detail}")
        with torch.no_grad():
            for key, target in wanted.items():
                own[target].copy_(src[key])


def _unreadable_checkpoint_reason(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in a few words (torch's own messages run to pages)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    # torch.save writes a zip archive (or, in old files, a pickle from protocol 2 on)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        return "not a PyTorch checkpoint file"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if "Weights only load failed" in first:
        return ("it holds objects other than tensors (EfficientPBAN.from_checkpoint(..., trusted=True) loads a "
                "file you trust)")
    return f"damaged or truncated ({type(exc).__name__}: {first.split('. ')[0] or 'no detail'})"


def check_score_inputs(sr: torch.Tensor, hr: torch.Tensor, *, check_finite: bool = True,
                       check_range: bool | None = None) -> None:
    """ValueError unless sr and hr are one shape of RGB float images, at least one image of
    ``MIN_INPUT_SIZE`` square, on one device. With ``check_finite``, also free of NaN and inf;
    with ``check_range`` (default: as ``check_finite``), within ``INPUT_RANGE``. The values are
    checked in one host sync (one min/max reduction per image batch)."""
    for name, t in (("sr", sr), ("hr", hr)):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] != 3:
            raise ValueError(f"{name} must have 3 (RGB) channels, got shape {tuple(t.shape)}")
    check_image_pair(sr, hr, name_x="sr", name_y="hr", same_dtype=False)  # an SR net under autocast may give bf16
    if sr.shape[0] == 0:
        raise ValueError(f"sr and hr hold no image (batch size 0, shape {tuple(sr.shape)})")
    h, w = sr.shape[-2:]
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(f"images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got {h}x{w}")
    check_range = check_finite if check_range is None else check_range
    if not (check_finite or check_range):
        return
    bounds = value_bounds(sr, hr)
    for name, (lo, hi) in zip(("sr", "hr"), bounds):
        if check_finite and not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if check_range and (lo < INPUT_RANGE[0] or hi > INPUT_RANGE[1]):
            raise ValueError(
                f"{name} has values in [{lo:.4g}, {hi:.4g}]: the model expects RGB in [0, 1], and values beyond "
                f"[{INPUT_RANGE[0]}, {INPUT_RANGE[1]}] look like 0..255 images (divide by 255); "
                "check_finite=False skips this check"
            )


def value_bounds(*tensors: torch.Tensor) -> list[tuple[float, float]]:
    """(min, max) of each tensor (NaN if it holds one), read in one host sync; each must be non-empty."""
    ends = [end.float() for t in tensors for end in torch.aminmax(t.detach())]
    flat = torch.stack(ends).tolist()
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _read_config_file(path: Path) -> PBANConfig:
    """The PBANConfig of a checkpoint directory's config.json; ValueError naming the file and the fault."""
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object with format, format_version and config, "
                         f"got a {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an {FORMAT_NAME} config (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not one this epban reads ({FORMAT_VERSION}); "
                         "was it written by a newer epban?")
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' entry (the model's PBANConfig fields)")
    try:
        return PBANConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: 'config': {exc}") from None


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _extract_state_dict(obj, path) -> dict:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor) or a dict with 'model_state_dict', got {type(obj).__name__}"
        )
    return obj


def _key_report(missing: list[str], unknown: list[str]) -> str:
    lines = ["the checkpoint does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:30]) + (" ..." if len(missing) > 30 else ""))
    if unknown:
        lines.append(f"  unknown keys ({len(unknown)}): " + ", ".join(unknown[:30]) + (" ..." if len(unknown) > 30 else ""))
    return "\n".join(lines)
