"""`cpkv demo --store`: a CP prefill group stores a prompt, a reader of another page size loads it.

1. An embedded `mooncake_master` starts on loopback.
2. ``cp`` writer processes (a gloo group) each hold the prompt's whole KV (as after the CP
   all-gather: same bytes on every rank) and write their `page_share` of the full store pages
   with `KVStore.put_prefix`; then they agree on the stored prefix (`match_prefix` over the
   group) and put again, which skips every key.
3. The reader (this process), with its own client and a pool of another page size, matches and
   loads the prefix; every loaded byte is compared with the writers' pool.
4. A table: per writer the share, bytes, put time and throughput; the reader's get.

Writers keep their clients (and the segments holding their pages) open until the reader is done.
Times cover the store calls only (existence check, pack, put; get, unpack); verification is not
timed.
"""

from __future__ import annotations

import datetime
import multiprocessing
import queue as queue_mod
import time
import uuid
from dataclasses import dataclass

import torch

from .._net import free_port
from ..kernels import pack_pages
from ..parallel import ParallelRank, ParallelSizes
from ..shapes import SHAPES
from ..store import KVStore, MasterProcess
from .common import fill_random, share_cores

TIMEOUT = 300.0


@dataclass(frozen=True)
class StoreDemoConfig:
    shape: str = "A"
    page_size: int = 16  # writers' pool page size = the store page size
    tokens: int = 1024
    cp: int = 2
    layers: int | None = None
    reader_page_size: int | None = None  # default: 64, or 16 when page_size is 64
    device: str = "cpu"

    @property
    def reader_ps(self) -> int:
        if self.reader_page_size is not None:
            return self.reader_page_size
        return 16 if self.page_size == 64 else 64


def _pool(cfg: StoreDemoConfig, page_size: int, seed: int | None):
    shape = SHAPES[cfg.shape]
    n = -(-cfg.tokens // page_size)
    cache = shape.cache(num_pages=2 * n, page_size=page_size, num_layers=cfg.layers,
                        device=cfg.device)
    ids = torch.randperm(2 * n, generator=torch.Generator().manual_seed(page_size))[:n]
    if seed is not None:  # the prompt's KV: the same bytes on every CP rank
        g = torch.Generator().manual_seed(seed)
        for layers in cache.buffers.values():
            for t in layers:
                fill_random(t, g)
    return cache, ids.to(cfg.device)


def _prompt(cfg: StoreDemoConfig, seed: int = 7) -> torch.Tensor:
    """The demo prompt (seed 7); seed 8 is the untimed warm-up prompt (first touches of fresh
    segment and staging memory are slow, a served workload has them behind it)."""
    return torch.randint(0, 128_000, (cfg.tokens,), generator=torch.Generator().manual_seed(seed))


def _store(cfg, master, model, rank, sizes, segment) -> KVStore:
    shape = SHAPES[cfg.shape]
    mla = shape.components[0].name == "latent"
    return KVStore(page_size=cfg.page_size, master=master, rank=rank, sizes=sizes,
                   kind="mla" if mla else "mha", num_kv_heads=shape.components[0].num_heads,
                   model=model, segment_nbytes=segment, staging_nbytes=64 << 20)


def _writer(rank, cfg, master, port, model, segment, results, done) -> None:
    import torch.distributed as dist

    share_cores(cfg.cp + 1)  # the cp writers and the reader
    store = None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=cfg.cp, timeout=datetime.timedelta(seconds=120))
        cache, ids = _pool(cfg, cfg.page_size, seed=1)
        store = _store(cfg, master, model, ParallelRank(cp=rank), ParallelSizes(cp=cfg.cp),
                       segment)
        prompt = _prompt(cfg)
        store.put_prefix(cache, ids, _prompt(cfg, seed=8))  # warm-up, untimed
        dist.barrier()
        t0 = time.perf_counter()
        put = store.put_prefix(cache, ids, prompt)
        seconds = time.perf_counter() - t0
        dist.barrier()
        agreed = store.match_prefix(prompt, cache, group=dist.group.WORLD)
        again = store.put_prefix(cache, ids, prompt)
        results.put(dict(rank=rank, share=(put.share.start, put.share.stop),
                         written=put.written, nbytes=put.nbytes, seconds=seconds,
                         agreed=agreed, skipped_again=again.skipped))
        done.wait(TIMEOUT)
    except Exception as e:  # reported by the parent
        results.put(dict(rank=rank, error=f"{type(e).__name__}: {e}"))
    finally:
        if store is not None:
            store.close()


