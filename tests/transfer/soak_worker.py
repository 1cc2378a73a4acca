"""A CP prefill rank of the soak (test_soak.py), in its own process: sends its instance's
requests in order, a bounded window ahead, each to the decode receiver the request was routed
to, starting where the receivers are now (published by the test, `mp.publish`); it can be told
to stall once at given requests or to die at one."""

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
from mp import lookup, publish

from cpkv.staging import StagingArena
from cpkv.transfer import KVSender, ParallelRank, ParallelSizes, TransferEngine

INSTANCES = ("prefill-0", "prefill-1")  # CP 2 each: four sender processes
RECEIVERS = 2  # decode receivers, each fed by both instances
SRC_PAGES, DST_PAGES, PS, LAYERS, MAX_PAGES = 48, 96, 4, 2, 8
WINDOW = 8  # requests in flight over both receivers
SENDER_WINDOW = WINDOW // len(INSTANCES) + 2  # a sender's own requests ahead of its wait


def source_pool(instance: int):
    """Instance `instance`'s prefill pool (its CP ranks hold the same pool, each sends its
    share); the instances' pools differ, so a request landing from the wrong one is caught."""
    return make_cache(mha(num_heads=2, head_dim=32), num_layers=LAYERS, num_pages=SRC_PAGES,
                      page_size=PS, seed=11 + instance)


def plan(rid: int):
    """Request rid's route and pages, at random: the prefill instance that computes it, the
    decode receiver it goes to, its prefill page ids and tokens (random size, partial last
    page)."""
    rng = random.Random(rid)
    instance, receiver = rng.randrange(len(INSTANCES)), rng.randrange(RECEIVERS)
    n_pages = rng.randint(1, MAX_PAGES)
    s_ids = torch.tensor(rng.sample(range(SRC_PAGES), n_pages))
    return instance, receiver, s_ids, n_pages * PS - rng.randrange(PS)


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
        legs = {address: {k: str(v)[:200] for k, v in vars(leg).items()
                          if k not in ("state", "peer")} for address, leg in st.legs.items()
                } if st else None
        raise RuntimeError(f"request {rid} still {status.name} after 60 s: legs {legs}, now "
                           f"{time.monotonic()}, stats {sender.stats()}, "
                           f"worker alive {sender._worker.is_alive()}")


def sender_main(instance: int, rank: int, addresses: list, total: int, out_path: str,
                next_path: str, resume: bool, stall_at: list, stall_s: float,
                die_at: int | None, timeout: float) -> None:
    """Send instance ``instance``'s requests among [next .. total), each to the receiver of
    ``addresses`` it was routed to (`plan`). Publishes
    ``out_path + ".ready"`` once set up, then waits for ``next_path`` (the test writes it once
    every sender is up, then after every request it expects): `next` is 0 at first, or, with
    ``resume`` (a restart), where the receiver is now. Writes {"rss_mb": [...], "stats": ...}
    or {"error": ...} to out_path."""
    try:
        _send_all(instance, rank, addresses, total, out_path, next_path, resume, stall_at,
                  stall_s, die_at, timeout)
    except Exception as e:
        Path(out_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        os._exit(1)


def _send_all(instance, rank, addresses, total, out_path, next_path, resume, stall_at, stall_s,
              die_at, timeout) -> None:
    engine = TransferEngine("127.0.0.1")
    arena = StagingArena(4 << 20)
    engine.register_arena(arena)
    staller = Staller(engine)
    sender = KVSender(source_pool(instance), instance=INSTANCES[instance],
                      rank=ParallelRank(cp=rank),
                      sizes=ParallelSizes(cp=2), engine=staller, arena=arena, timeout=timeout)
    publish(out_path + ".ready", True)
    where = lookup(next_path, 120)  # there once every sender is up
    rid = where if resume else 0
    stalls = sorted(r for r in stall_at if r >= rid)
    pending, rss = deque(), []
    faulthandler.dump_traceback_later(60, repeat=True, file=open(out_path + ".stuck", "w"))
    while rid < total:
        if rid == die_at:
            os._exit(3)  # a crash: no close, no goodbye
        source, receiver, s_ids, n = plan(rid)
        if source != instance:
            rid += 1
            continue
        if stalls and rid >= stalls[0]:  # its first own request from there on
            stalls.pop(0)
            staller.arm(stall_s)
        sender.send(rid, s_ids, to=addresses[receiver], num_tokens=n)
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
        sender.forget(done)
    stats = sender.stats()  # every request ended and forgotten: nothing left open
    sender.close()
    arena.close()
    engine.close()
    rss.append(rss_mb())
    Path(out_path).write_text(json.dumps({"rss_mb": rss, "stats": stats}))
    os._exit(0)
