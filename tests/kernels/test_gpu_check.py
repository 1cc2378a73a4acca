"""scripts/gpu_check.sh: its argument handling, and the steps a CPU machine can run (--quick)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mp

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(*args, env=None, timeout=240):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args", [(), ("--quick",), ("a", "--fast"), ("a", "--quick", "b")])
def test_bad_arguments_print_usage(args):
    r = run(*args, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr


@pytest.mark.slow
def test_quick_check_on_cpu_writes_csvs_plots_and_summary(tmp_path):
    out = tmp_path / "gpu check"  # a space in the path must not break anything
    r = run(str(out), "--quick", env={"GPU_CHECK_SKIP": "gpu-tests,codegen"})
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    for step in ("sweep: ok", "arena: ok", "plots: ok", "gpu-tests: skipped", "codegen: skipped"):
        assert step in summary, summary
    with (out / "kernels.csv").open() as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    ours = "cpkv-triton" if torch.cuda.is_available() else "cpkv-torch"
    assert {"copy", ours, f"e2e-{ours}", f"e2e-validate-{ours}"} <= providers
    assert {r["op"] for r in rows} >= {"pack", "unpack", "reorganize"}
    with (out / "arena.csv").open() as f:
        arena = {r["backend"]: r["status"] for r in csv.DictReader(f)}
    assert arena["host"] == "ok" and arena["cuda"] in ("unavailable", "ok")
    for png in ("kernels.png", "gpu_e2e.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
