"""A CP prefill rank of the soak (test_soak.py), in its own process: sends requests in order,
a bounded window ahead, and can be told to stall once at given requests or to die at one."""

from __future__ import annotations

import faulthandler
import json
import os
import random
import time
from collections import deque
from pathlib import Path

import torch
from kvtest import make_cache, mha

from cpkv.staging import StagingArena
from cpkv.transfer import ControlPlane, KVSender, ParallelRank, TransferEngine

NAMESPACE = "soak"
SRC_PAGES, DST_PAGES, PS, LAYERS, MAX_PAGES = 48, 96, 4, 2, 8
WINDOW = 8  # requests the receiver has in flight
SENDER_WINDOW = WINDOW + 2


def source_pool():
    return make_cache(mha(num_heads=2, head_dim=32), num_layers=LAYERS, num_pages=SRC_PAGES,
                      page_size=PS, seed=11)


def plan(rid: int):
    """Request rid's prefill page ids and tokens (random size, partial last page)."""
    rng = random.Random(rid)
    n_pages = rng.randint(1, MAX_PAGES)
    s_ids = torch.tensor(rng.sample(range(SRC_PAGES), n_pages))
    return s_ids, n_pages * PS - rng.randrange(PS)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Staller:
    """The engine, except that after `arm` the next write submitted sleeps first (a GC pause
    or a preempted process between the sender's last check and its write)."""

    def __init__(self, engine):
        self._engine, self._armed = engine, 0.0

    def arm(self, seconds: float) -> None:
        self._armed = seconds

    def submit(self, *args, **kwargs):
        if self._armed:
            seconds, self._armed = self._armed, 0.0
            time.sleep(seconds)
        return self._engine.submit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _wait(sender, rid):
    status = sender.wait(rid, 60)
    if status.name not in ("Success", "Failed"):
        st = sender._states.get(rid)
        info = {k: str(getattr(st, k, None))[:200] for k in (
            "dest", "note_key", "lines", "finished", "ended", "busy", "checked", "error",
            "deadline", "next_try")} if st else None
        raise RuntimeError(f"request {rid} still {status.name} after 60 s: {info}, now "
                           f"{time.monotonic()}, watch {len(sender._watch)}, "
                           f"worker alive {sender._worker.is_alive()}")


def sender_main(rank: int, port: int, total: int, out_path: str, stall_at: list,
                stall_s: float, die_at: int | None, timeout: float) -> None:
    """Send requests [next .. total): `next` is where the receiver is now (0 at first).
    Writes {"rss_mb": [...]} or {"error": ...} to out_path."""
    try:
        _send_all(rank, port, total, out_path, stall_at, stall_s, die_at, timeout)
    except Exception as e:
        Path(out_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        os._exit(1)


def _send_all(rank, port, total, out_path, stall_at, stall_s, die_at, timeout) -> None:
    control = ControlPlane(port=port, namespace=NAMESPACE, timeout=60)
    engine = TransferEngine("127.0.0.1")
    arena = StagingArena(4 << 20)
    engine.register_arena(arena)
    staller = Staller(engine)
    sender = KVSender(source_pool(), control, rank=ParallelRank(cp=rank), cp_size=2,
                      engine=staller, arena=arena, timeout=timeout, lease=0.5)
    rid = control.get_or_none(control.key("next")) or 0
    pending, rss = deque(), []
    faulthandler.dump_traceback_later(60, repeat=True, file=open(out_path + ".stuck", "w"))
    while rid < total:
        if rid == die_at:
            os._exit(3)  # a crash: no close, no goodbye
        if rid in stall_at:
            staller.arm(stall_s)
        s_ids, n = plan(rid)
        sender.send(rid, s_ids, num_tokens=n)
        pending.append(rid)
        while len(pending) >= SENDER_WINDOW:
            done = pending.popleft()
            _wait(sender, done)
            sender.forget(done)
        if not rss:
            rss.append(rss_mb())  # after set-up and the first request
        rid += 1
    for done in pending:
        _wait(sender, done)
    sender.close()
    arena.close()
    engine.close()
    rss.append(rss_mb())
    Path(out_path).write_text(json.dumps({"rss_mb": rss}))
    os._exit(0)
