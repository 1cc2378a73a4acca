"""What each spawned CP rank runs (see test_gather_mp.py)."""

from __future__ import annotations

import datetime
import os
import time

# These ranks gather CPU tensors over gloo, so their backend="triton" cases run the interpreter
# even on a CUDA host (the CUDA gather is tests/cp/test_gather_gpu.py). Set before cpkv.kernels
# is imported: @triton.jit reads it when the kernels are defined.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from kvtest import (  # noqa: E402
    as_bytes,
    assert_cache_equals,
    disjoint_page_lists,
    fill_sentinel,
    full_kv,
    local_shard,
    make_cache,
    mha,
    mla,
    oracle_sequence_pool,
    snapshot,
)
from mp import Recorder  # noqa: E402

from cpkv.cp import (  # noqa: E402
    GatherDone,
    GatherTimeoutError,
    SplitPlan,
    all_gather_kv,
    gather_nbytes,
    interleave_split,
    zigzag_split,
)
from cpkv.staging import ArenaError, StagingArena  # noqa: E402
from cpkv.transfer.status import KVStatus, agree  # noqa: E402


def _custom_split(seq_lens, world, order="custom"):
    """Another runner's split: zigzag's tokens, each rank's rows in reverse order."""
    zz = zigzag_split(seq_lens, world)
    return SplitPlan.from_positions([p.flip(0).numpy() for p in zz.positions], seq_lens)


SPLITS = {"zigzag": zigzag_split, "interleave": interleave_split, "custom": _custom_split}
KINDS = {"mha": mha, "mla": mla}
NUM_LAYERS = 3


def scenarios(world):
    out = []
    for split in SPLITS:
        for kind in KINDS:
            for mode in ("layer", "all"):
                out.append(dict(name=f"{split}-{kind}-{mode}", split=split, kind=kind,
                                seq_lens=[29], page_size=4, mode=mode))
    out.append(dict(name="zigzag-batch-uneven", split="zigzag", kind="mha",
                    seq_lens=[17, 8 * world + 1, 40], page_size=16, mode="all"))
    out.append(dict(name="interleave-batch-ps1-triton", split="interleave", kind="mha",
                    seq_lens=[13, 7], page_size=1, mode="layer", backend="triton"))
    out.append(dict(name="zigzag-mla-2d-shard-hnd", split="zigzag", kind="mla",
                    seq_lens=[31], page_size=16, mode="layer", layout="HND", squeeze=True))
    out.append(dict(name="zigzag-mha-layer-chunks", split="zigzag", kind="mha",
                    seq_lens=[23, 9], page_size=4, mode="all", chunk_bytes=1))
    out.append(dict(name="zigzag-3seq-padded-shards-numpy-ids", split="zigzag", kind="mha",
                    seq_lens=[13, 8 * world, 21], page_size=4, mode="layer", pad_rows=5,
                    ids_as="numpy"))
    out.append(dict(name="interleave-batch-short-seq-list-ids", split="interleave",
                    kind="mla", seq_lens=[1, 5, 9], page_size=2, mode="all", pad_rows=2,
                    ids_as="list"))
    out.append(dict(name="zigzag-sequence-order", split="zigzag", kind="mha",
                    seq_lens=[12, 17], page_size=4, mode="all", order="sequence"))
    out.append(dict(name="custom-from-positions", split="custom", kind="mha",
                    seq_lens=[10, 7 * world], page_size=4, mode="layer", order="custom"))
    return out


def _pad(local, pad_rows, axis, seed=11):
    """Append junk rows (a runner's CUDA-graph padding) after the real ones."""
    if not pad_rows:
        return local
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in local.items():
        shape = list(t.shape)
        shape[axis] = pad_rows
        junk = torch.empty(shape, dtype=t.dtype)
        as_bytes(junk).copy_(torch.randint(0, 256, as_bytes(junk).shape, generator=g,
                                           dtype=torch.uint8))
        out[n] = torch.cat([t, junk], dim=axis)
    return out


def _ids_as(pages, how):
    if how == "numpy":
        return [p.numpy() for p in pages]
    if how == "list":
        return [p.tolist() for p in pages]
    return pages


