"""What both demos share: the optional extras they need (checked before any set-up), seeded
bytes, and how many torch threads each of their processes gets."""

from __future__ import annotations

import importlib
import os

import torch

_MOONCAKE = ("pip install 'cpkv[cpu]' (or 'cpkv[gpu]' where CUDA exists) and Debian's "
             "libibverbs1 librdmacm1")
# module -> (what it is, how to get it). The transfer demo needs the engine, crc32c (for its
# CRC32C checksums, on by default) and matplotlib; the store demo Mooncake Store.
EXTRAS = {
    "mooncake.engine": ("Mooncake's transfer engine", _MOONCAKE),
    "mooncake.store": ("Mooncake Store", _MOONCAKE),
    "crc32c": ("crc32c for --checksum (on by default)",
               "pip install 'cpkv[integrity]', or pass --no-checksum"),
    "matplotlib": ("matplotlib for its figure (demo.png)", "pip install 'cpkv[plot]'"),
}


def missing_extra(modules) -> str | None:
    """The first of ``modules`` (keys of `EXTRAS`) that does not import, as one line saying
    what needs it and how to install it; None when all import."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            what, how = EXTRAS[name]
            return f"needs {what}, which does not import ({e}): {how}"
    return None


def quiet_native_logs() -> None:
    """Mooncake logs every transfer at INFO; the demo's own progress is what a user reads."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")


def share_cores(processes: int) -> None:
    """This process's share of the cores for torch's thread pool: ``processes`` processes share
    the machine, and oversubscribed pools thrash (a parallel region waits for its slowest
    thread; measured: the decode rank's unpack with every core's worth of threads took 1.5-2x
    as long on a loaded 2-core machine as with its share)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def fill_random(t: torch.Tensor, generator: torch.Generator) -> None:
    """Seeded random bytes in ``t`` (any dtype: written through a uint8 view)."""
    b = t.view(torch.uint8)
    b.copy_(torch.randint(0, 256, b.shape, generator=generator, dtype=torch.uint8))
