"""The embedded `mooncake_master`: free ports, captured logs, and no orphan on any exit path."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mp import alive, wait_for

from cpkv.store import MasterError, MasterProcess
from cpkv.store.master import port_open

pytestmark = pytest.mark.mp

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import importlib, sys, time, types
# master.py and the torch-free modules it imports, without cpkv's package initialisers (no torch
# import: a child starts in a fraction of a second)
for name, folder in (("cpkv", sys.argv[2]), ("cpkv.store", sys.argv[2] + "/store")):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [folder]
mod = importlib.import_module("cpkv.store.master")
assert "torch" not in sys.modules
m = mod.MasterProcess()
print(m.pid, m.port, m._dir, flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)
time.sleep(120)
"""


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    return wait_for(lambda: not alive(pid), timeout, interval=0.05, fail=False)


@pytest.mark.slow
def test_start_stop_and_logs():
    with MasterProcess() as m:
        assert m.running and port_open("127.0.0.1", m.port, 1.0)
        assert m.address == f"127.0.0.1:{m.port}"
        pid = m.pid
        with MasterProcess() as other:  # a second one takes other ports
            assert other.port != m.port and other.running
        assert "master" in m.log_text().lower()  # its output is captured
    assert wait_gone(pid, 5) and not port_open("127.0.0.1", m.port, 0.5)
    m.close()  # idempotent


def test_start_failure_is_an_error_with_the_log(tmp_path):
    fake = tmp_path / "mooncake_master"
    fake.write_text("#!/bin/sh\necho 'cannot bind: fake failure'\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(MasterError, match="exited with code 3(.|\n)*fake failure"):
        MasterProcess(binary=str(fake), start_timeout=5)
    with pytest.raises(ValueError, match="start_timeout"):
        MasterProcess(start_timeout=0)


@pytest.mark.parametrize("how", ["exit", signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["normal-exit", "ctrl-c", "sigterm", "sigkill"])
def test_no_orphan_when_the_owner_goes(how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, "exit" if how == "exit" else "wait",
                              str(REPO / "cpkv")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = ""
    try:
        line = child.stdout.readline()
        assert line, "the child did not start a master"
        pid, port, log_dir = line.split()
        pid, port = int(pid), int(port)
        if how != "exit":
            assert alive(pid) and port_open("127.0.0.1", port, 1.0)
            child.send_signal(how)
        child.wait(30)
        assert wait_gone(pid), f"mooncake_master {pid} outlived its owner ({how})"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if line:
            shutil.rmtree(log_dir, ignore_errors=True)  # an owner killed cannot delete it
