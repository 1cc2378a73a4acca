"""Timing, page ids and fills shared by every sweep (../shared/BENCHMARKS.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from cpkv.report import quantiles, results_dir

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # Mooncake logs every transfer at INFO

RESULTS = results_dir()


def measure(fn: Callable[[], object], device: torch.device, *, repeats: int = 7,
            warmup: int = 1) -> tuple[float, float, float]:
    """(p50, p20, p80) seconds of fn. GPU: triton's do_bench; CPU: wall-clock repeats."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return tuple(m / 1e3 for m in ms)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return quantiles(times)


def random_fill(cache) -> None:
    """Random bytes in every pool buffer: never time zeros."""
    for layers in cache.buffers.values():
        for t in layers:
            t.view(torch.uint8).random_(0, 256) if t.dtype != torch.uint8 else t.random_(0, 256)


def page_ids(pattern: str, n_pages: int, pool_pages: int, device, seed: int = 0) -> torch.Tensor:
    """Fragmented: a random choice over the whole pool; contiguous: a fresh run."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "fragmented":
        ids = torch.randperm(pool_pages, generator=g)[:n_pages]
    elif pattern == "contiguous":
        ids = torch.arange(n_pages)
    else:
        raise ValueError(f"pattern: expected 'fragmented' or 'contiguous', got {pattern!r}")
    return ids.to(device=device, dtype=torch.int32)
