"""Suite-wide set-up: the Triton interpreter on CPU machines, and the `gpu` marker."""

import os

import pytest
import torch

# Must precede any import of cpkv.kernels: @triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # Mooncake logs every transfer at INFO


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
