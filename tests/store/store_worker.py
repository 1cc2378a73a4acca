"""What each spawned rank runs (see test_store_mp.py): ranks 0 and 1 are a CP prefill group,
rank 2 a reader with another page size; every rank has its own Mooncake Store client."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, mla, oracle_unpack
from mp import Recorder

from cpkv.cp.partition import page_share
from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.store import KVStore

T = 8  # store page size
WRITER_PS, READER_PS = 4, 16
N_PAGES = 13  # full store pages of the prompt
LAYERS = 3
KINDS = {"mha": (mha, "mha", 2), "mla": (mla, "mla", 1)}


def prompt(seed: int, n_tokens: int = N_PAGES * T + 5) -> torch.Tensor:
    return torch.randint(0, 30_000, (n_tokens,), generator=torch.Generator().manual_seed(seed))


def writer_pool(specs):
    """Every CP rank's pool after the all-gather: the same bytes at the same request pages."""
    n = -(-(N_PAGES * T + 5) // WRITER_PS)
    cache = make_cache(specs, num_layers=LAYERS, num_pages=n + 3, page_size=WRITER_PS, seed=11)
    ids = torch.randperm(n + 3, generator=torch.Generator().manual_seed(5))[:n]
    return cache, ids


def cp_writers_reader(rank, store_for, kind):
    """Two CP writers store disjoint shares; the reader loads every page bit-exactly."""
    make, key_kind, heads = KINDS[kind]
    tokens = prompt(seed=len(kind))
    src, src_ids = writer_pool(make())
    if rank < 2:
        store = store_for(key_kind, heads, ParallelRank(cp=rank), ParallelSizes(cp=2))
        put = store.put_prefix(src, src_ids, tokens)
        want = page_share(N_PAGES, 2, rank)
        assert put.share == want and put.written == len(want) and put.skipped == 0, put
        dist.barrier()  # both shares written
        dist.barrier()  # the reader is done: only now may a writer's segment go
        return
    store = store_for(key_kind, heads, None, None)
    dist.barrier()
    try:
        dst = fill_sentinel(make_cache(make(), num_layers=LAYERS, num_pages=12,
                                       page_size=READER_PS))
        hit = store.match_prefix(tokens, dst)
        assert hit == N_PAGES, f"match_prefix: expected {N_PAGES}, got {hit}"
        dst_ids = torch.randperm(12, generator=torch.Generator().manual_seed(9))[:7]
        want = oracle_unpack(src, src_ids, dst, dst_ids, N_PAGES * T, range(LAYERS),
                             range(dst.num_heads), range(LAYERS), range(dst.num_heads))
        got = store.load_prefix(dst, dst_ids, tokens, num_pages=hit)
        assert (got.num_pages, got.num_tokens, got.full_pages) == (N_PAGES, N_PAGES * T, 6)
        assert_cache_equals(dst, want)
        # Streaming: ranged reads of values held in the writers' segments (other processes).
        again = fill_sentinel(make_cache(make(), num_layers=LAYERS, num_pages=12,
                                         page_size=READER_PS))
        streamed = store.load_prefix_async(again, dst_ids, tokens, num_pages=hit).result(60)
        assert (streamed.num_pages, streamed.num_layers, streamed.reason) == (N_PAGES, LAYERS,
                                                                             None), streamed
        assert_cache_equals(again, want)
    finally:
        dist.barrier()


def match_agreement(rank, store_for, tp_group):
    """TP ranks see different hit counts (rank 1's shard partly evicted): MIN over groups."""
    tokens = prompt(seed=42, n_tokens=5 * T)
    store = store_for("mha", 2, ParallelRank(tp=min(rank, 1)), ParallelSizes(tp=2))
    src = make_cache(mha(num_heads=1), num_layers=2, num_pages=10, page_size=T, seed=rank)
    if rank < 2:
        store.put_prefix(src, torch.arange(5), tokens)
        if rank == 1:
            assert store.evict(tokens, src, start=3) == 2
    dist.barrier()
    local = store.match_prefix(tokens, src)
    assert local == (5, 3, 3)[rank], f"rank {rank}: local hit {local}"
    if rank < 2:
        agreed = store.match_prefix(tokens, src, group=[tp_group, dist.group.WORLD])
    else:
        agreed = store.agree(local, dist.group.WORLD)
    assert agreed == 3, f"rank {rank}: agreed {agreed}, expected the MIN 3"
    dist.barrier()


def rank_main(rank, world, port, out_path, master):
    rec = Recorder(out_path)
    stores = []

    def store_for(kind, heads, rank, sizes):
        s = KVStore(page_size=T, master=master, rank=rank, sizes=sizes, kind=kind,
                    num_kv_heads=heads, model=f"mp-{kind}-{len(stores)}",
                    segment_nbytes=32 << 20,
                    staging_nbytes=1 << 20, local_buffer_nbytes=4 << 20, batch_pages=4)
        stores.append(s)
        return s

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        tp_group = dist.new_group([0, 1])
        for kind in KINDS:
            rec.run(f"cp-writers-reader-{kind}", cp_writers_reader, rank, store_for, kind)
        rec.run("match-agreement", match_agreement, rank, store_for, tp_group)
        dist.barrier()
        for s in stores:
            s.close()
        rec.run("closed", lambda: None if all(s.closed for s in stores) else 1 / 0)
    except Exception as e:  # reported as its own entry; the parent's asserts name it
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)
