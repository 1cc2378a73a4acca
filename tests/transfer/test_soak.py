"""Soak with faults, many-to-many: 2 prefill instances of CP 2 (four sender processes) and 2
decode receivers here, each request routed at random to an instance and a receiver (both
receivers fed by both instances at once), >= 2,000 randomly sized requests, 8 in flight, a few
injected stalls past the receivers' timeout, and one sender of each instance killed once and
restarted with the same coordinates. Asserts: no Success with a wrong byte (every request's
pages checked against its instance's source), every failure has a reason and came within its
timeout, the arenas empty and the receivers' resources (connections, senders, requests, fenced
slots, announcements) back to their baseline, each sender's open requests at zero, RSS growth
bounded. ``CPKV_SOAK_REQUESTS=N`` runs a longer
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
    INSTANCES,
    LAYERS,
    PS,
    RECEIVERS,
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


def gauges(recvs) -> list[dict]:
    """The receivers' resources in use (their stats less the quarantine counter, a count of
    events): back to their baseline once every request ended and was forgotten."""
    return [{k: v for k, v in recv.stats().items() if k != "quarantined_past_grace"}
            for recv in recvs]


def test_soak_many_to_many_with_stalls_and_restarts():
    total = int(os.environ.get("CPKV_SOAK_REQUESTS", "2000"))
    senders = [(i, r) for i in range(len(INSTANCES)) for r in (0, 1)]  # (instance, CP rank)
    stalls = {(0, 1): [total // 5], (1, 0): [total // 2], (1, 1): [4 * total // 5]}
    deaths = {(0, 0): total // 3, (1, 1): 2 * total // 3}
    engine = TransferEngine("127.0.0.1")
    arenas = [StagingArena(8 << 20) for _ in range(RECEIVERS)]
    sources = [source_pool(i) for i in range(len(INSTANCES))]
    dsts = [fill_sentinel(make_cache(mha(num_heads=2, head_dim=32), num_layers=LAYERS,
                                     num_pages=DST_PAGES, page_size=PS))
            for _ in range(RECEIVERS)]
    # A sender that falls behind must still hear the verdict of a request the receiver gave
    # up on (and forgot), instead of waiting out its own timeout (10 s); grace above that
    # timeout: a stalled sender that still holds a destination is not past the grace.
    recvs = [KVReceiver(dst, instance=f"decode-{j}", engine=engine, arena=arena,
                        timeout=TIMEOUT, checksum=True, grace=12.0)
             for j, (dst, arena) in enumerate(zip(dsts, arenas, strict=True))]
    addresses = [recv.address for recv in recvs]
    baseline = gauges(recvs)
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.TemporaryDirectory()
    next_path = f"{tmp.name}/next"

    def report(s):
        return f"{tmp.name}/sender{s[0]}.{s[1]}.json"

    def start(s, die_at, resume=False):
        p = ctx.Process(target=sender_main, args=(
            *s, addresses, total, report(s), next_path, resume, stalls.get(s, []), STALL,
            die_at, 10.0))
        p.start()
        return p

    procs = {s: start(s, deaths.get(s)) for s in senders}
    for s in procs:  # every sender is up before the first request (its timeout is short)
        lookup(report(s) + ".ready", 120)
    publish(next_path, 0)
    restarts, free = 0, [set(range(DST_PAGES)) for _ in recvs]
    inflight, latency, wrong, failures, late_failures = {}, [], 0, [], []
    rng, rid, t_start = random.Random(0), 0, time.monotonic()
    fed = [set() for _ in recvs]  # the instances each receiver took a Success from
    rss_early = None
    deadline = t_start + max(600.0, total * 0.3)
    while (rid < total or inflight) and time.monotonic() < deadline:
        for s, p in procs.items():
            if p.exitcode == 3:  # killed on purpose: the same coordinates come back
                p.join()
                procs[s] = start(s, None, resume=True)
                restarts += 1
            assert p.exitcode in (None, 0, 3), f"sender {s} exited with {p.exitcode}"
        while rid < total and len(inflight) < WINDOW:
            source, j, s_ids, n = plan(rid)
            d_ids = torch.tensor(rng.sample(sorted(free[j]), s_ids.numel()))
            free[j] -= set(d_ids.tolist())
            recvs[j].expect(rid, d_ids, source=INSTANCES[source], num_tokens=n)
            inflight[rid] = (source, j, s_ids, d_ids, n, time.monotonic())
            rid += 1
            publish(next_path, rid)  # where a restarted sender starts
        for r in list(inflight):
            source, j, s_ids, d_ids, n, t0 = inflight[r]
            status = recvs[j].poll(r)
            if status not in (KVStatus.Success, KVStatus.Failed):
                continue
            del inflight[r]
            elapsed = time.monotonic() - t0
            if status is KVStatus.Success:
                latency.append((r, elapsed))
                fed[j].add(source)
                got = pack_pages(dsts[j], d_ids, num_tokens=n, backend="torch")
                want = pack_pages(sources[source], s_ids, num_tokens=n, backend="torch")
                wrong += int((got != want).sum())
            else:
                failures.append((r, recvs[j].reason(r)))
                if not recvs[j].reason(r) or elapsed > TIMEOUT + 3.0:
                    late_failures.append((r, elapsed, recvs[j].reason(r)))
            free[j] |= set(d_ids.tolist())
            recvs[j].forget(r)
        if rss_early is None and rid >= total // 10:
            rss_early = rss_mb()
        time.sleep(0.0005)
    elapsed_total = time.monotonic() - t_start
    for p in procs.values():
        p.join(60)
    settled = all(recv.settle(10) for recv in recvs)
    leaked = sum(len(arena.live_slots) for arena in arenas)
    # the senders' connections end as their processes do; what is left is asserted below
    wait_for(lambda: gauges(recvs) == baseline, 10, interval=0.01, fail=False)
    left = [{k: (was[k], v) for k, v in now.items() if v != was[k]}
            for was, now in zip(baseline, gauges(recvs), strict=True)]
    left = [x for x in left if x]
    quarantined = sum(recv.stats()["quarantined_past_grace"] for recv in recvs)
    for recv in recvs:
        recv.close()
    rss_end = rss_mb()
    reports = [json.loads(path.read_text()) if (path := Path(report(s))).exists() else {
        "error": "no report: " + (Path(f"{path}.stuck").read_text()[-6000:]
                                  if Path(f"{path}.stuck").exists() else "")} for s in senders]
    tmp.cleanup()
    for arena in arenas:
        arena.close()
    engine.close()
    tenth = max(1, len(latency) // 10)
    figures = {
        "requests": total, "in_flight": WINDOW, "stalls": sum(map(len, stalls.values())),
        "restarts": restarts, "succeeded": len(latency), "failed": len(failures),
        "wrong_bytes": wrong, "leaked_slots": leaked, "left_open": left,
        "quarantined_past_grace": quarantined,
        "senders_left_open": [s.get("stats") for s in reports],
        "rss_growth_mb": {"receivers": round(rss_end - rss_early, 1),
                          "senders": [round(s["rss_mb"][-1] - s["rss_mb"][0], 1)
                                      if len(s.get("rss_mb", [])) > 1 else s.get("error")
                                      for s in reports]},
        "latency_ms": {f"{name}_p{int(q * 100)}": round(1e3 * percentile(
            [t for _, t in part], q), 1) for name, part in (
                ("first10", latency[:tenth]), ("last10", latency[-tenth:]))
            for q in (0.5, 0.99)},
        "seconds": round(elapsed_total, 1),
    }
    if os.environ.get("CPKV_SOAK_OUT"):
        Path(os.environ["CPKV_SOAK_OUT"]).write_text(json.dumps(figures, indent=1))
    print(figures)
    assert all("error" not in s for s in reports), reports
    assert rid == total and not inflight, f"soak did not finish: {figures}"
    assert all(p.exitcode == 0 for p in procs.values()), [p.exitcode for p in procs.values()]
    assert restarts == len(deaths), figures
    assert wrong == 0, figures
    assert not late_failures, late_failures[:5]
    assert failures, "the injected stalls and deaths must fail some requests"
    assert all(f == {0, 1} for f in fed), fed  # each receiver fed by both instances
    faults = sum(map(len, stalls.values())) + len(deaths)
    assert len(latency) >= total - 30 * (faults + 1), figures  # each fault costs a window
    assert settled and leaked == 0, figures
    assert not left, figures
    assert all(s["stats"]["open_legs"] == 0 and s["stats"]["requests"] == 0 for s in reports), \
        figures
    assert rss_end - rss_early < 64, figures
