"""Transfers across parallel layouts (heterogeneous TP, PP stages, routes whose source layers
start above 0, MLA) and pool layouts (HND, pages strided in a larger buffer), packed and
direct, with CP 2 on the prefill side: every decode pool equals a cell-by-cell expectation.
Also direct's page runs and batches, and the cost model that chooses direct or packed."""

import itertools

import pytest
import torch
from kvtest import (
    as_bytes,
    assert_cache_equals,
    fill_sentinel,
    make_cache,
    mha,
    oracle_unpack,
    snapshot,
)
from txtest import wait_all

from cpkv import ComponentSpec, PagedKVCache
from cpkv.parallel import ParallelSizes, heads_of, layers_of
from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank
from cpkv.transfer.cost import CostModel
from cpkv.transfer.direct import contiguous_runs
from cpkv.transfer.mapping import map_ranks

PS, TOKENS, LAYERS, HEAD_DIM, CP = 4, 22, 3, 16, 2


def global_kv(kind, num_heads, seed=0):
    """[layers, tokens, heads, dim] per component: the whole model's KV for one request."""
    g = torch.Generator().manual_seed(seed)
    names = ["latent"] if kind == "mla" else ["k", "v"]
    out = {}
    for n in names:
        t = torch.empty(LAYERS, TOKENS, num_heads, HEAD_DIM, dtype=torch.bfloat16)
        as_bytes(t).copy_(torch.randint(0, 256, as_bytes(t).shape, generator=g,
                                        dtype=torch.uint8))
        out[n] = t
    return out


def pool(kind, heads, layers, num_pages, layout="NHD"):
    names = ["latent"] if kind == "mla" else ["k", "v"]
    specs = [ComponentSpec(n, heads, HEAD_DIM, torch.bfloat16) for n in names]
    return fill_sentinel(PagedKVCache.empty(specs, num_layers=layers, num_pages=num_pages,
                                            page_size=PS, layout=layout))


