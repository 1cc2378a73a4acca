"""Suite-wide set-up: where kernels run, and the `gpu` marker.

Without CUDA, ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors. With CUDA the
interpreter stays off and the ``backend="triton"`` tests put their pools on the GPU (through
``kvtest.kernel_device`` / ``pool_on``), running the compiled kernels against the same CPU
oracles; GPU-only tests are marked ``@pytest.mark.gpu`` and skipped, visibly, without CUDA.
"""

import os

import pytest
import torch

# Must precede any import of cpkv.kernels: @triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # Mooncake logs every transfer at INFO


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"kernels: compiled Triton on {torch.cuda.get_device_name(0)}"
    return "kernels: Triton interpreter on CPU tensors (no CUDA device)"


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where ``backend="triton"`` runs in this suite: cuda where present, else the CPU."""
    from kvtest import KERNEL_DEVICE

    return KERNEL_DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
