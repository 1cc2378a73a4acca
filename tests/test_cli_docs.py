"""The README's quickstart runs as written; the CLI's demo and errors behave."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_and_is_short():
    text = README.read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    exec(compile(block, "README quickstart", "exec"), {})


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cpkv.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_demo_kernel_round_trip_tiny():
    r = run_cli("demo", "--shape", "C", "--tokens", "40", "--page-size", "16")
    assert r.returncode == 0, r.stderr
    assert "OK: every byte verified" in r.stdout


def test_bad_arguments_exit_nonzero_with_one_line():
    for args in (["demo", "--shape", "Z"], ["demo", "--page-size", "0"],
                 ["demo", "--tokens", "8", "--page-size", "16"]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert "error" in r.stderr.strip().splitlines()[-1]
