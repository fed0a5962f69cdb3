"""Benchmark set-up: devices to run on, and a synchronising wrapper so CUDA times are real."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
