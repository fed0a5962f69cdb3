"""The settings: every EPBAN_ name in the code is a documented setting, read in epban/settings.py only."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from epban import settings

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("epban", "kernels", "csrc", "benches", "scripts", "tests")
SUFFIXES = {".py", ".cpp", ".cu", ".h", ".cuh", ".sh"}
NAME = re.compile(r"\bEPBAN_[A-Z0-9_]+")


def _code_files():
    yield ROOT / "setup.py"
    yield ROOT / "Makefile"
    for d in CODE_DIRS:
        for path in (ROOT / d).rglob("*"):
            if path.suffix in SUFFIXES and path.is_file():
                yield path


def _documented() -> set:
    return set(NAME.findall((ROOT / "docs" / "settings.md").read_text()))


def test_every_name_in_the_code_is_documented():
    documented = _documented()
    used = {}
    for path in _code_files():
        for name in NAME.findall(path.read_text(errors="replace")):
            used.setdefault(name, path.relative_to(ROOT))
    missing = {n: str(p) for n, p in used.items() if n not in documented}
    assert not missing, f"EPBAN_ names not in docs/settings.md: {missing}"


def test_the_table_and_the_module_agree_and_stay_few():
    assert set(settings.SETTINGS) == _documented()
    assert len(settings.SETTINGS) <= 8


def test_only_the_settings_module_reads_the_environment_for_them():
    """No other module reads an EPBAN_ variable (tests and checks may set one to force a choice)."""
    reader = re.compile(r"(environ\.get\(|environ\[|getenv\(|environ\.setdefault\()\s*[\"']EPBAN_")
    offenders = [str(p.relative_to(ROOT)) for p in _code_files()
                 if p.name not in ("settings.py", "test_settings.py") and reader.search(p.read_text(errors="replace"))]
    assert not offenders


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("EPBAN_FP32_PRECISION", "fp16")
    with pytest.raises(ValueError, match="EPBAN_FP32_PRECISION"):
        settings.fp32_precision("ieee")
    monkeypatch.setenv("EPBAN_SSIM_CUDA_BACKWARD", "tiles")
    with pytest.raises(ValueError, match="EPBAN_SSIM_CUDA_BACKWARD"):
        settings.ssim_cuda_backward()


def test_defaults(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert settings.fp32_precision("tf32x3") == "tf32x3"
    assert settings.ssim_cuda_backward() == "auto"
    assert settings.build_extension() and settings.build_cuda() and not settings.test_compile()
