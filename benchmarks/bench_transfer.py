"""Transfer sweep: packed end to end (pack, one write, notify, unpack) vs a raw one-descriptor
write of the same bytes through the same Mooncake engines (the wire ceiling), TCP loopback.

One prefill sender and one decode receiver, each with its own engine, fragmented page ids.
Time runs from "sender has the page ids" to "receiver pool holds the bytes". The per-page
"direct" baseline joins as another provider (issue: transfer across parallel layouts).

    python -m benchmarks.bench_transfer [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from benchmarks.common import RESULTS, measure, page_ids, random_fill
from cpkv.report import CsvWriter, provenance
from cpkv.shapes import SHAPES
from cpkv.staging import StagingArena
from cpkv.transfer import (
    ControlPlane,
    KVReceiver,
    KVSender,
    KVStatus,
    TransferEngine,
)

FULL_TOKENS = [1024, 4096]
QUICK_TOKENS = [64]
_rid = itertools.count()


class Pair:
    """A sender and a receiver process-alike: their own engines, arenas, one control plane."""

    def __init__(self, arena_bytes: int):
        self.server = ControlPlane(serve=True, timeout=60)
        self.engines = (TransferEngine("127.0.0.1"), TransferEngine("127.0.0.1"))
        self.arenas = (StagingArena(arena_bytes), StagingArena(arena_bytes))
        for e, a in zip(self.engines, self.arenas, strict=True):
            e.register_arena(a)

    def endpoints(self, src, dst, name):
        ns = self.server.scoped(name)
        sender = KVSender(src, ns, engine=self.engines[0], arena=self.arenas[0], timeout=60)
        recv = KVReceiver(dst, ns, engine=self.engines[1],
                          arena=self.arenas[1], timeout=60)
        return sender, recv

    def close(self):
        for a in self.arenas:
            a.close()
        for e in self.engines:
            e.close()


def packed_once(sender, recv, src_ids, dst_ids, tokens):
    rid = next(_rid)
    recv.expect(rid, dst_ids, num_tokens=tokens)
    sender.send(rid, src_ids, num_tokens=tokens)
    while (st := recv.poll(rid)) not in (KVStatus.Success, KVStatus.Failed):
        time.sleep(0.0005)  # a decode scheduler polls once per step, not in a hot loop
    if st is not KVStatus.Success:
        raise RuntimeError(f"packed transfer failed: {recv.reason(rid)}")
    recv.forget(rid)
    sender.forget(rid)


def bench_config(pair, writer, name, ps, tokens, *, layers, repeats) -> str:
    shape = SHAPES[name]
    n_pages = -(-tokens // ps)
    src = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers)
    dst = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers)
    random_fill(src)
    src_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu")
    dst_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu", seed=1)
    nbytes = src.packed_nbytes(tokens)
    sender, recv = pair.endpoints(src, dst, f"{name}-{ps}-{tokens}")
    raw_src, raw_dst = pair.arenas[0].alloc(nbytes), pair.arenas[1].alloc(nbytes)
    raw_dst_addr = recv.arena_addr + raw_dst.offset
    peer = pair.engines[1].session_id

    def raw():
        pair.engines[0].write(peer, [(raw_src.tensor.data_ptr(), raw_dst_addr, nbytes)])

    cpu = torch.device("cpu")
    t_raw = measure(raw, cpu, repeats=repeats)
    raw_src.release()
    raw_dst.release()
    t_packed = measure(lambda: packed_once(sender, recv, src_ids, dst_ids, tokens), cpu,
                       repeats=repeats)
    sender.close()
    recv.close()
    base = dict(op="transfer", shape=name, page_size=ps, tokens=tokens, pattern="fragmented")
    for provider, t, descriptors in (("raw-write", t_raw, 1), ("cpkv-packed", t_packed, 1)):
        writer.timing(metric_base=dict(provider=provider, **base), seconds=t, moved_bytes=nbytes)
        writer.write(provider=provider, metric="descriptors", unit="count", p50=descriptors,
                     p20=descriptors, p80=descriptors, **base)
    writer.write(provider="cpkv-packed", metric="throughput_vs_raw", unit="x",
                 p50=t_raw[0] / t_packed[0], p20=t_raw[0] / t_packed[2],
                 p80=t_raw[0] / t_packed[1], **base)
    return (f"{nbytes / 2**20:.1f} MiB: raw {t_raw[0] * 1e3:.1f} ms, packed "
            f"{t_packed[0] * 1e3:.1f} ms ({t_raw[0] / t_packed[0]:.2f} of raw throughput)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 layers")
    p.add_argument("--shapes", default="A,B,C")
    p.add_argument("--page-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "transfer.csv"))
    args = p.parse_args(argv)
    tokens_list = QUICK_TOKENS if args.quick else FULL_TOKENS
    layers = 2 if args.quick else None
    biggest = max(SHAPES[s].bytes_per_token() for s in args.shapes.split(","))
    if args.quick:
        biggest = biggest * 2 // max(SHAPES[s].num_layers for s in args.shapes.split(","))
    pair = Pair(max(tokens_list) * biggest + (1 << 20))
    writer = CsvWriter(args.out, provenance(torch.device("cpu")))
    configs = [(s, ps, n) for s in args.shapes.split(",") for ps in args.page_sizes
               for n in tokens_list]
    try:
        for i, (name, ps, tokens) in enumerate(configs, 1):
            line = bench_config(pair, writer, name, ps, tokens, layers=layers,
                                repeats=args.repeats)
            print(f"[{i}/{len(configs)}] {name} ps={ps} tokens={tokens}: {line}", flush=True)
    finally:
        pair.close()
    print(f"wrote {writer.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
