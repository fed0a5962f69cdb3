"""Helpers shared by the fused ops' tests."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_calls(monkeypatch, module, *names) -> list:
    """Records each call of ``module.<name>`` (a fused path's launcher) by name, in call order,
    so that a test cannot pass on the reference path."""
    calls = []
    for name in names:
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=launch: calls.append(_n) or _f(*a))
    return calls


def compile_for_sm90(script: str, tmp_path, compiled: int) -> None:
    """Runs ``script`` (which compiles Triton kernels through the whole NVIDIA pipeline, ptxas
    included, with epban.testing.kernel_resources, and prints "compiled" per kernel) in a fresh
    process with the interpreter off, and checks that ``compiled`` kernels were."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == compiled, result.stdout