def write_tokens(cache, full, ids, heads: range, layers: range, want=None):
    """Cell by cell: pool[ids[t // PS], t % PS, :, :] = full[layer, t, heads] for each layer."""
    want = snapshot(cache) if want is None else want
    for name in full:
        for i, layer in enumerate(layers):
            view = want[name][i]
            if cache.layout == "HND":
                view = view.transpose(1, 2)
            for t in range(TOKENS):
                view[int(ids[t // PS]), t % PS] = as_bytes(full[name][layer, t, heads.start:
                                                                     heads.stop])
    return want


def run_layout(kind, num_heads, p: ParallelSizes, d: ParallelSizes, mode, rig, layout="NHD"):
    """One agent per rank on each side: every prefill rank ships to every decode rank of the
    request (``to=`` all of them) and sends each only the route it feeds it, if any. Returns
    the number of (sender, receiver) pairs that carried bytes."""
    engine, send_arena, recv_arena = rig
    full = global_kv(kind, num_heads)
    n_pages = -(-TOKENS // PS)
    src_ids = torch.randperm(2 * n_pages)[:n_pages]
    model = dict(kind=kind, num_kv_heads=num_heads, num_layers=LAYERS)
    receivers, expected = [], []
    for dt, dq in itertools.product(range(d.tp), range(d.pp)):
        heads = range(num_heads) if kind == "mla" else heads_of(dt, d.tp, num_heads)
        layers = layers_of(dq, d.pp, LAYERS)
        dst = pool(kind, len(heads), len(layers), 3 * n_pages, layout)
        dst_ids = torch.randperm(3 * n_pages)[:n_pages]
        expected.append((dst, write_tokens(dst, full, dst_ids, heads, layers)))
        recv = KVReceiver(dst, rank=ParallelRank(tp=dt, pp=dq), sizes=d, **model,
                          direct=mode != "packed", engine=engine, arena=recv_arena, timeout=10)
        recv.expect(1, dst_ids, source="prefill", num_tokens=TOKENS)
        receivers.append(recv)
    # prefill pools: rank (tp, pp) holds its heads and layers, the same on each of its CP ranks
    senders = []
    for t, s in itertools.product(range(p.tp), range(p.pp)):
        heads = range(num_heads) if kind == "mla" else heads_of(t, p.tp, num_heads)
        layers = layers_of(s, p.pp, LAYERS)
        cache = pool(kind, len(heads), len(layers), 2 * n_pages, layout)
        want = write_tokens(cache, full, src_ids, heads, layers)
        for name, ls in cache.buffers.items():
            for i, buf in enumerate(ls):
                as_bytes(buf).copy_(want[name][i])
        senders += [KVSender(cache, rank=ParallelRank(cp=c, tp=t, pp=s), sizes=p, **model,
                             mode=mode, engine=engine, arena=send_arena, timeout=10)
                    for c in range(p.cp)]
    to = [r.address for r in receivers]
    for s in senders:
        s.send(1, src_ids, to=to, num_tokens=TOKENS)
    statuses = wait_all([(r, 1) for r in receivers] + [(s, 1) for s in senders])
    reasons = [r.reason(1) for r in receivers] + [s.reason(1) for s in senders]
    assert statuses == [KVStatus.Success] * len(statuses), reasons
    for dst, want in expected:
        assert_cache_equals(dst, want)
    pairs = sum(len(r._requests[1].writers) for r in receivers)
    for s in senders:
        s.close()
    for r in receivers:
        r.close()
    assert recv_arena.live_slots == [] and send_arena.live_slots == []
    return pairs


LAYOUTS = {
    "tp2-to-tp1": ("mha", 4, ParallelSizes(tp=2, cp=CP), ParallelSizes(tp=1)),
    "tp1-to-tp2": ("mha", 4, ParallelSizes(tp=1, cp=CP), ParallelSizes(tp=2)),
    "tp4-2heads-to-tp1": ("mha", 2, ParallelSizes(tp=4, cp=CP), ParallelSizes(tp=1)),
    "tp1-2heads-to-tp4": ("mha", 2, ParallelSizes(tp=1, cp=CP), ParallelSizes(tp=4)),
    "mla-tp2-to-tp1": ("mla", 1, ParallelSizes(tp=2, cp=CP), ParallelSizes(tp=1)),
    "pp2-to-pp1": ("mha", 4, ParallelSizes(pp=2, cp=CP), ParallelSizes(pp=1)),
}


@pytest.mark.parametrize("mode", ["packed", "direct"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_bit_exact(name, mode, rig):
    kind, heads, p, d = LAYOUTS[name]
    run_layout(kind, heads, p, d, mode, rig)


# Prefill with fewer (or differently cut) PP stages than decode: some routes' source layers
# start above 0 (3 layers: pp1 -> pp2 has the route [2, 3) -> [0, 1); pp2 -> pp3 has [1, 2) ->
# [0, 1)), so a sender that forgets the route's source-layer offset ships the wrong layers.
UNEVEN_PP = {"pp1-to-pp2": (ParallelSizes(pp=1, cp=CP), ParallelSizes(pp=2)),
             "pp2-to-pp3": (ParallelSizes(pp=2, cp=CP), ParallelSizes(pp=3))}


@pytest.mark.parametrize("mode", ["packed", "direct"])
@pytest.mark.parametrize("name", list(UNEVEN_PP))
def test_routes_with_source_layers_above_zero_bit_exact(name, mode, rig):
    p, d = UNEVEN_PP[name]
    routes = [r for rs in map_ranks(p, d, num_kv_heads=4, num_layers=3).values() for r in rs]
    assert any(r.src_layers.start > 0 for r in routes)  # the case this test is for
    run_layout("mha", 4, p, d, mode, rig)


def test_tp4_with_2_heads_sends_each_replicated_head_once(rig):
    # 2 routes (prefill tp 0 and 2) x 2 CP ranks: tp 1 and 3 hold replicas and send nothing
    assert run_layout("mha", 2, ParallelSizes(tp=4, cp=CP), ParallelSizes(tp=1), "packed",
                      rig) == 4


def test_direct_and_packed_fill_identical_pools_hnd(rig):
    for mode in ("direct", "packed"):
        run_layout("mha", 4, ParallelSizes(tp=2, cp=CP), ParallelSizes(tp=1), mode, rig,
                   layout="HND")


def test_direct_into_a_pool_with_strided_pages_bit_exact(rig):
    """Direct runs of several pages may move as one block only where both pools' pages are
    back to back: the receiver's pool here views every other page of a larger buffer
    (d-dense). Whole pages: direct sends the last page whole, as the baseline does."""
    engine, send_arena, recv_arena = rig
    src = make_cache(mha(), num_layers=2, num_pages=8, page_size=4, seed=1)
    dst = make_cache(mha(), num_layers=2, num_pages=8, page_size=4, seed=2, strided="pages")
    s_ids, d_ids = torch.tensor([0, 1, 2, 6]), torch.tensor([3, 4, 5, 0])  # a 3-page run
    want = oracle_unpack(src, s_ids, dst, d_ids, 16, range(2), range(2), range(2), range(2))
    sender = KVSender(src, mode="direct", engine=engine, arena=send_arena, timeout=10)
    recv = KVReceiver(dst, direct=True, engine=engine, arena=recv_arena, timeout=10)
    recv.expect(1, d_ids, source="prefill", num_tokens=16)
    sender.send(1, s_ids, to=recv.address, num_tokens=16)
    assert wait_all([(recv, 1), (sender, 1)], timeout=20) == [KVStatus.Success] * 2, \
        (recv.reason(1), sender.reason(1))
    assert_cache_equals(dst, want)
    sender.close()
    recv.close()


def test_contiguous_runs_worked_examples():
    assert contiguous_runs([4, 5, 6, 9, 10], [0, 1, 7, 8, 9]) == [(4, 0, 2), (6, 7, 1),
                                                                   (9, 8, 2)]
    assert contiguous_runs([], []) == []
    assert contiguous_runs([3], [8]) == [(3, 8, 1)]
    assert contiguous_runs([0, 1, 2, 3], [5, 6, 7, 8]) == [(0, 5, 4)]
    assert contiguous_runs(torch.tensor([2, 1, 0]), torch.tensor([0, 1, 2])) == [
        (2, 0, 1), (1, 1, 1), (0, 2, 1)]
    with pytest.raises(ValueError, match="expected equally many ids, got 2 and 1"):
        contiguous_runs([1, 2], [3])


def test_direct_batch_larger_than_the_transport_limit(rig):
    """3,000 fragmented one-token pages: 3,000 runs, split into batches the transport accepts
    and never more than one batch in flight (4,096 in flight failed on TCP); it succeeds."""
    engine, send_arena, recv_arena = rig
    specs = [ComponentSpec("latent", 1, 64, torch.bfloat16)]
    src = PagedKVCache.empty(specs, num_layers=1, num_pages=3200, page_size=1)
    as_bytes(src.layer("latent", 0)).copy_(torch.randint(0, 256, (3200, 1, 1, 128),
                                                         dtype=torch.uint8))
    dst = fill_sentinel(PagedKVCache.empty(specs, num_layers=1, num_pages=3200, page_size=1))
    s_ids, d_ids = torch.randperm(3200)[:3000], torch.randperm(3200)[:3000]
    assert len(contiguous_runs(s_ids, d_ids)) > 2048
    want = snapshot(dst)
    want["latent"][0][d_ids] = as_bytes(src.layer("latent", 0))[s_ids]
    sender = KVSender(src, kind="mla", mode="direct", engine=engine, arena=send_arena)
    recv = KVReceiver(dst, kind="mla", direct=True, engine=engine, arena=recv_arena)
    recv.expect(1, d_ids, source="prefill")
    sender.send(1, s_ids, to=recv.address)
    assert wait_all([(recv, 1), (sender, 1)]) == [KVStatus.Success] * 2, sender.reason(1)
    assert_cache_equals(dst, want)
    sender.close()
    recv.close()


def test_forced_direct_needs_a_receiver_that_allows_it(rig):
    engine, send_arena, recv_arena = rig
    src, dst = pool("mha", 2, 1, 8), pool("mha", 2, 1, 8)
    sender = KVSender(src, mode="direct", engine=engine, arena=send_arena)
    recv = KVReceiver(dst, engine=engine, arena=recv_arena)
    recv.expect(1, torch.tensor([0, 1]), source="prefill")
    sender.send(1, torch.tensor([2, 3]), to=recv.address)
    assert wait_all([(sender, 1)]) == [KVStatus.Failed]
    assert "does not accept direct writes" in sender.reason(1)
    sender.close()
    recv.close()


def test_cost_model_choice_and_file(tmp_path):
    m = CostModel()
    # fragmented page_size 1: 65,536 descriptors of 2 KiB -> packed; 4 runs of 16 MiB -> direct
    assert m.choose(65536, 128 << 20) == "packed"
    assert m.choose(4, 64 << 20) == "direct"
    path = m.__class__(per_descriptor_s=1e-3).save(tmp_path / "cost.json", device="test")
    assert CostModel.load(path).per_descriptor_s == 1e-3
    (tmp_path / "bad.json").write_text('{"warp_speed": 9}')
    with pytest.raises(ValueError, match="unknown cost constants"):
        CostModel.load(tmp_path / "bad.json")


def test_cost_model_terms_and_tie():
    """Every term of the module's two formulas counts, and a tie goes to packed."""
    m = CostModel(per_descriptor_s=2.0, wire_Bps=10.0, pack_Bps=5.0, unpack_Bps=20.0,
                  packed_fixed_s=1.0)
    assert m.direct_s(3, 100) == 3 * 2.0 + 100 / 10.0
    assert m.packed_s(100) == 1.0 + 100 / 5.0 + 100 / 10.0 + 100 / 20.0  # 36 s
    assert m.choose(12, 100) == "direct"  # 34 s < 36 s
    assert m.choose(13, 100) == "packed"  # 36 s: a tie
    assert m.choose(14, 100) == "packed"
