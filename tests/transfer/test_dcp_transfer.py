"""Prefill CP into decode DCP (issue 21): every prefill CP rank ships, to every decode DCP rank,
the tokens of its page share that rank holds, compactly, into the rank's local pages; packed
and direct (the per-token baseline), MHA and MLA, TP on both sides, a decode-side prefix, and
DCP-sharded sources (DCP N -> M, N -> 1). Every decode pool is compared, bit for bit, with an
independent index walk of the issue's formulas. One process: real Mooncake engines on TCP
loopback, real sockets."""

import itertools

import pytest
import torch
from kvtest import as_bytes, assert_cache_equals, fill_sentinel, snapshot
from txtest import wait_all

from cpkv import ComponentSpec, PagedKVCache
from cpkv.parallel import DcpLayout, ParallelRank, ParallelSizes, heads_of
from cpkv.transfer import KVReceiver, KVSender, KVStatus

LAYERS, DIM, HEADS = 2, 8, 4


def global_kv(kind, n, seed):
    """[layers, tokens, heads, dim] bytes of one request, per component."""
    g = torch.Generator().manual_seed(seed)
    names, heads = (["latent"], 1) if kind == "mla" else (["k", "v"], HEADS)
    return {c: torch.randint(0, 256, (LAYERS, n, heads, DIM * 2), generator=g,
                             dtype=torch.uint8) for c in names}


def pool(kind, heads, num_pages, page_size):
    names = ["latent"] if kind == "mla" else ["k", "v"]
    specs = [ComponentSpec(c, heads, DIM, torch.bfloat16) for c in names]
    return fill_sentinel(PagedKVCache.empty(specs, num_layers=LAYERS, num_pages=num_pages,
                                            page_size=page_size))


