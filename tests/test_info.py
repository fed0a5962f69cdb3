"""``epban.info()``: every op of the registry, the backend ``auto`` takes per device, its kernels."""
import torch

import epban
from epban.info import OP_ORDER

OPS = ("ssim", "ms_ssim", "axial_attention", "deform_conv", "bias_act", "stem_pool", "normalise")


def test_info_lists_every_op():
    ops = epban.info()["ops"]
    assert set(OPS) == set(OP_ORDER)
    assert tuple(ops) == OPS, f"registered: {sorted(ops)}"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name, op in ops.items():
        assert list(op["auto"]) == devices, name
        assert all(backend in ("fused", "reference", "gather") for backend in op["auto"].values()), (name, op)
        assert op["kernels"], name


def test_auto_backends_on_cpu():
    ops = epban.info()["ops"]
    assert ops["deform_conv"]["auto"]["cpu"] == "gather"
    for name in ("bias_act", "stem_pool", "normalise"):  # Triton on CUDA only: the interpreter is for tests
        assert ops[name]["auto"]["cpu"] == "reference"


def test_info_as_text_names_every_op():
    text = epban.info(as_text=True)
    for name in epban.info()["ops"]:
        assert name in text
