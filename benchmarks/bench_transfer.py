"""Transfer sweep through one pair of Mooncake engines (TCP loopback here), fragmented ids:

* raw-write:    one descriptor of the request's bytes (the wire ceiling)
* cpkv-packed:  pack, write in layer groups, notify, unpack
* direct:       one descriptor per (layer x component x contiguous page run), or per token for
                a head slice, straight into the receiver's pool (the SGLang-style baseline)
* cpkv-auto:    the cost model choosing the mode per request

``-tp2to1`` rows (shape A): a TP 2 prefill instance (two ranks of half the KV heads each, in
this process) feeds a TP 1 decode rank, each rank its half into the full pool (per token, for
a head slice, in direct mode).

Time runs from "sender has the page ids" to "receiver pool holds the bytes". Descriptors per
request are reported for every mode. ``--calibrate`` measures the cost model's constants on
this machine and writes them where `CostModel.load` finds them.

    python -m benchmarks.bench_transfer [--quick] [--calibrate] [--cp N] [--tokens N,...]
                                        [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time

import torch

from benchmarks.common import RESULTS, measure, page_ids, random_fill
from cpkv.kernels import pack_pages, unpack_pages
from cpkv.layout import PackedFormat, PagedKVCache
from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.report import CsvWriter, provenance
from cpkv.shapes import SHAPES
from cpkv.staging import StagingArena
from cpkv.transfer import KVReceiver, KVSender, KVStatus, TransferEngine
from cpkv.transfer.cost import CostModel, descriptors_per_request

FULL_TOKENS = [1024, 4096]
DIRECT_MAX_DESCRIPTORS = 300_000  # past this the baseline takes >10 s a request: not timed
QUICK_TOKENS = [64]
MODES = ("packed", "direct", "auto")
_rid = itertools.count()


class Pair:
    """A sender side and a receiver side: their own engines and arenas."""

    def __init__(self, arena_bytes: int, *, checksum: bool = False):
        self.checksum = checksum  # receivers verify a CRC32C of every packed segment
        self.engines = (TransferEngine("127.0.0.1"), TransferEngine("127.0.0.1"))
        self.arenas = (StagingArena(arena_bytes), StagingArena(arena_bytes))
        for e, a in zip(self.engines, self.arenas, strict=True):
            e.register_arena(a)

    def endpoints(self, srcs, dst, name, mode, cp=1):
        """One prefill instance of ``cp`` CP ranks per pool in ``srcs`` (its TP ranks; each
        CP rank sends its page share), sharing the sender side's engine and arena, and one
        receiver."""
        sizes = ParallelSizes(cp=cp, tp=len(srcs))
        senders = [KVSender(src, instance=f"{name}-{mode}", rank=ParallelRank(cp=r, tp=t),
                            sizes=sizes, mode=mode, engine=self.engines[0],
                            arena=self.arenas[0], timeout=120)
                   for t, src in enumerate(srcs) for r in range(cp)]
        recv = KVReceiver(dst, direct=mode != "packed", engine=self.engines[1],
                          arena=self.arenas[1], timeout=120, checksum=self.checksum)
        return senders, recv

    def close(self):
        for a in self.arenas:
            a.close()
        for e in self.engines:
            e.close()


def transfer_once(senders, recv, src_ids, dst_ids, tokens, modes=None):
    """One request end to end; appends the mode the first sender used to ``modes``."""
    rid = next(_rid)
    recv.expect(rid, dst_ids, source=senders[0].instance, num_tokens=tokens)
    for sender in senders:
        sender.send(rid, src_ids, to=recv.address, num_tokens=tokens)
    if recv.wait(rid, 600) is not KVStatus.Success:
        raise RuntimeError(f"transfer failed: {recv.reason(rid)}")
    if modes is not None:
        modes.append(senders[0].mode_of(rid))
    recv.forget(rid)
    for sender in senders:
        sender.forget(rid)


def bench_config(pair, writer, name, ps, tokens, *, layers, repeats, head_slice=False,
                 cp=1) -> str:
    shape = SHAPES[name]
    n_pages = -(-tokens // ps)
    dst = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers)
    # tp 2 -> tp 1: two prefill ranks of half the heads each, each its half into the full pool
    tp = 2 if head_slice else 1
    specs = tuple(dataclasses.replace(c, num_heads=c.num_heads // tp) for c in shape.components)
    srcs = [PagedKVCache.empty(specs, num_layers=dst.num_layers, num_pages=2 * n_pages,
                               page_size=ps) for _ in range(tp)]
    for src in srcs:
        random_fill(src)
    src_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu")
    dst_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu", seed=1)
    fmt = srcs[0].packed_format(tokens)  # one TP rank's part
    nbytes = fmt.nbytes * tp
    label = (f"{name}-tp2to1" if head_slice else name) + (f"-cp{cp}" if cp > 1 else "")

    def descriptors(mode):
        return tp * descriptors_per_request(mode, src_ids, dst_ids, fmt, ps, cp,
                                            full_pages=not head_slice)

    cpu = torch.device("cpu")
    raw_src, raw_dst = pair.arenas[0].alloc(nbytes), pair.arenas[1].alloc(nbytes)
    peer = pair.engines[1].session_id
    dst_addr = pair.arenas[1].buffer.data_ptr() + raw_dst.offset
    results = {"raw-write": (measure(lambda: pair.engines[0].write(
        peer, [(raw_src.tensor.data_ptr(), dst_addr, nbytes)]), cpu, repeats=repeats), 1)}
    raw_src.release()
    raw_dst.release()
    for mode in MODES:
        n_desc = descriptors(mode)
        if mode == "direct" and n_desc > DIRECT_MAX_DESCRIPTORS:
            continue
        senders, recv = pair.endpoints(srcs, dst, f"{label}-{ps}-{tokens}", mode, cp=cp)
        reps = repeats if mode != "direct" else max(1, min(repeats, 3))
        used = []
        t = measure(lambda s=senders, r=recv, u=used: transfer_once(s, r, src_ids, dst_ids,
                                                                    tokens, u),
                    cpu, repeats=reps)
        if mode == "auto":
            n_desc = descriptors(used[-1])
        for sender in senders:
            sender.close()
        recv.close()
        results[f"cpkv-{mode}" if mode != "direct" else "direct"] = (t, n_desc)
    base = dict(op="transfer", shape=label, page_size=ps, tokens=tokens,
                pattern="fragmented+crc32c" if pair.checksum else "fragmented")
    for provider, (t, n_desc) in results.items():
        writer.timing(metric_base=dict(provider=provider, **base), seconds=t, moved_bytes=nbytes)
        writer.write(provider=provider, metric="descriptors", unit="count", p50=n_desc,
                     p20=n_desc, p80=n_desc, **base)
    t_raw, t_packed = results["raw-write"][0], results["cpkv-packed"][0]
    writer.write(provider="cpkv-packed", metric="throughput_vs_raw", unit="x",
                 p50=t_raw[0] / t_packed[0], p20=t_raw[0] / t_packed[2],
                 p80=t_raw[0] / t_packed[1], **base)
    line = (f"{nbytes / 2**20:.1f} MiB: raw {t_raw[0] * 1e3:.1f} ms, packed "
            f"{t_packed[0] * 1e3:.1f} ms ({t_raw[0] / t_packed[0]:.2f} of raw)")
    if "direct" in results:
        t_direct = results["direct"][0]
        speedup = t_direct[0] / t_packed[0]
        writer.write(provider="cpkv-packed", metric="speedup_vs_direct", unit="x", p50=speedup,
                     p20=t_direct[1] / t_packed[2], p80=t_direct[2] / t_packed[1], **base)
        line += (f", direct {t_direct[0] * 1e3:.1f} ms ({results['direct'][1]} descriptors, "
                 f"packed {speedup:.1f}x faster)")
    best = min(results["cpkv-packed"][0][0], results.get("direct", ((float("inf"),),))[0][0])
    writer.write(provider="cpkv-auto", metric="time_vs_best_mode", unit="x",
                 p50=results["cpkv-auto"][0][0] / best, p20="", p80="", **base)
    return line + f", auto {results['cpkv-auto'][0][0] / best:.2f}x the better mode"


def calibrate(pair) -> CostModel:
    """Measure the cost model's constants through the same engines and kernels."""
    cpu = torch.device("cpu")
    peer, n = pair.engines[1].session_id, 4096
    src, dst = pair.arenas[0].alloc(n * 256), pair.arenas[1].alloc(n * 256)
    dst_base = pair.arenas[1].buffer.data_ptr() + dst.offset
    segs = [(src.tensor.data_ptr() + i * 256, dst_base + i * 256, 256) for i in range(n)]
    per_desc = measure(lambda: pair.engines[0].write(peer, segs), cpu, repeats=3)[0] / n
    src.release()
    dst.release()
    big = 256 << 20
    src, dst = pair.arenas[0].alloc(big), pair.arenas[1].alloc(big)
    dst_addr = pair.arenas[1].buffer.data_ptr() + dst.offset
    wire = big / measure(lambda: pair.engines[0].write(
        peer, [(src.tensor.data_ptr(), dst_addr, big)]), cpu, repeats=3)[0]
    src.release()
    dst.release()
    shape = SHAPES["A"]
    cache = shape.cache(num_pages=256, page_size=16)
    random_fill(cache)
    ids = page_ids("fragmented", 128, 256, "cpu")
    out = torch.empty(cache.packed_nbytes(2048), dtype=torch.uint8)
    pack = out.numel() / measure(lambda: pack_pages(cache, ids, out=out, validate=False), cpu,
                                 repeats=3)[0]
    unpack = out.numel() / measure(lambda: unpack_pages(out, cache, ids, validate=False), cpu,
                                   repeats=3)[0]
    tiny_src = shape.cache(num_pages=4, page_size=16, num_layers=1)
    tiny_dst = shape.cache(num_pages=4, page_size=16, num_layers=1)
    senders, recv = pair.endpoints([tiny_src], tiny_dst, "calibrate", "packed")
    ids4 = torch.arange(1)
    fixed = measure(lambda: transfer_once(senders, recv, ids4, ids4, 16), cpu, repeats=5)[0]
    senders[0].close()
    recv.close()
    return CostModel(per_descriptor_s=per_desc, wire_Bps=wire, pack_Bps=pack,
                     unpack_Bps=unpack, packed_fixed_s=fixed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 layers")
    p.add_argument("--calibrate", action="store_true",
                   help="measure the cost model and write it (CPKV_COST_FILE), then stop")
    p.add_argument("--shapes", default="A,B,C")
    p.add_argument("--page-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 16, 64])
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help=f"tokens per request (default {FULL_TOKENS}; --quick: {QUICK_TOKENS})")
    p.add_argument("--cp", type=int, default=1,
                   help="CP senders per request, each its page share (the demo runs 2)")
    p.add_argument("--checksum", action="store_true",
                   help="receivers verify a CRC32C of every packed segment (as the demo does)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dcp", action="store_true",
                   help="the decode-context-parallel rows instead (benchmarks/bench_dcp.py)")
    p.add_argument("--out", default=str(RESULTS / "transfer.csv"))
    args = p.parse_args(argv)
    if args.dcp:  # its own set-up: a CP 2 instance into DCP groups, shapes A and C
        from benchmarks import bench_dcp

        out = args.out if args.out != str(RESULTS / "transfer.csv") else str(RESULTS / "dcp.csv")
        return bench_dcp.main((["--quick"] if args.quick else []) + [
            "--out", out, "--repeats", str(min(args.repeats, 3))] + (
            ["--tokens", str(args.tokens[0])] if args.tokens else []))
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    layers = 2 if args.quick else None
    biggest = max(PackedFormat(max(tokens_list), SHAPES[s].num_layers, SHAPES[s].components).nbytes
                  for s in args.shapes.split(","))
    pair = Pair(max(biggest, 256 << 20) + (1 << 20), checksum=args.checksum)
    try:
        if args.calibrate:
            model = calibrate(pair)
            path = model.save(device=provenance(torch.device("cpu"))["device"],
                              measured=time.strftime("%Y-%m-%d"))
            print(f"wrote {path}: {model}")
            return 0
        writer = CsvWriter(args.out, provenance(torch.device("cpu")))
        configs = [(s, ps, n, False) for s in args.shapes.split(",") for ps in args.page_sizes
                   for n in tokens_list]
        if "A" in args.shapes.split(","):
            configs += [("A", ps, min(tokens_list), True) for ps in args.page_sizes]
        for i, (name, ps, tokens, sliced) in enumerate(configs, 1):
            line = bench_config(pair, writer, name, ps, tokens, layers=layers,
                                repeats=args.repeats, head_slice=sliced, cp=args.cp)
            what = f"{name}{' tp2->1' if sliced else ''}{f' cp{args.cp}' if args.cp > 1 else ''}"
            print(f"[{i}/{len(configs)}] {what} ps={ps} tokens={tokens}: {line}", flush=True)
        print(f"wrote {writer.rows} rows to {args.out}")
    finally:
        pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
