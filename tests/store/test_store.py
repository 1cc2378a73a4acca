"""KVStore against a real `mooncake_master` on loopback (one master for the module)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from kvtest import (
    assert_cache_equals,
    fill_sentinel,
    make_cache,
    mha,
    mla,
    oracle_unpack,
    snapshot,
    three,
)
from mp import free_port

from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.store import KVStore, MasterProcess, StoreError

pytestmark = pytest.mark.mp

T = 16  # store page size


@pytest.fixture(scope="module")
def master():
    with MasterProcess() as m:
        yield m


@pytest.fixture(scope="module")
def store(master):
    s = KVStore(page_size=T, model="t", master=master.address, segment_nbytes=64 << 20,
                staging_nbytes=4 << 20, local_buffer_nbytes=4 << 20, batch_pages=3)
    yield s
    s.close()


_ns = iter(range(10**6))


def prompt(n_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n_tokens,), generator=g)


def fresh(store: KVStore) -> str:
    """A model id no earlier test wrote (tests share the master)."""
    store.model = f"t{next(_ns)}"
    return store.model


def writer_pool(specs, page_size, n_pages, layers=3, seed=0):
    cache = make_cache(specs, num_layers=layers, num_pages=n_pages + 5, page_size=page_size,
                       seed=seed)
    ids = torch.randperm(n_pages + 5, generator=torch.Generator().manual_seed(seed))[:n_pages]
    return cache, ids


@pytest.mark.parametrize("specs", [mha(), mla(), three()], ids=["mha", "mla", "3comp"])
@pytest.mark.parametrize("reader_ps", [1, 16, 64, 24], ids=lambda p: f"read_ps{p}")
def test_roundtrip_any_reader_page_size(store, specs, reader_ps):
    fresh(store)
    tokens = prompt(5 * T + 7, seed=reader_ps)  # 5 full store pages and a tail
    src, src_ids = writer_pool(specs, 8, 11)  # pool page 8 divides the store page
    put = store.put_prefix(src, src_ids, tokens)
    assert (put.share, put.written, put.skipped) == (range(5), 5, 0)
    assert store.match_prefix(tokens, src) == 5
    dst = fill_sentinel(make_cache(specs, num_layers=3, num_pages=90, page_size=reader_ps))
    need = -(-5 * T // reader_ps)
    dst_ids = torch.randperm(90, generator=torch.Generator().manual_seed(1))[:need]
    want = oracle_unpack(src, src_ids, dst, dst_ids, 5 * T, range(3), range(dst.num_heads),
                         range(3), range(dst.num_heads))
    got = store.load_prefix(dst, dst_ids, tokens)
    assert (got.num_pages, got.num_tokens, got.requested, got.reason) == (5, 80, 5, None)
    assert got.full_pages == 80 // reader_ps
    assert_cache_equals(dst, want)  # loaded bytes exact, every other byte still the sentinel


def test_existing_keys_skipped(store):
    fresh(store)
    tokens = prompt(4 * T, seed=3)
    src, ids = writer_pool(mha(), T, 4)
    assert store.put_prefix(src, ids, tokens[:2 * T]).written == 2
    again = store.put_prefix(src, ids, tokens)
    assert (again.written, again.skipped) == (2, 2)
    dst = fill_sentinel(make_cache(mha(), num_layers=3, num_pages=4, page_size=T))
    want = oracle_unpack(src, ids, dst, [3, 2, 1, 0], 4 * T, range(3), range(2), range(3),
                         range(2))
    assert store.load_prefix(dst, [3, 2, 1, 0], tokens).num_pages == 4
    assert_cache_equals(dst, want)  # the pages written second are pages 2 and 3, not 0 and 1


def test_layer_range_and_head_slice(store):
    """A PP stage's layers and a TP rank's heads go to a reader holding the whole model."""
    fresh(store)
    tokens = prompt(3 * T, seed=4)
    heads2 = mha(num_heads=2)
    stage1_tp1 = dict(rank=ParallelRank(tp=1, pp=1), sizes=ParallelSizes(tp=2, pp=2))
    src, ids = writer_pool(heads2, T, 3, layers=2)  # this rank's pool: 2 layers, 2 heads
    # With one KV head in the model, TP rank 1 replicates rank 0's shard: it writes nothing.
    assert store.put_prefix(src, ids, tokens, **stage1_tp1).share == range(0)
    store.num_kv_heads = 4  # four KV heads over TP2: rank 1 holds heads [2, 4), its own shard
    try:
        put = store.put_prefix(src, ids, tokens, **stage1_tp1)
        assert store.keys(tokens, src, **stage1_tp1)[0].endswith("/pp1/tp1")
        assert store.match_prefix(tokens, src) == 0  # the single-rank keys are different keys
        assert store.match_prefix(tokens, src, **stage1_tp1) == 3
        got = _load_into_full_model(store, src, ids, tokens, stage1_tp1)
    finally:
        store.num_kv_heads = 1
    assert put.written == 3 and got.num_pages == 3


def _load_into_full_model(store, src, ids, tokens, at):
    full = fill_sentinel(make_cache(mha(num_heads=4), num_layers=4, num_pages=6, page_size=32))
    dst_ids = torch.tensor([4, 1])
    want = oracle_unpack(src, ids, full, dst_ids, 3 * T, range(2), range(2), range(2, 4),
                         range(2, 4))
    got = store.load_prefix(full, dst_ids, tokens, num_pages=3, layers=(2, 4), heads=(2, 4),
                            **at)
    assert (got.num_pages, got.full_pages) == (3, 1)
    assert_cache_equals(full, want)
    return got


def test_wrong_geometry_is_a_miss_not_garbage(store):
    fresh(store)
    tokens = prompt(2 * T, seed=5)
    src, ids = writer_pool(mha(num_heads=2), T, 2)
    store.put_prefix(src, ids, tokens)
    dst = fill_sentinel(make_cache(mha(num_heads=1), num_layers=3, num_pages=4, page_size=T))
    before = snapshot(dst)
    got = store.load_prefix(dst, [0, 1], tokens, num_pages=2)  # half the bytes per page
    assert got.num_pages == 0 and "did not arrive" in got.reason
    assert_cache_equals(dst, before)


def test_eviction_between_match_and_load(store):
    fresh(store)
    tokens = prompt(7 * T, seed=6)
    src, ids = writer_pool(mha(), T, 7)
    store.put_prefix(src, ids, tokens)
    hit = store.match_prefix(tokens, src)
    assert hit == 7
    key4 = store.keys(tokens, src)[4]
    assert store.client.remove(key4, True) == 0  # evicted behind the reader's back
    dst = fill_sentinel(make_cache(mha(), num_layers=3, num_pages=10, page_size=T))
    dst_ids = torch.arange(7)
    want = oracle_unpack(src, ids, dst, dst_ids[:4], 4 * T, range(3), range(2), range(3),
                         range(2))
    got = store.load_prefix(dst, dst_ids, tokens, num_pages=hit)
    assert (got.num_pages, got.num_tokens, got.requested) == (4, 4 * T, 7)
    assert key4 in got.reason
    assert_cache_equals(dst, want)  # pages 4.. (positions of dst_ids) untouched
    assert store.match_prefix(tokens, src) == 4


def test_evict_from_a_page(store):
    fresh(store)
    tokens = prompt(5 * T, seed=7)
    src, ids = writer_pool(mla(), T, 5)
    store.put_prefix(src, ids, tokens)
    assert store.evict(tokens, src, start=2) == 3
    assert store.match_prefix(tokens, src) == 2


def test_validation_writes_nothing(store):
    fresh(store)
    tokens = prompt(2 * T, seed=8)
    src, ids = writer_pool(mha(), T, 2)
    with pytest.raises(TypeError, match="cache: expected PagedKVCache"):
        store.put_prefix("pool", ids, tokens)
    with pytest.raises(ValueError, match="page_ids: expected at least 2 pool pages"):
        store.put_prefix(src, ids[:1], tokens)
    with pytest.raises(ValueError, match="expected values in"):
        store.put_prefix(src, torch.tensor([0, 99]), tokens)
    odd, odd_ids = writer_pool(mha(), 5, 8)
    with pytest.raises(ValueError, match="expected a divisor of the store page size 16, got 5"):
        store.put_prefix(odd, odd_ids, tokens)
    with pytest.raises(TypeError, match="token_ids"):
        store.put_prefix(src, ids, torch.zeros(32))
    assert store.match_prefix(tokens, src) == 0  # nothing was written
    dst = make_cache(mha(), num_layers=3, num_pages=4, page_size=T)
    with pytest.raises(ValueError, match=r"num_pages: expected an int in \[0, 2\]"):
        store.load_prefix(dst, [0, 1], tokens, num_pages=3)
    with pytest.raises(ValueError, match="distinct"):
        store.load_prefix(dst, [0, 0], tokens, num_pages=2)
    with pytest.raises(ValueError, match="layers"):
        store.load_prefix(dst, [0, 1], tokens, num_pages=0, layers=(0, 9))


def test_constructor_validation_and_unreachable_master():
    with pytest.raises(ValueError, match="page_size"):
        KVStore(page_size=0, model="m", master="127.0.0.1:1")
    with pytest.raises(ValueError, match="kind"):
        KVStore(page_size=4, model="m", master="127.0.0.1:1", kind="gqa")
    with pytest.raises(ValueError, match="model"):
        KVStore(page_size=4, model="a/b", master="127.0.0.1:1")
    with pytest.raises(TypeError, match="model"):  # no default: whose KV it is must be said
        KVStore(page_size=4, master="127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="unreachable"):
        KVStore(page_size=4, model="m", master=f"127.0.0.1:{free_port()}", connect_timeout=0.5)
    assert time.monotonic() - t0 < 5  # a probe, not Mooncake's 90 s of retries


@pytest.mark.slow
def test_master_down_mid_run(store):
    """Reads miss cleanly, a put is a StoreError, close returns: all within Mooncake's RPC
    timeouts (~4 s a call here; the bounds leave room for a loaded machine)."""
    with MasterProcess() as m:
        s = KVStore(page_size=T, model="t", master=m.address, segment_nbytes=16 << 20,
                    staging_nbytes=1 << 20, local_buffer_nbytes=4 << 20)
        try:
            tokens = prompt(3 * T, seed=9)
            src, ids = writer_pool(mha(), T, 3)
            s.put_prefix(src, ids, tokens[:T])
            assert s.match_prefix(tokens, src) == 1
            streamed = fill_sentinel(make_cache(mha(), num_layers=3, num_pages=3, page_size=T))
            load = s.load_prefix_async(streamed, [2], tokens, num_pages=1, layer_groups=[1, 2],
                                       start=False)
            assert load.step() and load.layers_ready == 1  # layer 0 in, then the master dies
            m.stop()
            t0 = time.monotonic()
            assert not load.step()  # a dead master mid-load: stops cleanly, says what loaded
            mid = load.result()
            assert (mid.num_pages, mid.num_layers) == (1, 1) and "layers [1, 3)" in mid.reason
            assert_cache_equals(streamed, oracle_unpack(
                src, ids, streamed, [2], T, range(1), range(2), range(1), range(2),
                want=snapshot(fill_sentinel(make_cache(mha(), num_layers=3, num_pages=3,
                                                       page_size=T)))))
            assert s.match_prefix(tokens, src) == 0
            dst = fill_sentinel(make_cache(mha(), num_layers=3, num_pages=3, page_size=T))
            before = snapshot(dst)
            got = s.load_prefix(dst, [0, 1, 2], tokens, num_pages=1)
            assert got.num_pages == 0 and got.reason
            assert_cache_equals(dst, before)
            assert time.monotonic() - t0 < 20
            with pytest.raises(StoreError, match=m.address) as err:
                s.put_prefix(src, ids, tokens)
            assert err.value.code < 0
            assert not s._arena.live_slots  # the failed put released its slots
            assert time.monotonic() - t0 < 40
        finally:
            t0 = time.monotonic()
            s.close()
            assert time.monotonic() - t0 < 60
    with pytest.raises(StoreError, match="closed"):
        s.match_prefix(tokens, src)


@pytest.mark.slow
def test_embedded_master_owned_by_store():
    s = KVStore(page_size=4, model="m", segment_nbytes=16 << 20, staging_nbytes=1 << 20,
                local_buffer_nbytes=4 << 20)
    proc = s._owned_master.proc
    assert proc.poll() is None
    src, ids = writer_pool(mla(), 4, 2)
    s.put_prefix(src, ids, list(range(8)))
    assert s.match_prefix(list(range(8)), src) == 2
    dst = make_cache(mla(), num_layers=3, num_pages=2, page_size=4)
    load = s.load_prefix_async(dst, [1, 0], list(range(8)))  # still running at close
    s.close()  # waits for the background load before releasing the client and the arena
    assert load.done and load.result().num_layers == 3
    assert proc.poll() is not None  # stopped and reaped
    s.close()  # idempotent


def test_strided_writer_to_hnd_reader(store):
    """A head-sliced (strided) writer pool and an HND reader pool: same bytes either way."""
    fresh(store)
    tokens = prompt(4 * T, seed=10)
    src = make_cache(mha(num_heads=2), num_layers=3, num_pages=6, page_size=T, strided="heads")
    ids = torch.tensor([5, 0, 3, 1])
    assert store.put_prefix(src, ids, tokens).written == 4
    dst = fill_sentinel(make_cache(mha(num_heads=2), num_layers=3, num_pages=9, page_size=8,
                                   layout="HND"))
    dst_ids = torch.tensor([8, 1, 2, 7, 0, 3, 5, 4], dtype=torch.int32)
    want = oracle_unpack(src, ids, dst, dst_ids, 4 * T, range(3), range(2), range(3), range(2))
    got = store.load_prefix(dst, dst_ids, tokens)
    assert (got.num_pages, got.full_pages) == (4, 8)
    assert_cache_equals(dst, want)


def test_staging_too_small_is_a_value_error(master):
    with KVStore(page_size=64, model="t", master=master.address, segment_nbytes=16 << 20,
                 staging_nbytes=64 << 10, local_buffer_nbytes=4 << 20) as s:
        big = make_cache(mha(num_heads=2), num_layers=3, num_pages=2, page_size=64)
        with pytest.raises(ValueError, match="staging_nbytes: expected room for two store pages"):
            s.put_prefix(big, [0, 1], list(range(128)))
        assert s.match_prefix(list(range(128)), big) == 0


def test_embedded_master_outlives_the_thread_that_made_the_store():
    """Issue 18 item 5: PR_SET_PDEATHSIG fires when the *thread* that forked the master exits,
    so a store made in a worker thread used to lose its master with that thread while the
    owner process lived on. The master lives as long as the store (and the process)."""
    box = {}

    def make():
        box["store"] = KVStore(page_size=4, model="m", segment_nbytes=16 << 20,
                               staging_nbytes=1 << 20, local_buffer_nbytes=4 << 20)

    worker = threading.Thread(target=make)
    worker.start()
    worker.join(60)
    s = box["store"]
    try:
        proc = s._owned_master.proc
        time.sleep(1.0)  # the parent-death signal, if any, arrives at the thread's exit
        assert proc.poll() is None, f"the master died with its creating thread: {proc.returncode}"
        src, ids = writer_pool(mla(), 4, 2)
        assert s.put_prefix(src, ids, list(range(8))).written == 2
        assert s.match_prefix(list(range(8)), src) == 2
    finally:
        s.close()
    assert proc.poll() is not None  # and it still stops with the store


GEOMETRIES = {  # writer pool, reader pool: the same bytes per store page, other geometry
    "heads-4x32-vs-2x64": ((mha(num_heads=4, head_dim=32, dtype=torch.float16), 3),
                           (mha(num_heads=2, head_dim=64, dtype=torch.float16), 3)),
    "fp16-vs-bf16": ((mha(dtype=torch.float16), 3), (mha(dtype=torch.bfloat16), 3)),
    "6x1-vs-3x2-heads": ((mha(num_heads=1), 6), (mha(num_heads=2), 3)),
}


@pytest.mark.parametrize("case", GEOMETRIES, ids=list(GEOMETRIES))
def test_other_geometry_of_equal_size_is_a_miss_with_a_reason(store, case):
    """Issue 18 item 3: values carry their geometry, so a reader of another geometry whose
    store pages have the same byte size never sees a hit and never loads them."""
    fresh(store)
    (wspec, wlayers), (rspec, rlayers) = GEOMETRIES[case]
    tokens = prompt(3 * T, seed=11)
    src = make_cache(wspec, num_layers=wlayers, num_pages=4, page_size=T, seed=2)
    dst = fill_sentinel(make_cache(rspec, num_layers=rlayers, num_pages=4, page_size=T))
    assert src.packed_nbytes(T) == dst.packed_nbytes(T)  # equal size: a size check cannot tell
    assert store.put_prefix(src, [0, 1, 2], tokens).written == 3
    before = snapshot(dst)
    assert store.match_prefix(tokens, dst) == 0  # never a hit
    assert store.match_prefix(tokens, src) == 3  # (the writer's geometry finds them)
    got = store.load_prefix(dst, [0, 1, 2], tokens, num_pages=3)
    assert got.num_pages == 0 and got.reason and "geometry" in got.reason, got
    assert_cache_equals(dst, before)


# -- streaming loads (layer group by layer group) ---------------------------------------------


def stored_prompt(store, specs, n_pages, layers=4, seed=20, page_size=8):
    """A prompt of ``n_pages`` full store pages (and a tail) written from a fresh pool."""
    fresh(store)
    tokens = prompt(n_pages * T + 3, seed=seed)
    src, ids = writer_pool(specs, page_size, n_pages * T // page_size + 1, layers=layers,
                           seed=seed)
    assert store.put_prefix(src, ids, tokens).written == n_pages
    return tokens, src, ids


@pytest.mark.parametrize("specs", [mha(), mla(), three()], ids=["mha", "mla", "3comp"])
@pytest.mark.parametrize("groups", [None, 2, [1, 3, 1]], ids=["doubling", "two", "1-3-1"])
@pytest.mark.parametrize("reader_ps", [16, 24], ids=lambda p: f"read_ps{p}")
def test_streaming_load_bytes(store, specs, groups, reader_ps):
    """Every group of every page lands bit-exactly at any reader page size; nothing else."""
    tokens, src, ids = stored_prompt(store, specs, 7, layers=5)
    dst = fill_sentinel(make_cache(specs, num_layers=5, num_pages=20, page_size=reader_ps))
    dst_ids = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:-(-7 * T //
                                                                              reader_ps)]
    want = oracle_unpack(src, ids, dst, dst_ids, 7 * T, range(5), range(dst.num_heads),
                         range(5), range(dst.num_heads))
    load = store.load_prefix_async(dst, dst_ids, tokens, layer_groups=groups)
    got = load.result(timeout=60)
    assert (got.num_pages, got.num_layers, got.reason, got.requested) == (7, 5, None, 7)
    assert load.layers_ready == 5 and load.done
    assert got.nbytes == 7 * src.packed_nbytes(T)
    assert_cache_equals(dst, want)


def test_layers_ready_counts_whole_groups_only(store):
    """Driven group by group: after each step exactly the finished groups' layers hold their
    bytes for every page, later layers are untouched; a group that lost a page mid-way (its
    first batches landed) is never counted, and the load says which layers did load."""
    tokens, src, ids = stored_prompt(store, mha(), 9, layers=6)  # batches of 3 pages
    dst = fill_sentinel(make_cache(mha(), num_layers=6, num_pages=12, page_size=T))
    dst_ids = torch.randperm(12, generator=torch.Generator().manual_seed(4))[:9]
    load = store.load_prefix_async(dst, dst_ids, tokens, num_pages=9, start=False)
    assert [(g.start, g.stop) for g in load.layer_groups] == [(0, 1), (1, 2), (2, 4), (4, 6)]
    assert load.layers_ready == 0
    for ready in (1, 2):
        assert load.step()
        assert load.layers_ready == ready
        want = oracle_unpack(src, ids, dst, dst_ids, 9 * T, range(ready), range(2),
                             range(ready), range(2), want=snapshot(fill_sentinel(
                                 make_cache(mha(), num_layers=6, num_pages=12, page_size=T))))
        assert_cache_equals(dst, want)  # layers >= ready: still the sentinel
    assert store.client.remove(store.keys(tokens, src)[7], True) == 0  # evicted mid-load
    assert not load.step()  # group [2, 4): pages 0-5 landed in two batches, page 7 did not
    got = load.result()
    assert (got.num_pages, got.num_layers, load.layers_ready) == (9, 2, 2)
    assert "layers [2, 4) stopped" in got.reason and "store page 7" in got.reason
    assert "not stored" in got.reason
    assert not store._arena.live_slots


def test_streaming_load_stops_at_the_first_missing_page(store):
    """A page missing when the load starts ends the prefix there for every layer: the first
    group finds it, later groups load only the pages before it, pages past it are untouched."""
    tokens, src, ids = stored_prompt(store, mla(), 8, layers=4)
    store.client.remove(store.keys(tokens, src)[5], True)
    dst = fill_sentinel(make_cache(mla(), num_layers=4, num_pages=10, page_size=T))
    dst_ids = torch.arange(8).flip(0)
    want = oracle_unpack(src, ids, dst, dst_ids[:5], 5 * T, range(4), range(1), range(4),
                         range(1))
    got = store.load_prefix_async(dst, dst_ids, tokens, num_pages=8).result(timeout=60)
    assert (got.num_pages, got.num_tokens, got.num_layers, got.requested) == (5, 5 * T, 4, 8)
    assert "store page 5" in got.reason and "geometry" in got.reason
    assert_cache_equals(dst, want)


def test_background_load_wait_and_validation(store):
    tokens, src, ids = stored_prompt(store, mha(num_heads=1), 6, layers=3)
    dst = make_cache(mha(num_heads=1), num_layers=3, num_pages=6, page_size=T)
    load = store.load_prefix_async(dst, torch.arange(6), tokens, layer_groups=[1, 2])
    assert load.wait(1, timeout=60) >= 1  # the first layer of every page is in
    assert load.event(1, timeout=60) is None  # CPU: no stream to order after
    with pytest.raises(RuntimeError, match="background"):
        load.step()
    got = load.result(timeout=60)
    assert (got.num_pages, got.num_layers) == (6, 3)
    empty = store.load_prefix_async(dst, [], tokens, num_pages=0).result(timeout=60)
    assert (empty.num_pages, empty.num_layers, empty.reason) == (0, 0, None)
    for bad, err in (([2, 2], ValueError), (0, ValueError), (4, ValueError), ("two", TypeError),
                     ([1, 1.5, 0.5], ValueError)):
        with pytest.raises(err, match="layer_groups"):
            store.load_prefix_async(dst, torch.arange(6), tokens, layer_groups=bad)
    assert not store._arena.live_slots


@pytest.mark.parametrize("reader_ps", [24, 64], ids=lambda p: f"read_ps{p}")
def test_batches_start_on_reader_pages(store, reader_ps):
    """A batch cap that is not a whole number of reader pages (5 store pages of 16 tokens vs
    reader pages of 24 or 64) is rounded down to one, streamed or not."""
    tokens, src, ids = stored_prompt(store, mha(), 11, layers=3)
    store.batch_pages = 5
    try:
        for groups in (1, None):
            dst = fill_sentinel(make_cache(mha(), num_layers=3, num_pages=9,
                                           page_size=reader_ps))
            dst_ids = torch.randperm(9, generator=torch.Generator().manual_seed(5))
            dst_ids = dst_ids[:-(-11 * T // reader_ps)]
            want = oracle_unpack(src, ids, dst, dst_ids, 11 * T, range(3), range(2), range(3),
                                 range(2))
            got = store.load_prefix_async(dst, dst_ids, tokens, layer_groups=groups)
            assert got.result(timeout=60).num_pages == 11
            assert_cache_equals(dst, want)
    finally:
        store.batch_pages = 3


def test_arena_empty_after_every_test(store):
    """Runs last in the module: every put and load above released its staging slots."""
    assert store._arena.live_slots == [] and store._arena.bytes_in_use == 0