def gather_scenario(rank, world, arena, *, split, kind, seq_lens, page_size, mode,
                    backend="auto", layout="NHD", squeeze=False, chunk_bytes=None,
                    pad_rows=0, ids_as=None, order="batch"):
    import cpkv.cp.gather as gather_mod

    if chunk_bytes is not None:  # one layer per chunk: gathers overlap reorganizes
        gather_mod.GATHER_CHUNK_BYTES, saved = chunk_bytes, gather_mod.GATHER_CHUNK_BYTES
        try:
            return gather_scenario(rank, world, arena, split=split, kind=kind,
                                   seq_lens=seq_lens, page_size=page_size, mode=mode,
                                   backend=backend, layout=layout, squeeze=squeeze,
                                   pad_rows=pad_rows, ids_as=ids_as, order=order)
        finally:
            gather_mod.GATHER_CHUNK_BYTES = saved
    plan = SPLITS[split](seq_lens, world, order=order)
    specs = KINDS[kind]()
    need = sum(-(-n // page_size) for n in plan.seq_lens)
    cache = fill_sentinel(make_cache(specs, num_layers=NUM_LAYERS, num_pages=need + 2,
                                     page_size=page_size, layout=layout))
    pages = disjoint_page_lists(cache.num_pages, plan.seq_lens, page_size, seed=1)
    full = full_kv(specs, NUM_LAYERS, plan.total_len, seed=3)  # the same on every rank
    want = oracle_sequence_pool(cache, full, plan.seq_lens, pages, range(NUM_LAYERS))
    local = _pad(local_shard(full, plan, rank), pad_rows, axis=1)
    pages_in = _ids_as(pages, ids_as)
    ids = pages_in[0] if len(pages_in) == 1 else pages_in
    if mode == "layer":  # as a model runner calls it, layer by layer, reusing one slot
        slot = arena.alloc(gather_nbytes(cache, plan, layers=0))
        for layer in range(NUM_LAYERS):
            shard = {n: (t[layer].squeeze(1) if squeeze else t[layer]) for n, t in local.items()}
            done = all_gather_kv(shard, plan, cache, ids, slot=slot, layers=layer,
                                 backend=backend)
            assert isinstance(done, GatherDone) and done.query()  # CPU: bytes already there
    else:
        slot = arena.alloc(gather_nbytes(cache, plan))
        all_gather_kv(local, plan, cache, ids, slot=slot, backend=backend)
    arena.check_symmetric([slot])
    slot.release()
    assert_cache_equals(cache, want)


def chunked_prefill_mid_page(rank, world, arena):
    """Two prefill chunks of a 2-sequence batch; chunk 2 continues mid-page at token_offset."""
    ps, first, second = 4, [9, 7], [8, 6]
    totals = [a + b for a, b in zip(first, second, strict=True)]
    specs = mha()
    cache = fill_sentinel(make_cache(specs, num_layers=NUM_LAYERS, num_pages=12, page_size=ps))
    pages = disjoint_page_lists(cache.num_pages, totals, ps, seed=4)
    full = full_kv(specs, NUM_LAYERS, sum(totals), seed=5)  # sequence order, both sequences
    starts = [0, totals[0]]

    def part(lo, hi):  # tokens [lo, hi) of every sequence, batch-concatenated
        return {n: torch.cat([t[:, s + lo[i]:s + hi[i]] for i, s in enumerate(starts)], dim=1)
                for n, t in full.items()}
    want1 = oracle_sequence_pool(cache, part([0, 0], first), first, pages, range(NUM_LAYERS))
    want2 = oracle_sequence_pool(cache, full, totals, pages, range(NUM_LAYERS))
    for lens, chunk, offset, want in ((first, part([0, 0], first), 0, want1),
                                      (second, part(first, totals), first, want2)):
        plan = zigzag_split(lens, world)
        with arena.alloc(gather_nbytes(cache, plan)) as slot:
            all_gather_kv(local_shard(chunk, plan, rank), plan, cache, pages, slot=slot,
                          token_offset=offset)
        assert_cache_equals(cache, want, f"pool after the chunk at offset {offset}")


def torch_floor_without_all_gather_single(rank, world, arena):
    """torch < 2.13 has no dist.all_gather_single: the gather falls back to
    all_gather_into_tensor."""
    saved = getattr(dist, "all_gather_single", None)
    if saved is not None:
        del dist.all_gather_single
    try:
        assert not hasattr(dist, "all_gather_single")
        gather_scenario(rank, world, arena, split="zigzag", kind="mha", seq_lens=[14, 9],
                        page_size=4, mode="layer")
    finally:
        if saved is not None:
            dist.all_gather_single = saved


def local_copies_per_component(rank, world, arena):
    """The local shard goes into the slot with one strided copy per component (per chunk),
    not one per layer and component."""
    calls = []
    original = torch.Tensor.copy_

    def counting(self, *a, **k):
        calls.append(tuple(self.shape))
        return original(self, *a, **k)
    plan = zigzag_split([16], world)
    cache = fill_sentinel(make_cache(mha(), num_layers=NUM_LAYERS, num_pages=6, page_size=4))
    local = local_shard(full_kv(mha(), NUM_LAYERS, 16), plan, rank)
    with arena.alloc(gather_nbytes(cache, plan)) as slot:
        torch.Tensor.copy_ = counting
        try:
            all_gather_kv(local, plan, cache, torch.arange(4), slot=slot, backend="torch")
        finally:
            torch.Tensor.copy_ = original
    shard_copies = [c for c in calls if c[:2] == (NUM_LAYERS, len(plan.positions[rank]))]
    assert len(shard_copies) == 2, calls  # K and V, every layer in one copy each


def no_sync_after_the_first_layer(rank, world, arena):
    """Layer by layer with validate=True: the ids are read back once (when the token map is
    built); later layers read nothing back from the device."""
    plan = zigzag_split([13, 10], world)
    cache = fill_sentinel(make_cache(mha(), num_layers=NUM_LAYERS, num_pages=8, page_size=4))
    pages = disjoint_page_lists(cache.num_pages, plan.seq_lens, 4, seed=2)
    full = full_kv(mha(), NUM_LAYERS, plan.total_len, seed=6)
    want = oracle_sequence_pool(cache, full, plan.seq_lens, pages, range(NUM_LAYERS))
    local = local_shard(full, plan, rank)
    reads = []
    names = ("item", "tolist", "cpu", "numpy", "min", "max", "__int__", "__bool__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def wrapper(self, *a, **k):
            reads.append(name)
            return saved[name](self, *a, **k)
        return wrapper
    with arena.alloc(gather_nbytes(cache, plan, layers=0)) as slot:
        for layer in range(NUM_LAYERS):
            if layer == 1:
                for n in names:
                    setattr(torch.Tensor, n, counting(n))
            try:
                all_gather_kv({n: t[layer] for n, t in local.items()}, plan, cache, pages,
                              slot=slot, layers=layer, backend="triton")
            finally:
                for n in names:
                    setattr(torch.Tensor, n, saved[n])
    assert reads == [], f"device reads after the first layer: {reads}"
    assert_cache_equals(cache, want)


def other_group_refused(rank, world, arena):
    """A host-shared arena's slot is symmetric over its own group only."""
    other = dist.new_group(list(range(world)))
    plan = zigzag_split(4 * world, world)
    cache = fill_sentinel(make_cache(mha(), num_layers=1, num_pages=8, page_size=4))
    before = snapshot(cache)
    local = {n: t[0] for n, t in local_shard(full_kv(mha(), 1, 4 * world), plan, rank).items()}
    with arena.alloc(gather_nbytes(cache, plan, layers=0)) as slot:
        try:
            all_gather_kv(local, plan, cache, torch.arange(world), slot=slot, layers=0,
                          group=other)
        except ValueError as e:
            assert "expected the process group the slot's arena was registered with" in str(e)
        else:
            raise AssertionError("all_gather_kv accepted a group other than the arena's")
    assert_cache_equals(cache, before, "pool after a refused gather")


def arena_offsets_and_peers(rank, world, arena):
    """Same allocation sequence -> same offsets; a rank's writes are visible to its peers."""
    slots = [arena.alloc(n) for n in (100, 5000, 1)]
    arena.check_symmetric()
    for s in slots:
        s.tensor.fill_(rank + 1)
    dist.barrier()
    for s in slots:
        for r in range(world):
            got = s.peer(r)
            assert bool((got == r + 1).all()), f"slot {s.offset}: rank {r}'s bytes not visible"
    dist.barrier()
    for s in slots:
        s.release()


def arena_asymmetry_detected(rank, world, arena):
    slot = arena.alloc(4096 if rank == 0 else 8192)
    slot2 = arena.alloc(10)  # lands at a different offset on rank > 0
    try:
        arena.check_symmetric()
    except ArenaError as e:
        assert "differs" in str(e), e
    else:
        raise AssertionError("check_symmetric accepted different slot sizes")
    finally:
        slot.release()
        slot2.release()


def failing_rank(rank, world, arena, timeout=3.0):
    """Rank 1 passes a shard of the wrong length: it raises at once; the others time out."""
    plan = zigzag_split(24, world)
    cache = fill_sentinel(make_cache(mha(), num_layers=1, num_pages=8, page_size=4))
    before = snapshot(cache)
    full = full_kv(mha(), 1, 24)
    local = {n: t[0] for n, t in local_shard(full, plan, rank).items()}
    if rank == 1:
        local = {n: t[:-1] for n, t in local.items()}
    slot = arena.alloc(gather_nbytes(cache, plan, layers=0))
    t0 = time.monotonic()
    try:
        all_gather_kv(local, plan, cache, torch.arange(6), slot=slot, layers=0, timeout=timeout)
    except ValueError as e:
        assert rank == 1 and "this rank owns" in str(e), e
        time.sleep(timeout + 2)  # stay alive: the others must time out, not see a closed socket
    except GatherTimeoutError as e:
        assert rank != 1, e
        elapsed = time.monotonic() - t0
        assert timeout - 0.5 <= elapsed <= timeout + 10, f"timed out after {elapsed:.1f} s"
        assert "did not complete the all-gather within 3.0 s" in str(e)
    else:
        raise AssertionError("all_gather_kv succeeded with a bad shard on rank 1")
    finally:
        slot.release()
    assert_cache_equals(cache, before, "pool after a failed gather")


def status_agreement(rank, world):
    """MIN over the CP group then the TP group; a Failed anywhere is Failed everywhere.

    2 ranks: CP = {0, 1}, each rank its own TP group. 3 ranks: CP = {0, 1}, TP = {1, 2}, so
    rank 2's view reaches rank 0 only through rank 1 (CP first, then TP)."""
    cp_groups = [dist.new_group([0, 1])] + ([dist.new_group([2])] if world == 3 else [])
    tp_groups = [dist.new_group([r]) for r in range(world)] if world == 2 else \
        [dist.new_group([0]), dist.new_group([1, 2])]
    cp_group = cp_groups[0] if rank < 2 else cp_groups[1]
    tp_group = tp_groups[rank] if world == 2 else (tp_groups[0] if rank == 0 else tp_groups[1])
    S, T, W, F = (KVStatus.Success, KVStatus.Transferring, KVStatus.WaitingForInput,
                  KVStatus.Failed)
    mine = {0: [S, S, T, S], 1: [S, W, S, S], 2: [S, S, S, F]}[rank]
    got = agree(mine, [cp_group, tp_group])
    if world == 2:
        assert got == [S, W, T, S], got
    else:  # rank 0 never meets rank 2 directly, so its Failed reaches rank 0 only next round
        want = {0: [S, W, T, S], 1: [S, W, T, F], 2: [S, W, T, F]}[rank]
        assert got == want, (rank, got, want)


def rank_main(rank, world, port, out_path):
    rec = Recorder(out_path)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        arena = StagingArena(1 << 22, backend="host-shared")
        rec.run("status-agreement", status_agreement, rank, world)
        rec.run("arena-offsets-and-peers", arena_offsets_and_peers, rank, world, arena)
        rec.run("arena-asymmetry-detected", arena_asymmetry_detected, rank, world, arena)
        for sc in scenarios(world):
            sc = dict(sc)
            rec.run(sc.pop("name"), gather_scenario, rank, world, arena, **sc)
        rec.run("chunked-prefill-mid-page", chunked_prefill_mid_page, rank, world, arena)
        rec.run("torch-floor-all-gather-into-tensor", torch_floor_without_all_gather_single,
                rank, world, arena)
        rec.run("local-copies-per-component", local_copies_per_component, rank, world, arena)
        rec.run("other-group-refused", other_group_refused, rank, world, arena)
        rec.run("no-sync-after-the-first-layer", no_sync_after_the_first_layer, rank, world,
                arena)
        rec.run("arena-empty-after-scenarios", lambda: None if not arena.live_slots else
                (_ for _ in ()).throw(AssertionError(f"live slots {arena.live_slots}")))
        rec.run("failing-rank-times-out", failing_rank, rank, world, arena)  # last: breaks gloo
        arena.close()
    except Exception as e:  # reported as its own entry; the parent's asserts name it
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)  # the failure scenario leaves the gloo group unusable: do not tear it down
