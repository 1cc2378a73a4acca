"""Decode context parallelism: `DcpLayout` and `dcp_select` (cpkv.parallel) against an index walk,
with real bytes moved from prefill pools (every CP rank's page share) and from DCP-sharded pools
into each DCP rank's compact pool, and attention merged across DCP ranks by log-sum-exp.

The oracle never uses the closed forms under test: it walks a request's tokens in order, gives
token t to rank ``(t // I) % D`` (the rank rule of vLLM's slot mapping and SGLang's DCP layout)
and appends it to that rank's sequence, so a rank's j-th token is entry ``j % B`` of page
``page_ids[j // B]``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from kvtest import (
    SENTINEL,
    as_bytes,
    assert_cache_equals,
    copy_back,
    fill_random,
    fill_sentinel,
    kernel_device,
    on,
    pool_on,
    snapshot,
)
from syncs import HOST_SYNCS

from cpkv import PagedKVCache
from cpkv.cp import page_share
from cpkv.kernels import pack_pages, unpack_pages
from cpkv.parallel import DcpLayout, dcp_select, tokens_of_pages

PREFIX_MARK = 0x5A  # bytes of the tokens the decode side already holds (must survive the move)


def walk(n: int, size: int, interleave: int, page_size: int) -> list[tuple[int, int, int]]:
    """Oracle: (rank, page index, entry) of tokens 0..n-1, appending each to its rank in turn."""
    filled, out = [0] * size, []
    for t in range(n):
        r = (t // interleave) % size
        j = filled[r]
        filled[r] += 1
        out.append((r, j // page_size, j % page_size))
    return out


# -- the arithmetic --------------------------------------------------------------------------------


def test_worked_example_10_tokens_d2_i2_b2():
    # token:  0  1  2  3  4  5  6  7  8  9
    # rank:   0  0  1  1  0  0  1  1  0  0
    # page:   0  0  0  0  1  1  1  1  2  2   (an index into the request's page ids, per rank)
    # entry:  0  1  0  1  0  1  0  1  0  1
    lay = DcpLayout(size=2, interleave=2, page_size=2)
    assert [lay.place_of(t) for t in range(10)] == walk(10, 2, 2, 2)
    assert [r.count(10) for r in lay.ranks()] == [6, 4]


DOC = Path(__file__).resolve().parents[2] / "docs" / "dcp.md"


def test_docs_worked_example_table_and_first_block():
    text = DOC.read_text()
    rows = {}
    for line in text.split("### Worked example")[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0].split(" ")[0] in ("rank", "local", "page", "entry"):
            rows[cells[0].split(" ")[0]] = [int(c) for c in cells[1:]]
    want = walk(10, 2, 2, 2)
    assert rows["rank"] == [w[0] for w in want] and rows["entry"] == [w[2] for w in want]
    assert rows["page"] == [w[1] for w in want]
    assert rows["local"] == [w[1] * 2 + w[2] for w in want]
    block = text.split("```python\n")[1].split("```")[0]
    exec(compile(block, "docs/dcp.md layout block", "exec"), {})


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("interleave", [1, 2, 3, 4])
def test_layout_matches_the_walk(size, interleave):
    for page_size in (interleave, 2 * interleave, 4 * interleave):
        for n in range(0, 3 * page_size * size + 2):
            want = walk(n, size, interleave, page_size)
            for lay in DcpLayout(size, 0, interleave, page_size).ranks():
                mine = [t for t in range(n) if want[t][0] == lay.rank]
                assert lay.count(n) == len(mine), (n, lay)
                assert [lay.global_of(j) for j in range(len(mine))] == mine
                for t in range(n):
                    assert lay.place_of(t) == want[t]
                    assert lay.owns(t) == (want[t][0] == lay.rank)
                # the closed form for the count
                base = (n // (interleave * size)) * interleave
                clip = min(max(n - base * size - lay.rank * interleave, 0), interleave)
                assert lay.count(n) == base + clip
                # every rank fits in the shared page list, and rank 0 needs all of it
                assert -(-lay.count(n) // page_size) <= lay.num_pages(n)
            assert -(-DcpLayout(size, 0, interleave).count(n) // page_size) == \
                -(-n // (page_size * size))


def vllm_slot(t, size, rank, interleave, page_size):
    """vLLM's slot mapping (vllm/v1/worker/block_table.py): offsets inside a virtual block of
    page_size * size tokens; None where the token is not this rank's."""
    vbs = page_size * size
    block, off = divmod(t, vbs)
    if (off // interleave) % size != rank:
        return None
    return block, (off // (size * interleave)) * interleave + off % interleave


def test_vllm_virtual_blocks_agree_where_interleave_divides_the_page():
    for size, interleave, page_size in itertools.product((1, 2, 3, 4), (1, 2, 4), (1, 2, 4, 8)):
        lay = DcpLayout(size, 0, interleave)
        for r, t in itertools.product(range(size), range(4 * page_size * size)):
            got = vllm_slot(t, size, r, interleave, page_size)
            ours = divmod(lay.local_of(t), page_size) if lay.rank_of(t) == r else None
            if page_size % interleave == 0:
                assert got == ours, (size, interleave, page_size, r, t)
    # I = 3 does not divide B = 2: vLLM's rule and the global one part ways (why we refuse it)
    lay = DcpLayout(2, 0, 3)
    assert any(vllm_slot(t, 2, lay.rank_of(t), 3, 2) != divmod(lay.local_of(t), 2)
               for t in range(12))


def test_pcp_variant_is_one_layout_over_pcp_times_dcp_ranks():
    # vLLM <= 0.21: rank pcp_rank * dcp + dcp_rank of pcp * dcp
    for pcp, dcp in itertools.product((1, 2, 3), (1, 2, 4)):
        ranks = [DcpLayout.from_pcp(pcp_size=pcp, pcp_rank=p, dcp_size=dcp, dcp_rank=d,
                                    interleave=2, page_size=4)
                 for p in range(pcp) for d in range(dcp)]
        assert [x.rank for x in ranks] == list(range(pcp * dcp))
        assert {x.size for x in ranks} == {pcp * dcp}
        want = walk(50, pcp * dcp, 2, 4)
        assert all(ranks[want[t][0]].owns(t) for t in range(50))


def brute(dst: DcpLayout, start, stop, src: DcpLayout | None, prefix):
    """Expected selection: walk the range, keep what both hold, positions from the walk."""
    n = max(stop, 1)
    d_walk = walk(n, dst.size, dst.interleave, 1)  # page size 1: the page index is the index
    s_walk = walk(n, src.size, src.interleave, 1) if src else None
    toks = [t for t in range(max(start, prefix), stop)
            if d_walk[t][0] == dst.rank and (src is None or s_walk[t][0] == src.rank)]
    src_pos = toks if src is None else [s_walk[t][1] for t in toks]
    return toks, src_pos, [d_walk[t][1] for t in toks]


def check_selection(dst, start, stop, src, prefix):
    sel = dcp_select(dst, start, stop, src=src, prefix=prefix)
    toks, src_pos, dst_pos = brute(dst, start, stop, src, prefix)
    what = (dst, start, stop, src, prefix)
    assert sel.count == len(toks), what
    assert sel.tokens() == toks, what
    assert sel.src_positions() == src_pos and sel.dst_positions() == dst_pos, what
    s_t, d_t = sel.tensors()
    assert s_t.dtype == d_t.dtype == torch.int64
    assert s_t.tolist() == src_pos and d_t.tolist() == dst_pos, what
    contiguous = dst_pos == list(range(dst_pos[0], dst_pos[0] + len(dst_pos))) if dst_pos else True
    assert sel.dst_contiguous == contiguous, what
    if dst_pos:
        assert sel.dst_start == dst_pos[0], what
    return sel


def test_selection_from_a_contiguous_source_is_consecutive_on_the_destination():
    # every destination token of the range is in the source, and local indices number a rank's
    # tokens consecutively: the selection lands on consecutive indices from dst.count(start)
    for size, interleave in itertools.product((1, 2, 3, 4), (1, 2, 5)):
        for dst in DcpLayout(size, 0, interleave).ranks():
            for start, stop, prefix in itertools.product((0, 1, 7, 13), (13, 14, 40),
                                                         (0, 3, 20, 41)):
                sel = check_selection(dst, start, stop, None, prefix)
                assert sel.dst_contiguous
                assert sel.dst_start == dst.count(min(max(start, prefix), stop))


@pytest.mark.parametrize("src_size,src_il,dst_size,dst_il", [
    (2, 1, 4, 1), (4, 1, 2, 1), (2, 1, 1, 1), (4, 2, 1, 1), (1, 1, 4, 2), (3, 1, 2, 1),
    (2, 4, 4, 1), (2, 4, 4, 2), (2, 2, 4, 4), (2, 4, 2, 1), (4, 4, 2, 16), (3, 2, 4, 3),
])
def test_selection_from_a_dcp_source(src_size, src_il, dst_size, dst_il):
    for s, r in itertools.product(range(src_size), range(dst_size)):
        src, dst = DcpLayout(src_size, s, src_il), DcpLayout(dst_size, r, dst_il)
        for start, stop, prefix in ((0, 97, 0), (0, 97, 10), (5, 70, 0), (30, 31, 0),
                                    (0, 0, 0), (8, 9, 9)):
            check_selection(dst, start, stop, src, prefix)
        # over a long range, with interleaves dividing one another, the indices are consecutive
        # exactly when each destination rank's tokens all live on one source rank: one source
        # rank, or I_dst | I_src and (I_src/I_dst)*D_src | D_dst
        sel = dcp_select(dst, 0, 4 * math.lcm(src.cycle, dst.cycle), src=src)
        one_source = src_size == 1 or (
            src_il % dst_il == 0 and dst_size % (src_il // dst_il * src_size) == 0)
        if sel.count and max(src_il, dst_il) % min(src_il, dst_il) == 0:
            assert sel.dst_contiguous == one_source, (src, dst)


def test_shares_and_sources_cover_each_token_once():
    n = 61
    for cp, dst_size, interleave in itertools.product((1, 2, 3), (1, 2, 4), (1, 2, 4)):
        seen = []
        for p in range(cp):
            share = tokens_of_pages(page_share(-(-n // 4), cp, p), 4, n)
            for dst in DcpLayout(dst_size, 0, interleave).ranks():
                seen += dcp_select(dst, share.start, share.stop, prefix=9).tokens()
        assert sorted(seen) == list(range(9, n))


def test_tensors_subtract_bases_and_stay_on_the_device():
    sel = dcp_select(DcpLayout(2, 1, 2), 16, 32)
    s, d = sel.tensors(torch.device("cpu"), src_base=16, dst_base=8)
    assert s.tolist() == [t - 16 for t in sel.tokens()]
    assert d.tolist() == [j - 8 for j in sel.dst_positions()]
    empty = dcp_select(DcpLayout(4, 3), 0, 2, src=DcpLayout(2, 0))
    assert empty.count == 0 and [x.numel() for x in empty.tensors()] == [0, 0]


def test_tensors_read_nothing_back(monkeypatch):
    """The device form never reads a tensor value on the host (what would synchronise a GPU):
    every host sync (`syncs.HOST_SYNCS`) raises while the selections build their index
    tensors."""
    sels = [dcp_select(DcpLayout(4, 1, 2), 5, 90, prefix=7),
            dcp_select(DcpLayout(2, 1), 0, 90, src=DcpLayout(4, 3)),
            dcp_select(DcpLayout(1), 0, 90, src=DcpLayout(2, 0, 16))]
    wants = [sel.src_positions() + sel.dst_positions() for sel in sels]

    def refuse(self, *a, **k):
        raise AssertionError("a host read-back")

    with monkeypatch.context() as m:
        for owner, name in HOST_SYNCS:
            m.setattr(owner, name, refuse)
        got = [sel.tensors() for sel in sels]
    assert [s.tolist() + d.tolist() for s, d in got] == wants


@pytest.mark.gpu
def test_tensors_do_not_synchronise_the_gpu():
    sel = dcp_select(DcpLayout(2, 1), 0, 4096, src=DcpLayout(4, 3), prefix=100)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s, d = sel.tensors("cuda", src_base=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.is_cuda and s.tolist() == sel.src_positions() and d.tolist() == sel.dst_positions()


@pytest.mark.parametrize("kw,err,message", [
    (dict(size=0), ValueError, "dcp size: expected a positive int, got 0"),
    (dict(size=2, rank=2), ValueError, "dcp rank: expected an int in [0, 2), got 2"),
    (dict(size=2, rank=-1), ValueError, "dcp rank: expected an int in [0, 2), got -1"),
    (dict(interleave=0), ValueError, "interleave: expected a positive int, got 0"),
    (dict(interleave=True), ValueError, "interleave: expected a positive int, got True"),
    (dict(interleave=2, page_size=1), ValueError,
     "interleave: expected a divisor of page_size 1, got 2"),
    (dict(interleave=4, page_size=6), ValueError,
     "interleave: expected a divisor of page_size 6, got 4"),
    (dict(page_size=0), ValueError, "page_size: expected a positive int, got 0"),
])
def test_bad_layouts(kw, err, message):
    with pytest.raises(err) as e:
        DcpLayout(**kw)
    assert message in str(e.value)


def test_bad_selections():
    lay = DcpLayout(2)
    with pytest.raises(TypeError, match="dst: expected a DcpLayout, got int"):
        dcp_select(2, 0, 4)
    with pytest.raises(TypeError, match="src: expected a DcpLayout or None, got tuple"):
        dcp_select(lay, 0, 4, src=(2, 0))
    with pytest.raises(ValueError, match=r"token range: expected start <= stop, got \[5, 4\)"):
        dcp_select(lay, 5, 4)
    with pytest.raises(ValueError, match="prefix: expected a non-negative int, got -1"):
        dcp_select(lay, 0, 4, prefix=-1)
    with pytest.raises(ValueError, match="page_size: expected an int for page arithmetic"):
        lay.place_of(3)
    with pytest.raises(ValueError, match=r"pcp rank: expected an int in \[0, 2\), got 2"):
        DcpLayout.from_pcp(pcp_size=2, pcp_rank=2, dcp_size=2, dcp_rank=0)


# -- real bytes: prefill CP page shares -> DCP ranks' compact pools ----------------------------
#
# A "mover" carries one (source, DCP rank) selection: "index" gathers and scatters with torch
# indexing; "torch" and "triton" pack the selected tokens with `pack_pages(tokens=)` and unpack
# them with `unpack_pages(token_offset=dst_start)` (or `tokens=` where the destination indices
# are not consecutive), on the kernel device (Triton: the interpreter without CUDA).


def make_pool(kind: str, num_pages: int, page_size: int) -> PagedKVCache:
    if kind == "mha":
        return PagedKVCache.empty_mha(num_layers=2, num_pages=num_pages, page_size=page_size,
                                      num_heads=2, head_dim=96, dtype=torch.bfloat16)
    return PagedKVCache.empty_mla(num_layers=1, num_pages=num_pages, page_size=page_size)


def rows_at(cache: PagedKVCache, ids: torch.Tensor, pos: torch.Tensor) -> dict:
    """Bytes of tokens at positions ``pos`` of page list ``ids``: (component, layer) -> rows."""
    ps, ids = cache.page_size, ids.long()
    return {(c, layer): as_bytes(cache.nhd_view(c, layer))[ids[pos // ps], pos % ps].clone()
            for c in cache.component_names for layer in range(cache.num_layers)}


def put_rows(cache: PagedKVCache, ids: torch.Tensor, pos: torch.Tensor, rows: dict) -> None:
    ps, ids = cache.page_size, ids.long()
    for (c, layer), r in rows.items():
        as_bytes(cache.nhd_view(c, layer))[ids[pos // ps], pos % ps] = r


def move(mover: str, src, src_ids, dst, dst_ids, sel, src_base: int = 0) -> None:
    """Move selection ``sel`` from pool ``src`` (page list ``src_ids``, positions less
    ``src_base``) into DCP rank pool ``dst``."""
    if mover == "index":
        s_pos, d_pos = sel.tensors(src_base=src_base)
        put_rows(dst, dst_ids, d_pos, rows_at(src, src_ids, s_pos))
        return
    dev = kernel_device(mover)
    s_pos, d_pos = sel.tensors(dev, src_base=src_base)
    s_pool, d_pool = pool_on(src, dev), pool_on(dst, dev)
    slot = pack_pages(s_pool, on(src_ids, dev), tokens=s_pos, backend=mover)
    assert slot.numel() == src.packed_nbytes(sel.count)  # the selected tokens, compactly
    if sel.dst_contiguous:
        unpack_pages(slot, d_pool, on(dst_ids, dev), token_offset=sel.dst_start,
                     num_tokens=sel.count, backend=mover)
    else:
        unpack_pages(slot, d_pool, on(dst_ids, dev), tokens=d_pos, backend=mover)
    copy_back(d_pool, dst)


def expected_pools(dst_pools, dst_ids, truth: dict, n: int, size: int, interleave: int,
                   prefix: int) -> list[dict]:
    """Each DCP rank's pool after the move, from the walk: the truth's token t at its rank's
    (page, entry); prefix tokens hold PREFIX_MARK; every other byte keeps its sentinel."""
    page_size = dst_pools[0].page_size
    placed = walk(n, size, interleave, page_size)
    wants = [snapshot(p) for p in dst_pools]
    for r, want in enumerate(wants):
        toks = [t for t in range(n) if placed[t][0] == r]
        if not toks:
            continue
        pages = dst_ids.long()[[placed[t][1] for t in toks]]
        entries = torch.tensor([placed[t][2] for t in toks])
        fresh = torch.tensor([t >= prefix for t in toks])
        for (c, layer), rows in truth.items():
            got = rows[toks].clone()
            got[~fresh] = PREFIX_MARK
            view = want[c][layer]
            if dst_pools[0].layout == "HND":
                view = view.transpose(1, 2)
            view[pages, entries] = got
    return wants


def dcp_pools(kind, n, size, interleave, page_size, prefix, seed):
    """The DCP ranks' pools (sentinel, the cached prefix marked), their shared page ids, layouts."""
    lay = DcpLayout(size, 0, interleave, page_size)
    n_pages = lay.num_pages(n)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_pages + 2, generator=g)[:n_pages].to(torch.int32)  # 2 guard pages
    pools = [fill_sentinel(make_pool(kind, n_pages + 2, page_size)) for _ in range(size)]
    for r, pool in zip(lay.ranks(), pools, strict=True):
        cached = torch.arange(r.count(prefix))
        marks = {k: torch.full_like(v[:len(cached)], PREFIX_MARK)
                 for k, v in rows_at(pool, ids, cached).items()}
        put_rows(pool, ids, cached, marks)
    return pools, ids, lay.ranks()


def cases(movers=("index", "torch")):
    for page_size, cp, size in itertools.product((1, 16), (1, 2, 3), (1, 2, 4)):
        for interleave in sorted({1, 2, page_size}):
            if page_size % interleave == 0:
                for mover in movers:
                    yield pytest.param(cp, size, interleave, page_size, mover,
                                       id=f"cp{cp}-dcp{size}-I{interleave}-B{page_size}-{mover}")


def prefill_into_dcp(cp, size, interleave, page_size, kind, mover, prefixes):
    n = 7 * page_size + 1 if page_size > 1 else 23  # the last page holds one token
    n_pages = -(-n // page_size)
    g = torch.Generator().manual_seed(cp * 100 + size * 10 + interleave)
    src = fill_random(make_pool(kind, n_pages + 3, page_size), seed=cp)
    src_ids = torch.randperm(n_pages + 3, generator=g)[:n_pages].to(torch.int64)
    truth = rows_at(src, src_ids, torch.arange(n))  # token t of the request, in order
    for prefix in prefixes:
        pools, dst_ids, ranks = dcp_pools(kind, n, size, interleave, page_size, prefix, seed=cp)
        src_before = snapshot(src)
        for p in range(cp):
            share = page_share(n_pages, cp, p)
            toks = tokens_of_pages(share, page_size, n)
            share_ids = src_ids[share.start:share.stop]  # the sender packs its own pages only
            for lay, pool in zip(ranks, pools, strict=True):
                sel = dcp_select(lay, toks.start, toks.stop, prefix=prefix)
                assert sel.dst_contiguous
                move(mover, src, share_ids, pool, dst_ids, sel, src_base=toks.start)
        wants = expected_pools(pools, dst_ids, truth, n, size, interleave, prefix)
        for r, (pool, want) in enumerate(zip(pools, wants, strict=True)):
            assert_cache_equals(pool, want, f"dcp rank {r} (prefix {prefix})")
        assert_cache_equals(src, src_before, "source pool")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("cp,size,interleave,page_size,mover", list(cases()))
def test_prefill_shares_into_dcp_pools(cp, size, interleave, page_size, mover, kind):
    prefill_into_dcp(cp, size, interleave, page_size, kind, mover, (0, page_size + 3))


TRITON_CASES = [(2, 4, 1, 16), (3, 2, 16, 16), (2, 2, 2, 16), (3, 4, 1, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("cp,size,interleave,page_size", TRITON_CASES,
                         ids=[f"cp{c}-dcp{d}-I{i}-B{b}" for c, d, i, b in TRITON_CASES])
def test_prefill_shares_into_dcp_pools_triton(cp, size, interleave, page_size, kind):
    prefill_into_dcp(cp, size, interleave, page_size, kind, "triton", (page_size + 3,))


N_TO_M = [(2, 1, 4, 1, 16), (4, 1, 2, 1, 16), (2, 1, 1, 1, 16), (4, 16, 1, 1, 16),
          (1, 1, 4, 2, 16), (2, 16, 4, 1, 16), (4, 2, 2, 16, 16), (2, 1, 2, 16, 16),
          (2, 1, 4, 1, 1), (4, 1, 1, 1, 1)]


def n_to_m_cases():
    for (a, b, c, d, e), kind, mover in itertools.product(N_TO_M, ("mha", "mla"),
                                                          ("index", "torch", "triton")):
        if mover != "triton" or (kind == "mha" and e > 1):  # Triton: fewer (the interpreter)
            yield pytest.param(a, b, c, d, e, kind, mover,
                               id=f"dcp{a}-I{b}-to-dcp{c}-I{d}-B{e}-{kind}-{mover}")


@pytest.mark.slow
@pytest.mark.parametrize("src_size,src_il,dst_size,dst_il,page_size,kind,mover",
                         list(n_to_m_cases()))
def test_dcp_n_to_m(src_size, src_il, dst_size, dst_il, page_size, kind, mover):
    """A DCP group re-shards into another (N -> M, N -> 1): every (source rank, destination
    rank) pair moves the tokens both hold."""
    n = 5 * page_size * 4 + 1 if page_size > 1 else 37
    g = torch.Generator().manual_seed(src_size * 10 + dst_size)
    truth_pool = fill_random(make_pool(kind, -(-n // page_size), page_size), seed=3)
    truth = rows_at(truth_pool, torch.arange(-(-n // page_size)), torch.arange(n))
    # the source ranks' pools, filled from the walk (not from the code under test)
    src_lay = DcpLayout(src_size, 0, src_il, page_size)
    s_pages = src_lay.num_pages(n)
    src_ids = torch.randperm(s_pages + 1, generator=g)[:s_pages]
    placed = walk(n, src_size, src_il, page_size)
    srcs = []
    for r in range(src_size):
        pool = fill_sentinel(make_pool(kind, s_pages + 1, page_size))
        toks = [t for t in range(n) if placed[t][0] == r]
        put_rows(pool, src_ids, torch.arange(len(toks)),
                 {k: v[toks] for k, v in truth.items()})
        srcs.append(pool)
    prefix = 2 * page_size + 1
    pools, dst_ids, ranks = dcp_pools(kind, n, dst_size, dst_il, page_size, prefix, seed=5)
    for s_lay, s_pool in zip(src_lay.ranks(), srcs, strict=True):
        for d_lay, d_pool in zip(ranks, pools, strict=True):
            move(mover, s_pool, src_ids, d_pool, dst_ids,
                 dcp_select(d_lay, 0, n, src=s_lay, prefix=prefix))
    wants = expected_pools(pools, dst_ids, truth, n, dst_size, dst_il, prefix)
    for r, (pool, want) in enumerate(zip(pools, wants, strict=True)):
        assert_cache_equals(pool, want, f"dcp rank {r}")


def test_sentinel_guards_are_really_checked():
    # the comparison above would catch a stray write into a guard page
    pools, ids, _ = dcp_pools("mha", 20, 2, 1, 4, 0, seed=1)
    want = snapshot(pools[0])
    guard = sorted(set(range(pools[0].num_pages)) - set(ids.tolist()))[0]
    as_bytes(pools[0].nhd_view("k", 0))[guard, 0, 0, 0] = SENTINEL ^ 1
    with pytest.raises(AssertionError, match="1 bytes differ"):
        assert_cache_equals(pools[0], want)


# -- attention over DCP shards, merged by log-sum-exp --------------------------------------------


def attend(q, k, v, scale):
    """q [Hq, d], k [n, Hkv, d], v [n, Hkv, dv] -> out [Hq, dv], lse [Hq] (lse -inf when n = 0)."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("hd,nhd->hn", q, k) * scale
    lse = torch.logsumexp(s, -1)
    if k.shape[0] == 0:
        return torch.zeros(q.shape[0], v.shape[2], dtype=q.dtype), lse
    return torch.einsum("hn,nhd->hd", torch.exp(s - lse[:, None]), v), lse


def merge(outs, lses):
    """DCP decode's combine (vLLM vllm/v1/attention/ops/dcp.py ``correct_attn_out``, SGLang
    sglang/srt/layers/dcp/comm.py): weight each rank by exp(lse_r - lse); an empty rank's -inf
    weighs 0."""
    lse = torch.logsumexp(torch.stack(lses), 0)
    return sum(torch.exp(lr - lse)[:, None] * o for o, lr in zip(outs, lses, strict=True))


def rank_kv(pool, ids, lay, n, comp):
    """A DCP rank's tokens of a request, in its local order, as fp64 [count, heads, dim]."""
    return pool.nhd_view(comp, 0)[ids.long()[torch.arange(lay.count(n)) // pool.page_size],
                                  torch.arange(lay.count(n)) % pool.page_size].double()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("n,size,interleave,page_size", [
    (37, 2, 1, 4), (37, 4, 2, 4), (50, 4, 16, 16), (3, 4, 1, 1), (1, 2, 1, 1)])
def test_attention_merged_across_dcp_ranks(n, size, interleave, page_size, kind):
    """Each rank attends a decode query to its own tokens; the LSE-weighted merge equals
    attention over the whole request. Numerical, not bit-exact: the merge normalises each
    rank's softmax separately and rescales, a different order of floating-point operations
    than one softmax over all tokens (so fp64 and allclose, not torch.equal)."""
    g = torch.Generator().manual_seed(n + size)
    n_pages = -(-n // page_size)
    src = fill_random(make_pool(kind, n_pages, page_size), seed=n)
    if kind == "mha":  # random bytes are not all finite numbers: use real values
        for t in itertools.chain(src.buffers["k"], src.buffers["v"]):
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    else:
        for t in src.buffers["latent"]:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    src_ids = torch.arange(n_pages)
    pools, dst_ids, ranks = dcp_pools(kind, n, size, interleave, page_size, 0, seed=n)
    for lay, pool in zip(ranks, pools, strict=True):
        s_pos, d_pos = dcp_select(lay, 0, n).tensors()
        put_rows(pool, dst_ids, d_pos, rows_at(src, src_ids, s_pos))
    if kind == "mha":  # GQA: 4 query heads per KV head
        q = torch.randn(8, 96, generator=g, dtype=torch.float64)
        whole = [rank_kv(src, src_ids, DcpLayout(), n, c) for c in ("k", "v")]
        parts = [[rank_kv(p, dst_ids, lay, n, c) for c in ("k", "v")]
                 for lay, p in zip(ranks, pools, strict=True)]
    else:  # MLA, absorbed: scores over the 576-wide latent, values its first 512
        q = torch.randn(16, 576, generator=g, dtype=torch.float64)
        lat = rank_kv(src, src_ids, DcpLayout(), n, "latent")
        whole = [lat, lat[..., :512]]
        parts = [[x, x[..., :512]] for x in
                 (rank_kv(p, dst_ids, lay, n, "latent") for lay, p in zip(ranks, pools,
                                                                          strict=True))]
    scale = q.shape[1] ** -0.5
    want, _ = attend(q, *whole, scale)
    outs, lses = zip(*(attend(q, k, v, scale) for k, v in parts), strict=True)
    got = merge(outs, lses)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert sum(p[0].shape[0] for p in parts) == n
