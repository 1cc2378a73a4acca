"""Soak with faults (issue 9): 2 CP prefill ranks in their own processes, a decode receiver
here, >= 2,000 randomly sized requests, 8 in flight, a few injected stalls past the receiver's
timeout, and each sender killed once and restarted with the same coordinates. Asserts: no
Success with a wrong byte (every request's pages checked against the source), every failure
has a reason and came within its timeout, the arena empty and the receiver's resources
(connections, senders, requests, fenced slots, announcements) back to their baseline, each
sender's open requests at zero, RSS growth bounded. ``CPKV_SOAK_REQUESTS=N`` runs a longer
soak by hand; ``CPKV_SOAK_OUT=file.json`` writes the figures (README, Reliability)."""

import json
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import pytest
import torch
from kvtest import fill_sentinel, make_cache, mha
from mp import lookup, publish, wait_for
from soak_worker import (
    DST_PAGES,
    INSTANCE,
    LAYERS,
    PS,
    WINDOW,
    plan,
    rss_mb,
    sender_main,
    source_pool,
)

from cpkv.kernels import pack_pages
from cpkv.staging import StagingArena
from cpkv.transfer import KVReceiver, KVStatus, TransferEngine

pytestmark = [pytest.mark.mp, pytest.mark.slow]

TIMEOUT = 2.0  # the receiver's per-request timeout; stalls last longer
STALL = 2.6


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def gauges(recv) -> dict:
    """The receiver's resources in use (its stats less the quarantine counter, a count of
    events): back to their baseline once every request ended and was forgotten."""
    return {k: v for k, v in recv.stats().items() if k != "quarantined_past_grace"}


