"""Long-format CSV rows with provenance (../shared/BENCHMARKS.md), for benchmarks and the demo."""

from __future__ import annotations

import csv
import datetime
import importlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the folder holding cpkv/, benchmarks/, plots/
COLUMNS = ["op", "provider", "shape", "page_size", "tokens", "pattern", "metric", "unit",
           "p50", "p20", "p80", "device", "torch", "triton", "mooncake", "git_sha", "timestamp"]


def quantiles(values) -> tuple[float, float, float]:
    """(p50, p20, p80) of repeated measurements, as every sweep and the demo report them
    (torch's linear interpolation, float64)."""
    q = torch.tensor(list(values), dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(x) for x in q)


def checkout() -> Path | None:
    """The source checkout cpkv runs from (an editable install, or PYTHONPATH), else None (an
    installed copy: its parent folder is site-packages, nothing to ask git about)."""
    return ROOT if (ROOT / "pyproject.toml").is_file() else None


def results_dir() -> Path:
    """Where sweeps write their CSVs by default: the checkout's ``benchmarks/results``, or
    ``./cpkv-results`` for an installed copy (never into site-packages)."""
    root = checkout()
    return root / "benchmarks" / "results" if root else Path.cwd() / "cpkv-results"


def figures_dir() -> Path:
    """Where ``cpkv plot`` writes PNGs by default: the checkout's ``plots/`` (the README shows
    them), or beside the CSVs for an installed copy."""
    root = checkout()
    return root / "plots" if root else results_dir()


class CompanionError(RuntimeError):
    """The `benchmarks` or `plots` package that ships with cpkv is missing or shadowed."""


def companion(package: str, module: str):
    """Import ``package.module`` from the `benchmarks`/`plots` package installed with cpkv
    (beside it, in a checkout or in site-packages), refusing a same-named package from
    elsewhere on sys.path (e.g. the current directory's). A missing dependency of the module
    raises as Python says (ModuleNotFoundError naming it)."""
    try:
        mod = importlib.import_module(f"{package}.{module}")
    except ModuleNotFoundError as e:
        if e.name not in (package, f"{package}.{module}"):
            raise
        raise CompanionError(f"the {package!r} package that ships with cpkv is not installed "
                             f"(reinstall cpkv)") from None
    where = Path(mod.__file__).resolve().parents[1]
    if where != ROOT:
        raise CompanionError(f"{package}.{module} was imported from {where}, not from cpkv's "
                             f"{ROOT}: another {package!r} package shadows it")
    return mod


def git_sha() -> str:
    """The checkout's short commit, or "unknown" (an installed copy, or git is missing)."""
    root = checkout()
    if root is None or not (root / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=root, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or "unknown"


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
    mooncake = _version("mooncake-transfer-engine") or _version(
        "mooncake-transfer-engine-non-cuda")
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mooncake": mooncake,
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
