"""The README's quickstart runs as written; the CLI's demo and errors behave."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mp import child_pids

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_and_is_short():
    text = README.read_text()
    block = re.search(r"## Quickstart\n[^`]*```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    exec(compile(block, "README quickstart", "exec"), {})


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "cpkv.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


TINY = ["demo", "--shape", "C", "--tokens", "40", "--page-size", "16", "--requests", "2",
        "--layers", "3"]


def test_demo_end_to_end_tiny(tmp_path):
    """Real processes (2 CP prefill ranks + decode), gloo, Mooncake TCP loopback."""
    r = run_cli(*TINY, "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: every byte of 2 requests verified on the decode rank" in r.stdout
    assert "packed: descriptors per request" in r.stdout
    assert (tmp_path / "demo.csv").stat().st_size > 0
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_demo_names_a_corrupted_byte(tmp_path):
    r = run_cli(*TINY, "--out", str(tmp_path), "--corrupt-byte")
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "the decode pool differs at request 0, layer 2, component 'latent'" in last, last
    assert "got" in last and "expected" in last


@pytest.mark.parametrize("args,message", [
    (["demo", "--shape", "Z"], "invalid choice: 'Z'"),
    (["demo", "--page-size", "0"], "expected a positive integer, got 0"),
    (["demo", "--tokens", "8", "--page-size", "16"], "expected at least one page (16), got 8"),
    (["demo", "--cp", "64"], "at most 8 prefill processes, got 64"),
    (["demo", "--tokens", "6", "--page-size", "1", "--cp", "4"], "needs at least 8 tokens"),
    (["demo", "--tokens", "100000000"], "GiB of memory"),
    (["demo", "--out", "/proc/cpkv-demo"], "--out: cannot write to /proc/cpkv-demo"),
    (["demo", "--layers", "99"], "shape A has 32 layers, got 99"),
    (["bench", "nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_arguments_exit_nonzero_with_one_line(args, message):
    r = run_cli(*args, timeout=60)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_ctrl_c_stops_every_process(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cpkv.cli", *TINY, "--requests", "50",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until the ranks are working
            if "sent" in line or "received" in line:
                break
        children = child_pids(proc.pid)
        assert children, "the demo started no processes"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert "interrupted" in proc.stderr.read()
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{c}").exists() for c in children):
            assert time.monotonic() < deadline, "processes left behind after Ctrl-C"
            time.sleep(0.2)
        assert not list(Path("/dev/shm").glob("cpkv-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
