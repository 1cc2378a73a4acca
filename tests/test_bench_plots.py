"""`cpkv bench <sweep> --quick` writes complete rows; `cpkv plot` turns them into PNGs."""

import csv
import subprocess
import sys

import pytest

from cpkv.report import COLUMNS

pytestmark = [pytest.mark.mp, pytest.mark.slow]

SWEEPS = {
    "kernels": ["--quick", "--shapes", "B", "--page-sizes", "16", "--repeats", "1"],
    "cp": ["--quick", "--shapes", "C", "--repeats", "1"],
    "transfer": ["--quick", "--shapes", "C", "--page-sizes", "1,16", "--repeats", "1"],
    "dcp": ["--quick", "--shapes", "C"],
    "serve": ["--smoke"],
}
PROVENANCE = ["device", "torch", "triton", "mooncake", "git_sha", "timestamp"]


def cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "cpkv.cli", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    for sweep, args in SWEEPS.items():
        cli("bench", sweep, *args, "--out", str(d / f"{sweep}.csv"))
    return d


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_quick_sweep_rows_carry_provenance(results, sweep):
    with (results / f"{sweep}.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert rows, "no rows"
    for r in rows:
        for col in PROVENANCE:
            assert r[col], f"{sweep}: empty {col} in {r}"
        assert float(r["p50"]) > 0, r
    assert {r["metric"] for r in rows} >= {
        "dcp": {"time", "descriptors", "speedup"},
        "serve": {"requests_per_s", "latency_p50", "latency_p99", "ratio_to_raw", "stage_pack",
                  "stage_wire", "stage_unpack", "stage_other"},
    }.get(sweep, {"time", "bandwidth"})


@pytest.mark.parametrize("figure", ["kernels", "transfer", "cp", "dcp", "serve"])
def test_plot_from_small_csv(results, tmp_path, figure):
    cli("plot", figure, "--results", str(results), "--out", str(tmp_path))
    png = tmp_path / f"{figure}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # axes, lines and labels, not an empty canvas


def test_plot_without_results_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cpkv.cli", "plot", "kernels", "--results",
                        str(tmp_path), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no results yet" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
