"""Serving: per-request overhead and request rate (../shared/BENCHMARKS.md, issue 19).

Prefill and decode run in their own processes (one `KVSender` each prefill rank, one
`KVReceiver` each decode rank, Mooncake TCP loopback), shape A, page size 16, fragmented ids:

* ``latency``: one request in flight, 16 / 128 / 1,024 / 4,096 tokens: a request's time runs
  from the sender's `send` call (it has the page ids) to the receiver's `wait` returning
  Success (the pool holds the bytes), both read on the host's monotonic clock (perf_counter);
* ``rate``: 1 / 4 / 16 / 64 requests in flight of 16 and 1,024 tokens: requests per second
  over the run, p50 and p99 latency;
* ``mesh``: 2 prefill instances x 2 decode receivers, each request routed at random, 16 in
  flight per prefill instance.

Next to each cpkv phase, the same prefill process writes the same bytes as one raw
descriptor per request into the decode process's registered memory at the same concurrency
(``raw``: submit to landed, as the sender sees it); phases alternate within each round and the
rows report the rounds' medians. Rows (``benchmarks/results/serve.csv``): ``op=serve``,
``provider`` cpkv or raw, ``pattern`` ``inflight<k>`` (``mesh<k>`` for the mesh), metrics
``requests_per_s``, ``latency_p50`` and ``latency_p99`` (ms), and for cpkv ``ratio_to_raw``
(its rate over raw's at the same in-flight count and tokens); with one request in flight,
``stage_pack`` / ``stage_wire`` / ``stage_unpack`` / ``stage_other`` say where a request's
time goes (`stages`).

    python -m benchmarks.bench_serve [--quick] [--rounds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

import torch

from benchmarks.common import RESULTS, page_ids, random_fill

SHAPE, PAGE_SIZE = "A", 16
FULL = dict(latency=[16, 128, 1024, 4096], rate_tokens=[16, 1024], inflight=[1, 4, 16, 64],
            requests=200, rounds=3, mesh_requests=200)
QUICK = dict(latency=[16, 128], rate_tokens=[16], inflight=[1, 4, 16], requests=40, rounds=2,
             mesh_requests=40)
SMOKE = dict(latency=[16], rate_tokens=[16], inflight=[1, 4], requests=8, rounds=1,
             mesh_requests=8)  # every phase once, for the tests of the sweep and its figure
WINDOW = 80  # requests a receiver keeps expected ahead (each on its own pages), at most
DECODE_BYTES = 1 << 30  # and within this much pool (a decode engine's pool is finite too)


def _pages(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


def _request_bytes(tokens: int) -> int:
    """Packed bytes of a request (every layer, K and V, every head)."""
    from cpkv.shapes import SHAPES

    return SHAPES[SHAPE].packed_format(tokens).nbytes


def window(tokens: int) -> int:
    """Requests the decode side keeps expected at once for this request size."""
    return max(2, min(WINDOW, DECODE_BYTES // _request_bytes(tokens)))


def _pool(num_pages: int):
    from cpkv.shapes import SHAPES

    cache = SHAPES[SHAPE].cache(num_pages=num_pages, page_size=PAGE_SIZE)
    random_fill(cache)
    return cache


def _decode(conn, instance: str, tokens_list: list[int], sources: dict):
    """A decode rank: for each phase it keeps WINDOW requests expected (rids in order, each on
    its own pages), records when each completes, and serves raw writes into its arena."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    torch.set_num_threads(1)
    from cpkv.staging import StagingArena
    from cpkv.transfer import KVReceiver, TransferEngine

    cache = _pool(max(window(t) * _pages(t) for t in tokens_list))
    engine = TransferEngine()
    arena = StagingArena(max(window(t) * _request_bytes(t) for t in tokens_list) + (16 << 20))
    engine.register_arena(arena)
    raw = torch.empty(max(_request_bytes(t) for t in tokens_list), dtype=torch.uint8)
    engine.register(raw)  # raw writes land here (all of them: only the wire is timed)
    recv = KVReceiver(cache, instance=instance, engine=engine, arena=arena, timeout=120)
    conn.send((recv.address, engine.session_id, raw.data_ptr()))
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        phase, tokens, plan = cmd  # plan: [(rid, source)] this rank expects, in order
        n_pages, ahead = _pages(tokens), window(tokens)
        recv.trace = []  # the unpacks' spans (the breakdown)
        done, pending, expected, failed = {}, list(enumerate(plan)), [], []
        while pending and len(expected) < ahead:
            expected.append(_expect(recv, pending.pop(0), n_pages, ahead, tokens))
        conn.send("ready")
        while expected:
            rid = expected.pop(0)
            status = recv.wait(rid, 120)
            done[rid] = time.perf_counter()
            if status.name != "Success":
                failed.append((rid, recv.reason(rid)))
            recv.forget(rid)
            if pending:
                expected.append(_expect(recv, pending.pop(0), n_pages, ahead, tokens))
        conn.send((done, failed, recv.trace))
    recv.close()
    engine.unregister(raw.data_ptr())
    arena.close()
    engine.close()


