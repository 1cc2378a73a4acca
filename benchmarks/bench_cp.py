"""CP gather sweep: the bare all-gather vs all_gather_kv (pack local shard + all-gather + reorganize
into the paged pool), on 2 ranks over gloo (CPU) or NCCL (GPU), zigzag split, fragmented pages.

The bare all-gather moves the same bytes in the same layer chunks all_gather_kv uses (its
floor); one all-gather call over the whole slot is reported too ("all-gather-one-call").

    python -m benchmarks.bench_cp [--quick] [--world 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.common import RESULTS, page_ids, random_fill
from cpkv._net import free_port
from cpkv.cp import all_gather_kv, gather_nbytes, zigzag_split
from cpkv.cp.gather import gather_chunks
from cpkv.report import CsvWriter, provenance, quantiles
from cpkv.shapes import SHAPES

FULL_TOKENS = [1024, 4096]
QUICK_TOKENS = [128]
PAGE_SIZE = 16


def _timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return quantiles(times)


def _bench_config(rank, world, writer, name, tokens, args) -> str:
    shape = SHAPES[name]
    layers = 2 if args.quick else shape.num_layers
    plan = zigzag_split(tokens, world)
    n_pages = -(-tokens // PAGE_SIZE)
    cache = shape.cache(num_pages=2 * n_pages, page_size=PAGE_SIZE, num_layers=layers)
    random_fill(cache)
    ids = page_ids("fragmented", n_pages, 2 * n_pages, cache.device)
    local = {}
    for spec in shape.components:
        t = torch.empty(layers, len(plan.positions[rank]), spec.num_heads, spec.head_dim,
                        dtype=spec.dtype)
        t.view(torch.uint8).random_(0, 256)
        local[spec.name] = t
    nbytes = gather_nbytes(cache, plan)
    slot = torch.empty(nbytes, dtype=torch.uint8)
    region = nbytes // world
    mine = slot[rank * region:(rank + 1) * region]
    single = _timed(lambda: dist.all_gather_single(slot, mine), args.repeats)
    chunks = [slot[where] for _, where in gather_chunks(cache, plan)]

    def chunked():  # the same bytes in the same chunks all_gather_kv uses: a like-for-like floor
        works = [dist.all_gather_single(c, c.view(world, -1)[rank], async_op=True)
                 for c in chunks]
        for w in works:
            w.wait()

    bare = _timed(chunked, args.repeats)
    full = _timed(lambda: all_gather_kv(local, plan, cache, ids, slot=slot, validate=False),
                  args.repeats)
    if writer is not None:
        base = dict(op="cp_gather", shape=name, page_size=PAGE_SIZE, tokens=tokens,
                    pattern="fragmented")
        for provider, t in (("all-gather-one-call", single), ("all-gather", bare),
                            ("cpkv-gather+reorganize", full)):
            writer.timing(metric_base=dict(provider=provider, **base), seconds=t,
                          moved_bytes=nbytes)
        writer.write(provider="cpkv-gather+reorganize", metric="time_vs_allgather", unit="x",
                     p50=full[0] / bare[0], p20=full[1] / bare[0], p80=full[2] / bare[0],
                     **base)
        writer.write(provider="cpkv-gather+reorganize", metric="time_vs_allgather_one_call",
                     unit="x", p50=full[0] / single[0], p20=full[1] / single[0],
                     p80=full[2] / single[0], **base)
    return (f"{nbytes / 2**20:.1f} MiB gathered, all-gather {bare[0] * 1e3:.1f} ms in "
            f"{len(chunks)} chunks ({single[0] * 1e3:.1f} ms in one call), gather+reorganize "
            f"{full[0] * 1e3:.1f} ms ({full[0] / bare[0]:.2f}x)")


def _rank(rank, world, port, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    writer = CsvWriter(args.out, provenance(torch.device("cpu"))) if rank == 0 else None
    tokens_list = QUICK_TOKENS if args.quick else FULL_TOKENS
    configs = [(s, n) for s in args.shapes.split(",") for n in tokens_list]
    for i, (name, tokens) in enumerate(configs, 1):
        line = _bench_config(rank, world, writer, name, tokens, args)
        if rank == 0:
            print(f"[{i}/{len(configs)}] {name} tokens={tokens}: {line}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 layers")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--shapes", default="A,C")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "cp.csv"))
    args = p.parse_args(argv)
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args))
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        print(f"bench_cp: ranks exited with {bad}", file=sys.stderr)
        return 1
    print(f"wrote rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
