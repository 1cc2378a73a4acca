"""Timing, provenance and long-format CSV output shared by every sweep (../shared/BENCHMARKS.md)."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["op", "provider", "shape", "page_size", "tokens", "pattern", "metric", "unit",
           "p50", "p20", "p80", "device", "torch", "triton", "mooncake", "git_sha", "timestamp"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def provenance(device: torch.device) -> dict:
    """The columns every row of one run shares: device, versions, git sha, run timestamp."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=RESULTS.parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    mooncake = _version("mooncake-transfer-engine") or _version(
        "mooncake-transfer-engine-non-cuda")
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mooncake": mooncake,
        "git_sha": sha,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8],
                                                                       dtype=torch.float64))
    return tuple(float(x) for x in q)


class CsvWriter:
    """Appends rows (with the run's provenance) to a long-format CSV, header on first write."""

    def __init__(self, path: Path, prov: dict):
        self.path, self.prov = Path(path), prov
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0

    def write(self, **row) -> None:
        row = {**row, **self.prov}
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"row is missing columns {sorted(missing)}")
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: row[k] for k in COLUMNS})
        self.rows += 1

    def timing(self, *, metric_base: dict, seconds: tuple[float, float, float],
               moved_bytes: int, ceiling_s: float | None = None) -> None:
        """Write time (ms), bandwidth (GB/s over moved_bytes) and, if given, ratio to ceiling."""
        p50, p20, p80 = seconds
        self.write(**metric_base, metric="time", unit="ms", p50=p50 * 1e3, p20=p20 * 1e3,
                   p80=p80 * 1e3)
        # Faster times give higher bandwidth, so p20 of bandwidth comes from p80 of time.
        self.write(**metric_base, metric="bandwidth", unit="GB/s", p50=moved_bytes / p50 / 1e9,
                   p20=moved_bytes / p80 / 1e9, p80=moved_bytes / p20 / 1e9)
        if ceiling_s is not None:
            self.write(**metric_base, metric="ratio_to_copy", unit="x", p50=ceiling_s / p50,
                       p20=ceiling_s / p80, p80=ceiling_s / p20)


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
