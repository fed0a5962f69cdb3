"""SR models of other projects (Real-ESRGAN's RRDBNet, SwinIR, HAT, SPAN, ...), loaded through spandrel.

spandrel (the model loader of the chaiNNer project; ``pip install epban[sr]``) recognises an
architecture and its hyperparameters from a state dict alone. :func:`load_spandrel` reads a
model file with it and checks that the model can be trained here: an image-to-image model,
RGB in and out, the scale asked for. :func:`save_spandrel` writes the fine-tuned weights back
under the file's own state-dict names (and the same wrapping key, e.g. BasicSR's
``params_ema``), so the result loads through spandrel again and drops into the tools that
read the original file.

Some architectures rename the file's tensors when they load them (spandrel's ESRGAN turns
BasicSR's ``body.0.rdb1.conv1.weight`` into ``model.1.sub.0.RDB1.conv1.0.weight``). Which
model tensor came from which file tensor is found by loading the architecture a second
time from a probe: the file's state dict with every floating-point tensor replaced by
distinct random values of the same shape; each model tensor is then recognised by its
values.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INSTALL_HINT = "pip install 'epban[sr]' (or pip install spandrel)"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")
SUFFIXES = TORCH_SUFFIXES + (".safetensors",)
PREFIXES = ("module.", "netG.")  # common prefixes spandrel removes from a file's names
# The keys spandrel looks for a wrapped state dict under, in its order (BasicSR: "params_ema" before "params").
UNWRAP_KEYS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")


class SpandrelMissing(ImportError):
    """``--net-weights`` needs spandrel, which is not installed."""


def _spandrel():
    try:
        import spandrel
    except ImportError:
        raise SpandrelMissing(f"loading an SR model file needs spandrel: {INSTALL_HINT}") from None
    return spandrel


class SizePadded(nn.Module):
    """Runs ``net`` on inputs padded to the architecture's size requirements (spandrel's
    ``SizeRequirements``: a minimum side, a multiple) and crops the output back, keeping
    gradients; without requirements it is ``net`` itself. The output is not clamped."""

    def __init__(self, net: nn.Module, scale: int, minimum: int = 0, multiple_of: int = 1, square: bool = False):
        super().__init__()
        self.net, self.scale = net, scale
        self.minimum, self.multiple_of, self.square = minimum, multiple_of, square

    def padding(self, h: int, w: int) -> tuple[int, int]:
        """(pad_h, pad_w) that satisfy the requirements."""
        m = self.multiple_of
        th, tw = -(-max(h, self.minimum) // m) * m, -(-max(w, self.minimum) // m) * m
        if self.square:
            th = tw = max(th, tw)
        return th - h, tw - w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.padding(h, w)
        if not (ph or pw):
            return self.net(x)
        # reflect where it can (at most side - 1), replicate the rest: what spandrel's own call does
        rh, rw = min(ph, h - 1), min(pw, w - 1)
        x = F.pad(x, (0, rw, 0, rh), mode="reflect")
        x = F.pad(x, (0, pw - rw, 0, ph - rh), mode="replicate")
        return self.net(x)[..., : h * self.scale, : w * self.scale]


@dataclass
class SpandrelNet:
    """A model file read by spandrel, ready to fine-tune (``module``) and to write back (:func:`save_spandrel`)."""

    path: Path
    architecture: str  # spandrel's id, e.g. "ESRGAN", "SwinIR"
    scale: int
    module: SizePadded  # the model (``module.net``), padded to its size requirements
    tags: list[str] = field(default_factory=list)
    supports_bfloat16: bool = True
    file_names: dict[str, str] | None = None  # model state-dict name -> the file's name (None: the model's own)
    unused: dict[str, torch.Tensor] = field(default_factory=dict)  # file tensors the model does not hold
    wrapper: str | None = None  # the top-level key the file keeps its state dict under (BasicSR: "params_ema")
    prefix: str = ""  # a prefix every name in the file has ("module.")

    @property
    def description(self) -> str:
        tags = f" ({', '.join(self.tags)})" if self.tags else ""
        return f"{self.architecture}{tags} x{self.scale} from {self.path}"

    def file_name(self, model_name: str) -> str:
        """The file's name of a parameter of ``module.net``."""
        return self.prefix + (self.file_names or {}).get(model_name, model_name)


def _read(path: Path, spandrel) -> tuple[dict, str | None, str]:
    """(canonical state dict, wrapping key, prefix) of a model file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: not a model file spandrel reads (expected {', '.join(SUFFIXES)})")
    try:
        canonical = spandrel.ModelLoader().load_state_dict_from_file(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as a model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(canonical, dict) or not canonical:
        raise ValueError(f"{path}: holds no state dict")
    wrapper, prefix = None, ""
    if path.suffix.lower() in TORCH_SUFFIXES:
        try:  # the file's own layout, to write the result in it
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raw = None
        if isinstance(raw, dict):
            wrapper, prefix = _layout(raw, set(canonical))
    return canonical, wrapper, prefix


def _layout(raw: dict, names: set[str]) -> tuple[str | None, str]:
    """Which key of ``raw`` holds the state dict spandrel used (None: ``raw`` itself), and the
    prefix spandrel removed. Only that state dict is written back (not, say, an optimiser
    state beside it)."""
    nested = sorted((k for k, v in raw.items() if isinstance(v, dict)),
                    key=lambda k: UNWRAP_KEYS.index(k) if k in UNWRAP_KEYS else len(UNWRAP_KEYS))
    candidates = [(None, raw)] + [(k, raw[k]) for k in nested]
    for key, inner in candidates:
        keys = set(inner)
        for prefix in ("",) + PREFIXES:
            if keys == {prefix + n for n in names}:
                return key, prefix
    return None, ""


def _probe(state: dict, seed: int = 0) -> dict:
    """``state`` with each floating-point tensor of more than one element replaced by distinct random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1:
            out[k] = torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
        else:
            out[k] = v
    return out