def run(cfg: StoreDemoConfig) -> int:
    """Run the store demo; prints the table; 0 when every byte matched."""
    ctx = multiprocessing.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    model = f"demo-{cfg.shape}-{uuid.uuid4().hex[:8]}"  # a fresh model id per run
    shape = SHAPES[cfg.shape]
    T, R = cfg.page_size, cfg.reader_ps
    n_pages = cfg.tokens // T
    page_nbytes = shape.packed_format(T, cfg.layers).nbytes
    segment = max(64 << 20, 3 * n_pages * page_nbytes // cfg.cp + (32 << 20))  # 2 prompts
    port = free_port()
    print(f"store demo: shape {cfg.shape} ({shape.model}), {cfg.tokens} tokens, "
          f"{cfg.layers or shape.num_layers} layers, store page {T} tokens "
          f"({n_pages} full pages), CP {cfg.cp} writers, reader page size {R}", flush=True)
    with MasterProcess() as master:
        print(f"mooncake_master on {master.address} (embedded, log {master.log_path})",
              flush=True)
        procs = [ctx.Process(target=_writer, args=(r, cfg, master.address, port, model,
                                                   segment, results, done))
                 for r in range(cfg.cp)]
        for p in procs:
            p.start()
        try:
            writers = []
            deadline = time.monotonic() + TIMEOUT
            while len(writers) < cfg.cp:
                try:
                    writers.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
                except queue_mod.Empty:
                    raise RuntimeError(f"CP writers did not report within {TIMEOUT} s") \
                        from None
            errors = [w["error"] for w in writers if "error" in w]
            if errors:
                raise RuntimeError(f"a CP writer failed: {errors[0]}")
            writers.sort(key=lambda w: w["rank"])
            reader = _read(cfg, master.address, model)
        finally:
            done.set()
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
                    p.join(10)
    _table(cfg, writers, reader)
    return 0 if reader["verified"] else 1


def _read(cfg: StoreDemoConfig, master: str, model: str) -> dict:
    share_cores(cfg.cp + 1)  # the cp writers and the reader
    prompt = _prompt(cfg)
    store = _store(cfg, master, model, None, None, 64 << 20)
    try:
        cache, ids = _pool(cfg, cfg.reader_ps, seed=None)
        warm = _prompt(cfg, seed=8)
        store.load_prefix(cache, ids, warm, num_pages=store.match_prefix(warm, cache))  # untimed
        hit = store.match_prefix(prompt, cache)
        t0 = time.perf_counter()
        got = store.load_prefix(cache, ids, prompt, num_pages=hit)
        seconds = time.perf_counter() - t0
    finally:
        store.close()
    src, src_ids = _pool(cfg, cfg.page_size, seed=1)  # what the writers held
    verified = got.num_pages == hit == cfg.tokens // cfg.page_size and torch.equal(
        pack_pages(src, src_ids, num_tokens=got.num_tokens),
        pack_pages(cache, ids, num_tokens=got.num_tokens))
    return dict(hit=hit, pages=got.num_pages, tokens=got.num_tokens, nbytes=got.nbytes,
                seconds=seconds, verified=verified, reason=got.reason)


def _table(cfg, writers, reader) -> None:
    def row(who, pages, nbytes, seconds, note):
        gbs = nbytes / seconds / 1e9 if seconds > 0 else float("nan")
        print(f"| {who:<16} | {pages:>13} | {nbytes / 2**20:9.1f} | {seconds * 1e3:9.1f} | "
              f"{gbs:6.2f} | {note} |")

    print("| side             | store pages   |       MiB |        ms |   GB/s | note |")
    print("| --- | --- | --- | --- | --- | --- |")
    for w in writers:
        a, b = w["share"]
        row(f"put, CP rank {w['rank']}", f"[{a}, {b})", w["nbytes"], w["seconds"],
            f"wrote {w['written']}; agreed hit {w['agreed']}; 2nd put skipped "
            f"{w['skipped_again']}")
    total = sum(w["nbytes"] for w in writers)
    slowest = max(w["seconds"] for w in writers)
    row("put, group", f"{sum(w['written'] for w in writers)}", total, slowest,
        "bytes of all ranks / slowest rank")
    row(f"get, reader ps{cfg.reader_ps}", f"{reader['pages']} of {reader['hit']}",
        reader["nbytes"], reader["seconds"],
        ("every byte verified" if reader["verified"] else
         f"MISMATCH ({reader['reason'] or 'bytes differ'})"))