def test_soak_with_stalls_and_restarts():
    total = int(os.environ.get("CPKV_SOAK_REQUESTS", "2000"))
    stalls = {1: [total // 5, total // 2], 0: [4 * total // 5]}
    deaths = {0: total // 3, 1: 2 * total // 3}
    engine = TransferEngine("127.0.0.1")
    arena = StagingArena(8 << 20)
    engine.register_arena(arena)
    src = source_pool()
    dst = fill_sentinel(make_cache(mha(num_heads=2, head_dim=32), num_layers=LAYERS,
                                   num_pages=DST_PAGES, page_size=PS))
    # A sender that falls behind must still hear the verdict of a request the receiver gave
    # up on (and forgot), instead of waiting out its own timeout (10 s); grace above that
    # timeout: a stalled sender that still holds a destination is not past the grace.
    recv = KVReceiver(dst, engine=engine, arena=arena, timeout=TIMEOUT, checksum=True,
                      grace=12.0)
    baseline = gauges(recv)
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.TemporaryDirectory()
    next_path = f"{tmp.name}/next"

    def start(rank, die_at, resume=False):
        p = ctx.Process(target=sender_main, args=(
            rank, recv.address, total, f"{tmp.name}/rank{rank}.json", next_path, resume,
            stalls[rank], STALL, die_at, 10.0))
        p.start()
        return p

    procs = {r: start(r, deaths[r]) for r in (0, 1)}
    for r in procs:  # every sender is up before the first request (its timeout is short)
        lookup(f"{tmp.name}/rank{r}.json.ready", 120)
    publish(next_path, 0)
    restarts, free = 0, set(range(DST_PAGES))
    inflight, latency, wrong, failures, late_failures = {}, [], 0, [], []
    rng, rid, t_start = random.Random(0), 0, time.monotonic()
    rss_early = None
    deadline = t_start + max(600.0, total * 0.3)
    while (rid < total or inflight) and time.monotonic() < deadline:
        for r, p in procs.items():
            if p.exitcode == 3:  # killed on purpose: the same coordinates come back
                p.join()
                procs[r] = start(r, None, resume=True)
                restarts += 1
            assert p.exitcode in (None, 0, 3), f"sender {r} exited with {p.exitcode}"
        while rid < total and len(inflight) < WINDOW:
            s_ids, n = plan(rid)
            d_ids = torch.tensor(rng.sample(sorted(free), s_ids.numel()))
            free -= set(d_ids.tolist())
            recv.expect(rid, d_ids, source=INSTANCE, num_tokens=n)
            inflight[rid] = (s_ids, d_ids, n, time.monotonic())
            rid += 1
            publish(next_path, rid)  # where a restarted sender starts
        for r in list(inflight):
            status = recv.poll(r)
            if status not in (KVStatus.Success, KVStatus.Failed):
                continue
            s_ids, d_ids, n, t0 = inflight.pop(r)
            elapsed = time.monotonic() - t0
            if status is KVStatus.Success:
                latency.append((r, elapsed))
                got = pack_pages(dst, d_ids, num_tokens=n, backend="torch")
                want = pack_pages(src, s_ids, num_tokens=n, backend="torch")
                wrong += int((got != want).sum())
            else:
                failures.append((r, recv.reason(r)))
                if not recv.reason(r) or elapsed > TIMEOUT + 3.0:
                    late_failures.append((r, elapsed, recv.reason(r)))
            free |= set(d_ids.tolist())
            recv.forget(r)
        if rss_early is None and rid >= total // 10:
            rss_early = rss_mb()
        time.sleep(0.0005)
    elapsed_total = time.monotonic() - t_start
    for p in procs.values():
        p.join(60)
    settled = recv.settle(10)
    leaked = len(arena.live_slots)
    # the senders' connections end as their processes do; what is left is asserted below
    wait_for(lambda: gauges(recv) == baseline, 10, interval=0.01, fail=False)
    end = gauges(recv)
    left = {k: (baseline[k], v) for k, v in end.items() if v != baseline[k]}
    quarantined = recv.stats()["quarantined_past_grace"]
    recv.close()
    rss_end = rss_mb()
    senders = [json.loads(path.read_text()) if (path := Path(f"{tmp.name}/rank{r}.json")
                                                ).exists() else {"error": "no report: " + (
                   Path(f"{path}.stuck").read_text()[-6000:] if Path(f"{path}.stuck").exists()
                   else "")} for r in (0, 1)]
    tmp.cleanup()
    arena.close()
    engine.close()
    tenth = max(1, len(latency) // 10)
    figures = {
        "requests": total, "in_flight": WINDOW, "stalls": sum(map(len, stalls.values())),
        "restarts": restarts, "succeeded": len(latency), "failed": len(failures),
        "wrong_bytes": wrong, "leaked_slots": leaked, "left_open": left,
        "quarantined_past_grace": quarantined,
        "senders_left_open": [s.get("stats") for s in senders],
        "rss_growth_mb": {"receiver": round(rss_end - rss_early, 1),
                          "senders": [round(s["rss_mb"][-1] - s["rss_mb"][0], 1)
                                      if len(s.get("rss_mb", [])) > 1 else s.get("error")
                                      for s in senders]},
        "latency_ms": {f"{name}_p{int(q * 100)}": round(1e3 * percentile(
            [t for _, t in part], q), 1) for name, part in (
                ("first10", latency[:tenth]), ("last10", latency[-tenth:]))
            for q in (0.5, 0.99)},
        "seconds": round(elapsed_total, 1),
    }
    if os.environ.get("CPKV_SOAK_OUT"):
        Path(os.environ["CPKV_SOAK_OUT"]).write_text(json.dumps(figures, indent=1))
    print(figures)
    assert all("error" not in s for s in senders), senders
    assert rid == total and not inflight, f"soak did not finish: {figures}"
    assert all(p.exitcode == 0 for p in procs.values()), [p.exitcode for p in procs.values()]
    assert restarts == 2, figures
    assert wrong == 0, figures
    assert not late_failures, late_failures[:5]
    assert failures, "the injected stalls and deaths must fail some requests"
    faults = sum(map(len, stalls.values())) + len(deaths)
    assert len(latency) >= total - 30 * (faults + 1), figures  # each fault costs a window
    assert settled and leaked == 0, figures
    assert not left, figures
    assert all(s["stats"]["open_legs"] == 0 and s["stats"]["requests"] == 0 for s in senders), \
        figures
    assert rss_end - rss_early < 64, figures
