"""Shared test set-up.

Without a CUDA GPU, Triton kernels are exercised on CPU tensors by its interpreter, which
must be switched on before anything imports triton.
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/dev/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng_seed():
    """A fresh seed per test run (printed on failure) so kernels see new inputs each time."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: tiny tensors gain nothing from
    threads, and on a shared CPU extra threads only wait for each other. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
