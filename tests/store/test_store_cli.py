"""`cpkv demo --store`, `cpkv bench store` and `cpkv plot store` from the command line."""

import csv
import signal
import subprocess
import sys

import pytest
from mp import alive, child_pids, wait_for

from cpkv.report import COLUMNS

pytestmark = [pytest.mark.mp, pytest.mark.slow]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cpkv.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_store_tiny():
    r = cli("demo", "--store", "--shape", "C", "--tokens", "70", "--page-size", "16",
            "--layers", "2", "--cp", "2", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| put, CP rank 0   |        [0, 2) |" in r.stdout
    assert "| put, CP rank 1   |        [2, 4) |" in r.stdout
    assert "4 of 4" in r.stdout and "every byte verified" in r.stdout
    assert "2nd put skipped 2" in r.stdout


def test_demo_store_needs_a_page_per_rank():
    r = cli("demo", "--store", "--tokens", "16", "--page-size", "16", "--cp", "2")
    assert r.returncode == 2 and "a full store page per CP rank (32), got 16" in r.stderr


def test_bench_and_plot_store(tmp_path):
    out = tmp_path / "store.csv"
    r = cli("bench", "store", "--quick", "--shapes", "C", "--page-sizes", "16", "--repeats",
            "1", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    with out.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    providers = {r["provider"] for r in rows}
    assert providers == {"cpkv-put", "mooncake-put", "cpkv-get", "mooncake-get", "cpkv-stream",
                         "cpkv"}
    assert {r["metric"] for r in rows} == {"time", "bandwidth", "ratio_to_anchor", "keys",
                                           "us_per_key", "time_first", "first_fraction",
                                           "key_us"}
    assert {r["provider"] for r in rows if r["metric"] == "ratio_to_anchor"} == {
        "cpkv-put", "cpkv-get", "cpkv-stream"}
    assert all(r["device"] and r["git_sha"] and r["mooncake"] and float(r["p50"]) > 0
               for r in rows)
    r = cli("plot", "store", "--results", str(tmp_path), "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "store.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_stops_writers_and_master():
    proc = subprocess.Popen([sys.executable, "-m", "cpkv.cli", "demo", "--store", "--shape", "A",
                             "--tokens", "4096", "--page-size", "1", "--layers", "4",
                             "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the master is up; the writers are being spawned
            if "mooncake_master on" in line:
                break
        def started():
            assert proc.poll() is None, "the demo exited before its writers started"
            return len(children := child_pids(proc.pid)) >= 3 and children  # master + 2

        children = wait_for(started, 60, "the master and 2 writers started", interval=0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        assert "interrupted" in proc.stderr.read()
        wait_for(lambda: not any(alive(c) for c in children), 30,
                 f"every one of the demo's processes {sorted(children)} gone after Ctrl-C",
                 interval=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
