"""`cpkv demo` from an install without an optional extra fails at once (before any process or
engine starts), naming the extra; `--no-checksum` drops the need for crc32c."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.mp, pytest.mark.slow]

# An install without some modules, in this process's children and theirs (the demo spawns its
# ranks): a sitecustomize makes them unimportable (sys.modules[name] = None: import raises).
SITECUSTOMIZE = """
import os, sys
for name in filter(None, os.environ.get("CPKV_TEST_WITHOUT", "").split(",")):
    sys.modules[name] = None
"""
TINY = ["demo", "--shape", "C", "--tokens", "40", "--page-size", "16", "--requests", "2",
        "--layers", "3"]


def run_without(modules, *args, site):
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "CPKV_TEST_WITHOUT": ",".join(modules),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                        os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "cpkv.cli", *args], capture_output=True,
                          text=True, timeout=180, env=env)


@pytest.fixture
def site(tmp_path):
    (tmp_path / "site").mkdir()
    return tmp_path / "site"


@pytest.mark.parametrize("missing,extra", [
    (["mooncake", "mooncake.engine"], "cpkv[cpu]"),
    (["crc32c"], "cpkv[integrity]', or pass --no-checksum"),
    (["matplotlib"], "cpkv[plot]"),
], ids=["mooncake", "crc32c", "matplotlib"])
def test_a_missing_extra_fails_before_any_set_up(missing, extra, tmp_path, site):
    out = tmp_path / "out"
    r = run_without(missing, *TINY, "--out", str(out), site=site)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpkv: error: cpkv demo needs ") \
        and extra in lines[0], lines
    assert r.stdout == ""  # no banner: no process, engine or pool was set up
    assert not list(out.iterdir())


def test_store_demo_needs_mooncake_store(site):
    r = run_without(["mooncake", "mooncake.store"], "demo", "--store", "--tokens", "32",
                    "--page-size", "16", site=site)
    assert r.returncode == 2 and "cpkv demo --store needs Mooncake Store" in r.stderr, r.stderr
    assert r.stdout == ""


def test_without_crc32c_the_demo_runs_with_no_checksum(tmp_path, site):
    r = run_without(["crc32c"], *TINY, "--no-checksum", "--out", str(tmp_path), site=site)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: every byte of 2 requests verified" in r.stdout
    assert (tmp_path / "demo.png").stat().st_size > 1000