def _expect(recv, item, n_pages: int, ahead: int, tokens: int):
    """Expect the i-th request of a phase on block i % ahead of the pool's pages."""
    i, (rid, source) = item
    k = i % ahead
    recv.expect(rid, torch.arange(k * n_pages, (k + 1) * n_pages), source=source,
                num_tokens=tokens)
    return rid


def _prefill(conn, instance: str, tokens_list: list[int]):
    """A prefill rank: runs cpkv and raw phases on command, keeping k requests in flight."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    torch.set_num_threads(1)
    from cpkv.transfer import KVSender

    top = max(tokens_list)
    cache = _pool(_pages(top))
    sender = KVSender(cache, instance=instance, timeout=120, arena_bytes=256 << 20)
    engine = sender.engine
    src = torch.empty(_request_bytes(top), dtype=torch.uint8).random_(0, 256)
    engine.register(src)  # raw writes' source bytes
    conn.send("up")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        phase, tokens, inflight, plan = cmd  # plan: [(rid, address)] or raw [(rid, target)]
        ids = page_ids("fragmented", _pages(tokens), cache.num_pages, "cpu", seed=1)
        nbytes = cache.packed_nbytes(tokens)
        started, landed, failed = {}, {}, []
        flying: list = []
        sender.trace = []  # the packs' and writes' spans (the breakdown)
        t_begin = time.perf_counter()
        for rid, where in plan:
            if len(flying) >= inflight:
                _finish(phase, flying.pop(0), sender, engine, landed, failed)
            started[rid] = time.perf_counter()
            if phase == "cpkv":
                sender.send(rid, ids, to=where, num_tokens=tokens)
                flying.append(rid)
            else:
                session, addr = where
                flying.append((rid, engine.submit(session, [(src.data_ptr(), addr, nbytes)])))
        while flying:
            _finish(phase, flying.pop(0), sender, engine, landed, failed)
        conn.send((started, landed, failed, time.perf_counter() - t_begin, sender.trace))
    sender.close()


def _finish(phase, item, sender, engine, landed, failed):
    if phase == "cpkv":
        status = sender.wait(item, 120)
        if status.name != "Success":
            failed.append((item, sender.reason(item)))
        sender.forget(item)
    else:
        rid, pending = item
        engine.wait(pending)
        landed[rid] = time.perf_counter()


class Deployment:
    """Prefill and decode processes (spawned once; each phase is a command)."""

    def __init__(self, prefills: list[str], decodes: list[str], tokens_list: list[int]):
        ctx = mp.get_context("spawn")
        self.procs, self.p, self.d = [], {}, {}
        for name in decodes:
            a, b = ctx.Pipe()
            proc = ctx.Process(target=_decode, args=(b, name, tokens_list, {}), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.d[name] = a
        for name in prefills:
            a, b = ctx.Pipe()
            proc = ctx.Process(target=_prefill, args=(b, name, tokens_list), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.p[name] = a
        self.info = {name: conn.recv() for name, conn in self.d.items()}
        for conn in self.p.values():
            assert conn.recv() == "up"

    def cpkv(self, tokens: int, inflight: int, requests: list[tuple[int, str, str]]):
        """requests: (rid, prefill, decode). Returns latencies (s), rate (req/s)."""
        for name, conn in self.d.items():
            conn.send(("cpkv", tokens, [(r, p) for r, p, d in requests if d == name]))
        for conn in self.d.values():
            assert conn.recv() == "ready"
        for name, conn in self.p.items():
            conn.send(("cpkv", tokens, inflight, [(r, self.info[d][0]) for r, p, d in requests
                                                   if p == name]))
        started, failed, trace = {}, [], []
        for conn in self.p.values():
            s, _, f, _, t = conn.recv()
            started.update(s)
            failed += f
            trace += t
        done = {}
        for conn in self.d.values():
            d, f, t = conn.recv()
            done.update(d)
            failed += f
            trace += t
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[:3]}")
        lat = [done[r] - started[r] for r in started]
        self.stages = stages(trace, started, done)
        return lat, len(lat) / (max(done.values()) - min(started.values()))

    def raw(self, tokens: int, inflight: int, requests: list[tuple[int, str, str]]):
        for name, conn in self.p.items():
            mine = [(r, self.info[d][1:3]) for r, p, d in requests if p == name]
            conn.send(("raw", tokens, inflight, mine))
        started, landed = {}, {}
        for conn in self.p.values():
            s, land, _, _, _ = conn.recv()
            started.update(s)
            landed.update(land)
        lat = [landed[r] - started[r] for r in started]
        return lat, len(lat) / (max(landed.values()) - min(started.values()))

    def close(self):
        for conn in list(self.p.values()) + list(self.d.values()):
            conn.send(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def _union(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for t0, t1 in sorted(spans):
        if t1 > reach:
            total += t1 - max(t0, reach)
            reach = t1
    return total


def stages(trace: list, started: dict, done: dict) -> dict[str, float]:
    """Where a request's time goes, p50 over requests in ms: ``pack`` (the sender's kernel
    into staging, summed over its layer groups), ``wire`` (its writes, submit to landed: the
    union of their spans), ``unpack`` (the receiver's kernel into the pool, summed) and
    ``other``: the request's time during which none of them ran (hand-offs between threads
    and processes, the notification, the verdict). Spans overlap once a request is cut into
    layer groups (the next group packs while one is on the wire), so the stages can sum to
    more than the request. From the agents' traces (perf_counter: the host's monotonic clock
    in both processes); meaningful with one request in flight."""
    spans: dict = {}
    for what, rid, _, _, t0, t1 in trace:
        spans.setdefault(rid, {}).setdefault(what, []).append((t0, t1))
    per: dict[str, list[float]] = {"pack": [], "wire": [], "unpack": [], "other": []}
    for rid, got in spans.items():
        if rid not in done or set(got) != {"pack", "wire", "unpack"}:
            continue
        per["pack"].append(sum(t1 - t0 for t0, t1 in got["pack"]))
        per["wire"].append(_union(got["wire"]))
        per["unpack"].append(sum(t1 - t0 for t0, t1 in got["unpack"]))
        per["other"].append(done[rid] - started[rid] - _union(sum(got.values(), [])))
    return {k: 1e3 * statistics.median(v) for k, v in per.items() if v}


def _q(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(cfg: dict, rounds: int | None, out) -> list[dict]:
    from cpkv.report import CsvWriter, provenance

    rounds = rounds or cfg["rounds"]
    tokens_all = sorted(set(cfg["latency"]) | set(cfg["rate_tokens"]))
    writer = CsvWriter(out, provenance(torch.device("cpu")))
    rows = []
    rid = iter(range(10**9))

    def emit(provider, tokens, pattern, metric, unit, values):
        row = dict(op="serve", provider=provider, shape=SHAPE, page_size=PAGE_SIZE,
                   tokens=tokens, pattern=pattern, metric=metric, unit=unit,
                   p50=statistics.median(values), p20=_q(values, 0.2), p80=_q(values, 0.8))
        writer.write(**row)
        rows.append(row)

    def phase(dep, tokens, inflight, n, route, pattern):
        """Alternate cpkv and raw for ``rounds``; emit the medians over rounds."""
        per, split = {"cpkv": [], "raw": []}, []
        for _ in range(rounds):
            reqs = [(next(rid), *route()) for _ in range(n)]
            for provider in ("cpkv", "raw"):
                lat, rate = getattr(dep, provider)(tokens, inflight, reqs)
                per[provider].append((rate, _q(lat, 0.5) * 1e3, _q(lat, 0.99) * 1e3))
            split.append(dep.stages)
        for provider, runs in per.items():
            emit(provider, tokens, pattern, "requests_per_s", "1/s", [r[0] for r in runs])
            emit(provider, tokens, pattern, "latency_p50", "ms", [r[1] for r in runs])
            emit(provider, tokens, pattern, "latency_p99", "ms", [r[2] for r in runs])
        ratios = [c[0] / r[0] for c, r in zip(per["cpkv"], per["raw"], strict=True)]
        emit("cpkv", tokens, pattern, "ratio_to_raw", "x", ratios)
        if inflight == 1 and all(len(x) == 4 for x in split):  # spans overlap with more
            for stage in split[0]:
                emit("cpkv", tokens, pattern, f"stage_{stage}", "ms", [x[stage] for x in split])
            print("  " + " ".join(f"{k} {statistics.median(x[k] for x in split):.2f}"
                                  for k in split[0]) + " ms", flush=True)
        c50 = statistics.median(r[1] for r in per["cpkv"])
        w50 = statistics.median(r[1] for r in per["raw"])
        rate = {k: statistics.median(r[0] for r in v) for k, v in per.items()}
        c99 = statistics.median(r[2] for r in per["cpkv"])
        print(f"  {pattern:10} {tokens:5} tokens: cpkv {rate['cpkv']:7.1f} req/s p50 {c50:7.2f} "
              f"ms p99 {c99:7.2f} ms | raw {rate['raw']:7.1f} req/s p50 {w50:7.2f} ms | rate "
              f"ratio {statistics.median(ratios):.2f}", flush=True)

    def warm(dep, pairs):
        """Unmeasured: every route and size once (connections, Mooncake segments, caches)."""
        for tokens in tokens_all:
            for provider in ("cpkv", "raw"):
                getattr(dep, provider)(tokens, 1, [(next(rid), *pair) for pair in pairs])

    dep = Deployment(["prefill"], ["decode"], tokens_all)
    try:
        warm(dep, [("prefill", "decode")])
        print("one request in flight", flush=True)
        for tokens in cfg["latency"]:
            phase(dep, tokens, 1, max(10, cfg["requests"] // 4), lambda: ("prefill", "decode"),
                  "inflight1")
        print("requests in flight", flush=True)
        for tokens in cfg["rate_tokens"]:
            for k in cfg["inflight"]:
                if k == 1 and tokens in cfg["latency"]:
                    continue  # measured above
                phase(dep, tokens, k, max(cfg["requests"], 4 * k), lambda: ("prefill", "decode"),
                      f"inflight{k}")
    finally:
        dep.close()
    print("2 prefill instances x 2 decode receivers, random routing", flush=True)
    rng = random.Random(0)
    mesh = Deployment(["prefill-a", "prefill-b"], ["decode-0", "decode-1"], tokens_all)
    try:
        warm(mesh, [(p, d) for p in ("prefill-a", "prefill-b") for d in ("decode-0", "decode-1")])
        phase(mesh, min(cfg["rate_tokens"]), 16, cfg["mesh_requests"],
              lambda: (rng.choice(["prefill-a", "prefill-b"]),
                       rng.choice(["decode-0", "decode-1"])), "mesh16")
    finally:
        mesh.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cpkv bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small sweep (minutes on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="every phase once, tiny (the tests)")
    p.add_argument("--rounds", type=int, default=None, help="alternating cpkv/raw rounds")
    p.add_argument("--out", default=str(RESULTS / "serve.csv"))
    args = p.parse_args(argv)
    run(SMOKE if args.smoke else QUICK if args.quick else FULL, args.rounds, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