def _fingerprint(t: torch.Tensor) -> tuple:
    flat = t.detach().flatten()
    return (tuple(t.shape), tuple(flat[:16].double().tolist()), float(flat.double().sum()))


def _file_names(spandrel, canonical: dict, model: nn.Module, architecture: str) -> dict[str, str] | None:
    """Model state-dict name -> file name, or None where the model's names cannot be traced to the file's."""
    model_state = model.state_dict()
    if set(model_state) == set(canonical):
        return {k: k for k in model_state}
    probe = _probe(canonical)
    try:
        traced = spandrel.ModelLoader().load_from_state_dict(dict(probe))
    except Exception:
        return None
    if traced.architecture.id != architecture:
        return None
    by_value: dict[tuple, list[str]] = {}
    for name, t in probe.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
            by_value.setdefault(_fingerprint(t), []).append(name)
    names = {}
    for name, t in traced.model.state_dict().items():
        if name in canonical and not (t.is_floating_point() and t.numel() > 1):
            names[name] = name  # kept as it was: integer buffers, scalars
            continue
        found = by_value.get(_fingerprint(t), [])  # compared in float64: exact for a float32 model of a float16 file
        if len(found) != 1:
            return None
        names[name] = found[0]
    if len(set(names.values())) != len(names):
        return None
    return names


def load_spandrel(path: str | Path, *, scale: int | None = None) -> SpandrelNet:
    """Read an SR model file through spandrel; its architecture, scale and weights.

    ``scale``, when given, must be the model's. Errors (``ValueError``, naming the file): a
    file spandrel does not recognise, a model that is not image-to-image (inpainting), one
    whose input or output is not RGB (3 channels), a scale other than ``scale``.
    """
    spandrel = _spandrel()
    path = Path(path)
    canonical, wrapper, prefix = _read(path, spandrel)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(dict(canonical))
    except spandrel.UnsupportedModelError:
        raise ValueError(f"{path}: spandrel does not recognise this model's architecture "
                         f"(its {len(canonical)} tensors begin {', '.join(list(canonical)[:3])})") from None
    except Exception as exc:
        raise ValueError(f"{path}: spandrel cannot load it ({type(exc).__name__}: {exc})") from None
    arch = descriptor.architecture.id
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ValueError(f"{path}: a {arch} model ({descriptor.purpose}) is not image-to-image; "
                         "only SR models can be fine-tuned")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise ValueError(f"{path}: a {arch} model with {descriptor.input_channels} input and "
                         f"{descriptor.output_channels} output channels; SR training needs RGB (3 and 3)")
    if scale is not None and descriptor.scale != scale:
        raise ValueError(f"{path}: an x{descriptor.scale} {arch} model, but the scale asked for is x{scale}; "
                         f"pass --scale {descriptor.scale} or another model")
    if descriptor.scale not in (2, 3, 4):
        raise ValueError(f"{path}: an x{descriptor.scale} {arch} model ({descriptor.purpose}); "
                         "SR training needs x2, x3 or x4")
    model = descriptor.model
    names = _file_names(spandrel, canonical, model, arch)
    if names is None:  # written back under the model's own names, which spandrel loads too
        unused, prefix = {}, ""
    else:
        used = set(names.values())
        unused = {k: v for k, v in canonical.items() if k not in used}
    req = descriptor.size_requirements
    module = SizePadded(model, descriptor.scale, req.minimum, req.multiple_of, req.square)
    return SpandrelNet(path=path, architecture=arch, scale=descriptor.scale, module=module.train(),
                       tags=list(descriptor.tags), supports_bfloat16=bool(descriptor.supports_bfloat16),
                       file_names=names, unused=unused,
                       wrapper=wrapper, prefix=prefix)


@torch.no_grad()
def refresh_inference_weights(net: SpandrelNet) -> None:
    """One eval-mode forward on a small input: architectures that re-parameterise for inference
    (SPAN folds its training branches into ``eval_conv``) write those weights then."""
    module = net.module
    was_training = module.training
    module.eval()
    p = next(module.parameters())
    side = max(16, module.minimum)
    module(torch.zeros(1, 3, side, side, device=p.device, dtype=p.dtype))
    module.train(was_training)


def state_dict_for_file(net: SpandrelNet) -> dict[str, torch.Tensor]:
    """The weights of ``net.module`` under the file's names (and its tensors the model does not use)."""
    refresh_inference_weights(net)
    out = {}
    for name, t in net.module.net.state_dict().items():
        out[net.file_name(name)] = t.detach().cpu().clone()
    for name, t in net.unused.items():
        out.setdefault(net.prefix + name, t)
    return out


def save_spandrel(net: SpandrelNet, out_dir: str | Path) -> Path:
    """Write the fine-tuned weights as ``out_dir/net.pth`` (``net.safetensors`` for a safetensors
    input) in the input file's layout; returns the path."""
    state = state_dict_for_file(net)
    out_dir = Path(out_dir)
    if net.file_names is None:
        warnings.warn(f"{net.path}: the {net.architecture} model's tensor names could not be traced to the "
                      "file's; the result is written under the model's own names", stacklevel=2)
    if net.path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        path = out_dir / "net.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    else:
        path = out_dir / "net.pth"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({net.wrapper: state} if net.wrapper is not None else state, tmp)
    tmp.replace(path)
    return path
