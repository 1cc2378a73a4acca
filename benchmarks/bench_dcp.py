"""Prefill CP into decode DCP (issue 21): a CP 2 prefill instance ships each request to a decode
DCP group of D ranks (D = 2, 4; interleave I = 1 and I = page size), packed against direct (the
per-token baseline), through one pair of Mooncake engines (TCP loopback here), fragmented ids.

Time runs from the senders' `send` to every DCP rank's Success; descriptors per request are the
writes submitted (packed: one per sender, DCP rank and layer group; direct: one per token, layer
and component where I = 1, per page run where I = B). Rows: ``op=transfer``, shape
``<shape>-cp2-dcp<D>-i<I>``, providers ``cpkv-packed`` and ``direct``, metrics ``time`` (ms) and
``descriptors``, and for packed ``speedup`` (direct time over packed, same run), in
``benchmarks/results/dcp.csv``.

    python -m benchmarks.bench_dcp [--quick] [--shapes A,C] [--tokens N] [--repeats N]
    python -m benchmarks.bench_transfer --dcp     (the same, as part of the transfer sweep)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from benchmarks.common import RESULTS, page_ids, random_fill
from cpkv.parallel import DcpLayout, ParallelRank, ParallelSizes
from cpkv.report import CsvWriter, provenance, quantiles
from cpkv.shapes import SHAPES
from cpkv.staging import StagingArena
from cpkv.transfer import KVReceiver, KVSender, KVStatus, TransferEngine

CP, PAGE_SIZE = 2, 16
_rid = itertools.count()


class Counting:
    """An engine counting the descriptors submitted through it."""

    def __init__(self, engine):
        self._engine, self.descriptors = engine, 0

    def submit(self, peer, segments):
        self.descriptors += len(segments)
        return self._engine.submit(peer, segments)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def run_case(shape_name: str, tokens: int, d: int, interleave: int, mode: str, repeats: int,
             engines, arenas) -> tuple[list[float], int]:
    """Times (s) of ``repeats`` requests and the descriptors one request submits."""
    shape = SHAPES[shape_name]
    kind = "mla" if len(shape.components) == 1 else "mha"
    n_pages = -(-tokens // PAGE_SIZE)
    src = shape.cache(num_pages=2 * n_pages, page_size=PAGE_SIZE)
    random_fill(src)
    s_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu")
    counting = [Counting(engines[c]) for c in range(CP)]  # an engine per rank, as deployed:
    senders = [KVSender(src, instance=f"p-{mode}-{d}-{interleave}", rank=ParallelRank(cp=c),
                        sizes=ParallelSizes(cp=CP), kind=kind, mode=mode, engine=counting[c],
                        arena=arenas[0], timeout=600) for c in range(CP)]  # (one engine's TCP
    # queue takes ~2,000 descriptors to a peer at once: two ranks' direct batches overflow it)
    local = -(-tokens // (PAGE_SIZE * d))
    receivers = []
    for r in range(d):
        dst = shape.cache(num_pages=2 * local, page_size=PAGE_SIZE)
        receivers.append((KVReceiver(dst, rank=ParallelRank(tp=r), sizes=ParallelSizes(tp=d),
                                     dcp=DcpLayout(d, r, interleave), kind=kind,
                                     direct=mode == "direct", engine=engines[-1],
                                     arena=arenas[1], timeout=600),
                          page_ids("fragmented", local, 2 * local, "cpu", seed=r)))
    to = [recv.address for recv, _ in receivers]
    times, descriptors = [], 0
    try:
        for i in range(repeats + 1):  # the first: connections, first touch (not timed)
            rid = next(_rid)
            for recv, ids in receivers:
                recv.expect(rid, ids, source=senders[0].instance, num_tokens=tokens)
            before = sum(c.descriptors for c in counting)
            t0 = time.perf_counter()
            for s in senders:
                s.send(rid, s_ids, to=to, num_tokens=tokens)
            for recv, _ in receivers:
                if recv.wait(rid, 600) is not KVStatus.Success:
                    raise RuntimeError(f"{shape_name} dcp{d} i{interleave} {mode}: "
                                       f"{recv.reason(rid)}")
            if i:
                times.append(time.perf_counter() - t0)
            descriptors = sum(c.descriptors for c in counting) - before
            for s in senders:
                s.wait(rid, 600)
                s.forget(rid)
            for recv, _ in receivers:
                recv.forget(rid)
    finally:
        for s in senders:
            s.close()
        for recv, _ in receivers:
            recv.close()
    return times, descriptors


def run(shapes, tokens: int, repeats: int, out) -> list[dict]:
    writer = CsvWriter(out, provenance(torch.device("cpu")))
    engines = tuple(TransferEngine("127.0.0.1") for _ in range(CP + 1))  # senders', receivers'
    arenas = (StagingArena(512 << 20), StagingArena(512 << 20))
    for e in engines[:-1]:
        e.register_arena(arenas[0])
    engines[-1].register_arena(arenas[1])
    rows = []
    try:
        for name, d, interleave in itertools.product(shapes, (2, 4), (1, PAGE_SIZE)):
            label = f"{name}-cp{CP}-dcp{d}-i{interleave}"
            got = {}
            for mode in ("packed", "direct"):
                times, desc = run_case(name, tokens, d, interleave, mode, repeats, engines,
                                       arenas)
                got[mode] = times
                provider = "cpkv-packed" if mode == "packed" else "direct"
                q = quantiles(times)
                base = dict(op="transfer", provider=provider, shape=label,
                            page_size=PAGE_SIZE, tokens=tokens, pattern="fragmented")
                for row in (dict(base, metric="time", unit="ms", p50=q[0] * 1e3,
                                 p20=q[1] * 1e3, p80=q[2] * 1e3),
                            dict(base, metric="descriptors", unit="count", p50=desc, p20=desc,
                                 p80=desc)):
                    writer.write(**row)
                    rows.append(row)
                print(f"  {label:16} {mode:7} {statistics.median(times) * 1e3:9.1f} ms "
                      f"{desc:8d} descriptors", flush=True)
            ratios = [a / b for a, b in zip(got["direct"], got["packed"], strict=True)]
            q = quantiles(ratios)
            row = dict(op="transfer", provider="cpkv-packed", shape=label, page_size=PAGE_SIZE,
                       tokens=tokens, pattern="fragmented", metric="speedup", unit="x",
                       p50=q[0], p20=q[1], p80=q[2])
            writer.write(**row)
            rows.append(row)
    finally:
        for a in arenas:
            a.close()
        for e in engines:
            e.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cpkv bench dcp", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 tokens, one repeat")
    p.add_argument("--shapes", default="A,C")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "dcp.csv"))
    args = p.parse_args(argv)
    tokens, repeats = (64, 1) if args.quick else (args.tokens, args.repeats)
    run(args.shapes.split(","), tokens, repeats, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