def rank_of(t, d, i):  # the formulas, walked token by token
    return (t // i) % d


def local_of(t, d, i):
    return (t // (i * d)) * i + t % i


def place(cache, full, heads, ids, position_of, tokens, want=None):
    """want[c][layer][ids[p // B], p % B] = full[c][layer, t, heads] for (t, p) in tokens."""
    want = snapshot(cache) if want is None else want
    ps = cache.page_size
    for c, layers in want.items():
        for layer in range(LAYERS):
            for t in tokens:
                p = position_of(t)
                layers[layer][int(ids[p // ps]), p % ps] = full[c][layer, t, heads.start:
                                                                   heads.stop]
    return want


def fill(cache, want):
    for c, layers in cache.buffers.items():
        for layer, buf in enumerate(layers):
            as_bytes(buf).copy_(want[c][layer])


def run(kind, n, cp, ptp, d, interleave, ps, *, dtp=None, prefix=0, mode="packed",
        src_dcp=None, rig):
    """A prefill instance (CP cp, TP ptp; or a DCP-sharded decode instance ``src_dcp`` =
    (size, interleave, page size)) ships an n-token request to a decode instance of TP dtp
    (default d) with DCP d and interleave ``interleave``, pages of ``ps``."""
    heads = 1 if kind == "mla" else HEADS
    full = global_kv(kind, n, seed=n * 7 + d)
    dtp = dtp or d
    model = dict(kind=kind, num_kv_heads=heads)
    receivers, expected = [], []
    for t in range(dtp):
        r = t % d
        mine = range(heads) if kind == "mla" else heads_of(t // d, dtp // d, heads)
        local = -(-n // (ps * d))  # pages every rank of the group holds
        cache = pool(kind, len(mine), local + 3, ps)
        ids = torch.randperm(local + 3)[:local]
        want = snapshot(cache)
        if prefix:  # the prefix is there already: marked, and must stay
            for c in want:
                for layer in range(LAYERS):
                    want[c][layer][:] = 0x5A
            fill(cache, want)
        owned = [t for t in range(prefix, n) if rank_of(t, d, interleave) == r]
        want = place(cache, full, mine, ids, lambda t: local_of(t, d, interleave), owned,
                     want)
        recv = KVReceiver(cache, instance=f"decode-{t}", rank=ParallelRank(tp=t),
                          sizes=ParallelSizes(tp=dtp), dcp=DcpLayout(d, r, interleave),
                          direct=mode == "direct", engine=rig[0], arena=rig[2], timeout=20,
                          **model)
        recv.expect(1, ids, source="src", num_tokens=n, prefix=prefix)
        receivers.append(recv)
        expected.append((cache, want))
    senders = []
    if src_dcp is None:  # a prefill pool per TP rank holding the whole request
        src_pages = -(-n // ps)
        s_ids = torch.randperm(src_pages + 2)[:src_pages]
        for t, c in itertools.product(range(ptp), range(cp)):
            mine = range(heads) if kind == "mla" else heads_of(t, ptp, heads)
            cache = pool(kind, len(mine), src_pages + 2, ps)
            fill(cache, place(cache, full, mine, s_ids, lambda x: x, range(n)))
            senders.append((KVSender(cache, instance="src", rank=ParallelRank(cp=c, tp=t),
                                     sizes=ParallelSizes(cp=cp, tp=ptp), mode=mode,
                                     engine=rig[0], arena=rig[1], timeout=20, **model), s_ids))
    else:  # a DCP-sharded source: a TP = DCP group, each rank its own tokens
        sd, si, sps = src_dcp
        for t in range(sd):
            local = -(-n // (sps * sd))
            cache = pool(kind, heads, local + 2, sps)
            s_ids = torch.randperm(local + 2)[:local]
            owned = [x for x in range(n) if rank_of(x, sd, si) == t]
            fill(cache, place(cache, full, range(heads), s_ids,
                              lambda x: local_of(x, sd, si), owned))
            senders.append((KVSender(cache, instance="src", rank=ParallelRank(tp=t),
                                     sizes=ParallelSizes(tp=sd), dcp=DcpLayout(sd, t, si),
                                     mode=mode, engine=rig[0], arena=rig[1], timeout=20,
                                     **model), s_ids))
    to = [r.address for r in receivers]
    for s, s_ids in senders:
        s.send(1, s_ids, to=to, num_tokens=n)
    pairs = [(r, 1) for r in receivers] + [(s, 1) for s, _ in senders]
    statuses = wait_all(pairs, timeout=60)
    reasons = [o.reason(1) for o, _ in pairs]
    try:
        assert statuses == [KVStatus.Success] * len(pairs), reasons
        for cache, want in expected:
            assert_cache_equals(cache, want)
    finally:
        for s, _ in senders:
            s.close()
        for r in receivers:
            r.close()
    assert rig[1].live_slots == [] and rig[2].live_slots == []


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("interleave", ["1", "2", "B"])
@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("cp", [1, 2, 3])
def test_prefill_cp_into_decode_dcp_bit_exact(cp, d, interleave, ps, kind, rig):
    """Prefill CP x TP 2 into a TP = DCP d group: n chosen so the last page is partial and
    the last turn of the group is short."""
    i = ps if interleave == "B" else int(interleave)
    if ps % i:
        pytest.skip(f"interleave {i} does not divide page size {ps} (vLLM refuses it too)")
    n = 5 * i * d + 3 if ps == 1 else 2 * ps * d + 5
    run(kind, n, cp, 2, d, i, ps, rig=rig)


@pytest.mark.parametrize("case", ["two-groups", "prefix", "direct", "direct-prefix",
                                  "direct-whole-pages"])
def test_more_layouts(case, rig):
    """Two DCP groups (decode TP 4 = 2 groups of DCP 2, each its half of the heads); a prefix
    already in the decode pages (mid-page); direct mode, one descriptor per token (I = 1), or
    per page (I = B: a run of tokens inside a page on both sides is one descriptor)."""
    kw = {"two-groups": dict(dtp=4), "prefix": dict(prefix=13),
          "direct": dict(mode="direct"), "direct-prefix": dict(mode="direct", prefix=6),
          "direct-whole-pages": dict(mode="direct", interleave=4)}[case]
    run("mha", 45, 2, 2, 2, kw.pop("interleave", 1), 4, rig=rig, **kw)


@pytest.mark.parametrize("src,dst", [((2, 1), (4, 1)), ((4, 1), (2, 1)), ((2, 1), (1, 1)),
                                     ((4, 2), (1, 1)), ((2, 2), (4, 1)), ((4, 1), (4, 2))],
                         ids=lambda x: f"dcp{x[0]}i{x[1]}")
def test_dcp_n_to_m_resharding(src, dst, rig):
    """A DCP-sharded decode instance re-sharded into another DCP group (or into one rank)."""
    (sd, si), (dd, di) = src, dst
    run("mha", 37, 1, 1, dd, di, 4, src_dcp=(sd, si, 4), rig=rig)
