"""Across hosts, as near as one machine gets: 2 CP senders and 1 receiver, each in its own
network namespace created here (a veth pair per namespace into a bridge namespace, addresses
10.231.x.0/24 of its own choosing, a `tc tbf` rate limit on every link), processes started with
`ip netns exec`. The receiver and the engines bind and advertise the namespace addresses (the
receiver's address reaches the senders through a file); nothing may assume loopback. Skipped,
with the reason, without the privilege to create namespaces."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mp, pytest.mark.slow]

HERE = Path(__file__).parent
SUBNET = "10.231.7"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


def netns_exec(ns, *args):
    return ip("netns", "exec", ns, *args)


@pytest.fixture
def namespaces():
    """{"recv": (ns, addr), "s0": ..., "s1": ...}; every namespace deleted on every path."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (`ip`, `tc`)")
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    hub = f"cpkv-hub-{tag}"
    made = []
    try:
        if ip("netns", "add", hub, check=False).returncode != 0:
            pytest.skip("cannot create a network namespace here (`ip netns add` refused)")
        made.append(hub)
        netns_exec(hub, "ip", "link", "add", "br0", "type", "bridge")
        netns_exec(hub, "ip", "link", "set", "br0", "up")
        out = {}
        for i, role in enumerate(("recv", "s0", "s1"), start=1):
            ns, addr = f"cpkv-{role}-{tag}", f"{SUBNET}.{i}"
            ip("netns", "add", ns)
            made.append(ns)
            inner, outer = f"v{role}{tag}"[:15], f"h{role}{tag}"[:15]
            ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer,
               "netns", hub)
            netns_exec(hub, "ip", "link", "set", outer, "master", "br0", "up")
            netns_exec(ns, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            netns_exec(ns, "ip", "link", "set", inner, "up")
            netns_exec(ns, "ip", "link", "set", "lo", "up")
            netns_exec(ns, "tc", "qdisc", "add", "dev", inner, "root", "tbf", "rate",
                       "400mbit", "burst", "256kb", "latency", "50ms")
            out[role] = (ns, addr)
        yield out
    finally:
        for ns in reversed(made):
            ip("netns", "del", ns, check=False)


def test_two_senders_one_receiver_in_separate_network_namespaces(namespaces):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "MC_LOG_LEVEL": "ERROR"}
    recv_ns, recv_addr = namespaces["recv"]
    worker = str(HERE / "netns_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        outs = {r: Path(tmp) / f"{r}.json" for r in namespaces}
        meet = str(Path(tmp) / "receiver-address")
        cmds = {"recv": [recv_addr, meet],
                "s0": ["0", namespaces["s0"][1], meet],
                "s1": ["1", namespaces["s1"][1], meet]}
        procs = {r: subprocess.Popen(
            ["ip", "netns", "exec", namespaces[r][0], sys.executable, worker,
             "receiver" if r == "recv" else "sender", *cmds[r], str(outs[r])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for r in namespaces}
        logs = {}
        try:
            for r, p in procs.items():
                logs[r] = p.communicate(timeout=240)[0].decode(errors="replace")[-2000:]
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        results = {r: json.loads(outs[r].read_text()) if outs[r].exists() else
                   {"ok": False, "error": logs.get(r)} for r in namespaces}
    for r, res in results.items():
        assert res["ok"], f"{r}: {res.get('error')}"
        assert res["session"].startswith(namespaces[r][1] + ":"), res["session"]
    assert results["recv"]["address"].startswith(recv_addr + ":"), results["recv"]
