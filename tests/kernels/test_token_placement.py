"""pack_pages / unpack_pages with pool-side token placement: ``token_offset`` (a segment that
starts mid-page: a decode request's prefix already in its pages) and ``tokens`` (a selection:
the tokens one decode-context-parallel rank owns), vs an index-walk oracle, with poisoned
outputs and sentinel-filled destinations whose untouched pages and entries are checked."""

import pytest
import torch
from kvtest import (
    SENTINEL,
    assert_cache_equals,
    check_pack,
    make_cache,
    mha,
    mla,
    oracle_move,
    oracle_pack_tokens,
    round_trip,
    snapshot,
    three,
)

from cpkv.kernels import pack_pages, unpack_pages

BACKENDS = ["torch", "triton"]
KINDS = {"mha": mha, "mla": mla, "three": three}
INDEX = [torch.int32, torch.int64]


def ids_for(n_pages, num_pages, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_pages, generator=g)[:n_pages].to(dtype)


def dcp_tokens(num_tokens, size, rank, interleave):
    """Request tokens DCP rank ``rank`` of ``size`` owns with interleave I: (t // I) % D."""
    return [t for t in range(num_tokens) if (t // interleave) % size == rank]


def pack_selected(cache, ids, walk, backend, **kwargs):
    """Pack (``kwargs`` place the rows) and compare with the oracle walking tokens ``walk``."""
    lr, hr = range(cache.num_layers), range(cache.num_heads)
    want = oracle_pack_tokens(cache, ids, walk, lr, hr)
    return check_pack(cache, ids, kwargs.pop("num_tokens", len(walk)), backend, want=want,
                      **kwargs)


def move(src, src_ids, src_rows, dst, dst_ids, dst_rows, backend, pack_kw, unpack_kw):
    """Round trip with placements on both sides; the oracle moves src_rows[j] to dst_rows[j]."""
    lr, hr = range(src.num_layers), range(src.num_heads)
    round_trip(src, dst, src_ids, dst_ids, len(src_rows), backend,
               oracle=lambda: oracle_move(src, src_ids, src_rows, dst, dst_ids, dst_rows,
                                          lr, hr, range(dst.num_layers), range(dst.num_heads)),
               pack_kw=pack_kw, unpack_kw=unpack_kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", INDEX, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("kind", list(KINDS))
def test_offset_mid_page_round_trip(kind, page_size, id_dtype, backend):
    """Rows start mid-page on both sides (offsets 1 and ps + 3 / ps - 1), the last page holds
    one row; the destination's prefix entries and every other page keep their sentinel."""
    n = 2 * page_size + 1
    src_off, dst_off = (1, 0) if page_size == 1 else (page_size + 3, page_size - 1)
    src = make_cache(KINDS[kind](), num_layers=2, num_pages=(src_off + n) // page_size + 3,
                     page_size=page_size)
    dst = make_cache(KINDS[kind](), num_layers=2, num_pages=(dst_off + n) // page_size + 3,
                     page_size=page_size, layout="HND", seed=2)
    src_ids = ids_for(-(-(src_off + n) // page_size), src.num_pages, id_dtype)
    dst_ids = ids_for(-(-(dst_off + n) // page_size), dst.num_pages, id_dtype, seed=3)
    pack_selected(src, src_ids, range(src_off, src_off + n), backend, num_tokens=n,
                  token_offset=src_off)
    move(src, src_ids, range(src_off, src_off + n), dst, dst_ids, range(dst_off, dst_off + n),
         backend, {"token_offset": src_off}, {"token_offset": dst_off})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tok_dtype", INDEX, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("size,interleave", [(2, 1), (4, 2), (2, 16)])
def test_dcp_rank_selection_into_compact_pages(size, interleave, page_size, tok_dtype, backend):
    """Each DCP rank's tokens (t // I) % D == r, packed from the whole prefill request, land
    compactly (local index (t // (I D)) I + t % I) after the rank's cached prefix: together
    the ranks hold every token exactly once, as the DCP layout says."""
    n, prefix = 3 * page_size + 5, 3
    src = make_cache(mha(num_heads=2), num_layers=2, num_pages=n // page_size + 2,
                     page_size=page_size)
    src_ids = ids_for(-(-n // page_size), src.num_pages, torch.int64)
    owned = sorted(t for r in range(size) for t in dcp_tokens(n, size, r, interleave))
    assert owned == list(range(n))
    for rank in range(size):
        mine = dcp_tokens(n, size, rank, interleave)
        local = [(t // (interleave * size)) * interleave + t % interleave for t in mine]
        assert local == list(range(len(mine)))
        sel = torch.tensor(mine, dtype=tok_dtype)
        pack_selected(src, src_ids, mine, backend, tokens=sel)
        dst = make_cache(mha(num_heads=2), num_layers=2,
                         num_pages=(prefix + len(mine)) // page_size + 2, page_size=page_size,
                         seed=rank + 5)
        dst_ids = ids_for(-(-(prefix + len(mine)) // page_size), dst.num_pages, torch.int32)
        move(src, src_ids, mine, dst, dst_ids, [prefix + j for j in local], backend,
             {"tokens": sel}, {"token_offset": prefix})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tok_dtype", INDEX, ids=lambda d: str(d).removeprefix("torch."))
def test_unpack_scatters_to_listed_tokens(tok_dtype, backend):
    """Compact rows scatter to a random set of distinct tokens (any order) of pages of another
    size; tokens not listed keep their sentinel."""
    src = make_cache(three(), num_layers=2, num_pages=5, page_size=16)
    dst = make_cache(three(), num_layers=2, num_pages=12, page_size=4, seed=1)
    g = torch.Generator().manual_seed(4)
    to = torch.randperm(40, generator=g)[:23].to(tok_dtype)
    src_ids, dst_ids = ids_for(2, 5, torch.int64), ids_for(10, 12, torch.int32, seed=2)
    move(src, src_ids, range(23), dst, dst_ids, to.tolist(), backend, {},
         {"tokens": to})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty", "repeated", "reversed", "one-token"])
def test_pack_selections(case, backend):
    """A selection may be empty, repeat a token (pack only reads) or run backwards."""
    cache = make_cache(mla(), num_layers=2, num_pages=4, page_size=16)
    ids = ids_for(3, 4, torch.int32)
    sel = {"empty": [], "repeated": [5, 5, 40, 5], "reversed": list(range(47, -1, -3)),
           "one-token": [47]}[case]
    got = pack_selected(cache, ids, sel, backend,
                        tokens=torch.tensor(sel, dtype=torch.int64))
    assert got.numel() == len(sel) * 2 * 1152


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_land_mid_page(backend):
    """A store load that does not start on a reader page: values of 16 tokens unpacked at
    token_offset 5 of pages of 8."""
    src = make_cache(mha(), num_layers=2, num_pages=4, page_size=16)
    dst = make_cache(mha(), num_layers=2, num_pages=10, page_size=8, seed=6)
    src_ids, dst_ids = ids_for(3, 4, torch.int64), ids_for(7, 10, torch.int64, seed=7)
    lr, hr = range(2), range(2)
    round_trip(src, dst, src_ids, dst_ids, 48, "triton" if backend == "triton" else "torch",
               oracle=lambda: oracle_move(src, src_ids, range(48), dst, dst_ids,
                                          range(5, 53), lr, hr, lr, hr),
               unpack_kw={"token_offset": 5}, region_tokens=16)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["offset", "tokens"])
def test_gpu_tile_sizes(case, monkeypatch):
    """The GPU's tiles (a few tokens per program) with rows placed by offset or list."""
    from cpkv.kernels import paged_copy

    monkeypatch.setattr(paged_copy, "_TILE_BYTES_INTERPRET", paged_copy._TILE_BYTES)
    src = make_cache(mha(num_heads=64, head_dim=128), num_layers=1, num_pages=6, page_size=4)
    dst = make_cache(mha(num_heads=64, head_dim=128), num_layers=1, num_pages=12, page_size=2,
                     seed=2)
    src_ids, dst_ids = ids_for(6, 6, torch.int32), ids_for(12, 12, torch.int64, seed=1)
    if case == "offset":
        move(src, src_ids, range(3, 14), dst, dst_ids, range(5, 16), "triton",
             {"token_offset": 3}, {"token_offset": 5})
    else:
        sel = torch.tensor([9, 0, 22, 13, 4, 17, 1])
        move(src, src_ids, sel.tolist(), dst, dst_ids, sel.flip(0).tolist(), "triton",
             {"tokens": sel}, {"tokens": sel.flip(0).to(torch.int32)})


META = torch.device("meta")


@pytest.mark.parametrize("op", ["pack", "unpack"])
@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(tokens=torch.tensor([0, 32])), ValueError, "tokens: expected values in [0, 32), got"),
    (dict(tokens=torch.tensor([-1, 3])), ValueError, "tokens: expected values in [0, 32), got"),
    (dict(tokens=torch.tensor([1.0])), TypeError, "tokens: expected dtype int32 or int64"),
    (dict(tokens=torch.tensor([[1, 2]])), ValueError, "tokens: expected a 1-D tensor"),
    (dict(tokens=torch.tensor([1], device=META)), ValueError,
     "tokens: expected device cpu, got meta"),
    (dict(tokens=torch.tensor([1, 2]), token_offset=3), ValueError,
     "token_offset: expected 0 with tokens="),
    (dict(tokens=torch.tensor([1, 2]), num_tokens=3), ValueError,
     "num_tokens: expected None or len(tokens) = 2, got 3"),
    (dict(token_offset=-1), ValueError, "token_offset: expected 0 <= token_offset <= 32"),
    (dict(token_offset=33), ValueError, "got 33"),
    (dict(token_offset=True), TypeError, "token_offset: expected int, got bool"),
    (dict(token_offset=30, num_tokens=3), ValueError,
     "num_tokens: expected 0 <= num_tokens <= 2 (2 pages x page_size 16 after token_offset "
     "30), got 3"),
])
def test_bad_placements_are_refused(op, kwargs, exc, message):
    src = make_cache(mha(num_heads=2), num_layers=2, num_pages=4, page_size=16)
    dst = make_cache(mha(num_heads=2), num_layers=2, num_pages=4, page_size=16, seed=1)
    ids = torch.tensor([3, 1])
    before, before_dst = snapshot(src), snapshot(dst)
    with pytest.raises(exc) as info:
        if op == "pack":
            pack_pages(src, ids, **kwargs)
        else:
            unpack_pages(torch.zeros(dst.packed_nbytes(2), dtype=torch.uint8), dst, ids,
                         **kwargs)
    assert message in str(info.value)
    assert_cache_equals(src, before, "source")
    assert_cache_equals(dst, before_dst, "destination")


def test_unpack_refuses_a_token_listed_twice():
    """Two rows into one token would race: refused (pack may read a token twice)."""
    dst = make_cache(mha(num_heads=2), num_layers=1, num_pages=4, page_size=16)
    before = snapshot(dst)
    packed = torch.full((dst.packed_nbytes(3),), SENTINEL, dtype=torch.uint8)
    with pytest.raises(ValueError, match="tokens: expected distinct request-local tokens"):
        unpack_pages(packed, dst, torch.tensor([0, 2]), tokens=torch.tensor([4, 9, 4]))
    assert_cache_equals(dst, before, "destination")
