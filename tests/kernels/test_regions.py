"""pack_pages / unpack_pages with ``region_tokens``: a slot cut into values of R tokens (store
pages, page-major), each an ordinary packed slot, vs an index-walk oracle; and `PackedFormat`'s
addressing of such slots checked byte by byte against the pool."""

import pytest
import torch
from kvtest import (
    assert_cache_equals,
    check_pack,
    make_cache,
    mha,
    mla,
    oracle_pack_regions,
    round_trip,
    snapshot,
    three,
)

from cpkv import ComponentSpec
from cpkv.kernels import pack_pages, unpack_pages

BACKENDS = ["torch", "triton"]
KINDS = {"mha": mha, "mla": mla, "three": three}


def ids_for(n_pages, num_pages, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_pages, generator=g)[:n_pages].to(dtype)


def pack_regions(cache, ids, num_tokens, region, backend, *, layers=None, heads=None):
    """Pack values into a poisoned buffer: every value is the packed slot of its tokens."""
    lr = range(cache.num_layers) if layers is None else range(*layers)
    hr = range(cache.num_heads) if heads is None else range(*heads)
    return check_pack(cache, ids, num_tokens, backend, layers=layers, heads=heads,
                      want=oracle_pack_regions(cache, ids, num_tokens, region, lr, hr),
                      region_tokens=region)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("page_size,region", [(1, 1), (1, 5), (16, 16), (16, 32), (16, 24),
                                              (16, 3), (64, 16), (64, 64)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("kind", list(KINDS))
def test_values_round_trip(kind, page_size, region, id_dtype, backend):
    """Every value is the packed slot of its tokens alone (values a multiple of the page, a
    divisor, neither); unpacked into a pool of another page size, every byte lands."""
    num_tokens = 3 * region if region > 1 else 7
    n_pages = -(-num_tokens // page_size)
    src = make_cache(KINDS[kind](), num_layers=2, num_pages=n_pages + 2, page_size=page_size)
    ids = ids_for(n_pages, src.num_pages, id_dtype)
    packed = pack_regions(src, ids, num_tokens, region, backend)
    dst_ps = 16 if page_size != 16 else 1
    dst = make_cache(KINDS[kind](), num_layers=2, num_pages=num_tokens // dst_ps + 3,
                     page_size=dst_ps, layout="HND", seed=2)
    dst_ids = ids_for(-(-num_tokens // dst_ps), dst.num_pages, torch.int64, seed=3)
    again = round_trip(src, dst, ids, dst_ids, num_tokens, backend, region_tokens=region)
    assert torch.equal(again, packed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["layer-range", "head-slice-hnd", "strided-heads",
                                  "strided-pages", "one-value", "zero-tokens",
                                  "odd-row-bytes", "value-stride-4-aligned"])
def test_values_awkward(case, backend):
    specs, layout, strided, layers, heads = mha(num_heads=4), "NHD", None, None, None
    num_tokens, region, ps = 32, 8, 4
    if case == "layer-range":
        layers = (1, 3)
    elif case == "head-slice-hnd":
        layout, heads = "HND", (1, 3)
    elif case.startswith("strided"):
        strided, heads = case.split("-")[1], (1, 3)
    elif case == "one-value":
        region = num_tokens
    elif case == "zero-tokens":
        num_tokens = 0
    elif case == "odd-row-bytes":  # 7-byte rows: 1-byte words
        specs = [ComponentSpec("k", 3, 7, torch.uint8), ComponentSpec("v", 3, 96, torch.bfloat16)]
    elif case == "value-stride-4-aligned":
        # rows of 256 + 12 + 256 bytes: one token is 524 bytes, a value of 1 token is 4-byte
        # aligned only: K and V, 16-byte aligned in the slot's first value, must narrow.
        specs = [ComponentSpec("k", 1, 128, torch.bfloat16),
                 ComponentSpec("scale", 1, 3, torch.float32),
                 ComponentSpec("v", 1, 128, torch.bfloat16)]
        region, ps = 1, 1
    num_layers = 1 if case == "value-stride-4-aligned" else 3  # one layer: 524-byte values
    src = make_cache(specs, num_layers=num_layers, num_pages=36, page_size=ps, layout=layout,
                     strided=strided)
    ids = ids_for(max(-(-num_tokens // ps), 1), 36, torch.int64)
    pack_regions(src, ids, num_tokens, region, backend, layers=layers, heads=heads)
    dst = make_cache(specs, num_layers=num_layers, num_pages=40, page_size=1, seed=5)
    dst_ids = ids_for(max(num_tokens, 1), 40, torch.int32, seed=6)[:num_tokens]
    round_trip(src, dst, ids, dst_ids, num_tokens, backend, layers=layers, heads=heads,
               dst_layers=None if layers is None else (0, 2),
               dst_heads=None if heads is None else (2, 4), region_tokens=region)


@pytest.mark.parametrize("case", ["mha", "three", "16KiB-rows"])
def test_values_gpu_tile_sizes(case, monkeypatch):
    """The GPU's tiles (a few tokens per program): tiles that straddle two values."""
    from cpkv.kernels import paged_copy

    monkeypatch.setattr(paged_copy, "_TILE_BYTES_INTERPRET", paged_copy._TILE_BYTES)
    specs = {"mha": mha(), "three": three(), "16KiB-rows": mha(num_heads=64, head_dim=128)}[case]
    src = make_cache(specs, num_layers=2, num_pages=7, page_size=4)
    ids = ids_for(7, 7, torch.int32)
    pack_regions(src, ids, 27, 3, "triton")
    dst = make_cache(specs, num_layers=2, num_pages=9, page_size=8, seed=4)
    round_trip(src, dst, ids, ids_for(4, 9, torch.int64), 27, "triton", region_tokens=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_addresses_every_byte(backend):
    """`PackedFormat` says where each byte of a cut slot comes from: `locate` of every offset
    names the pool byte found there, `region(v)` is the packed slot of its tokens alone, and
    `block(l, c, v)` holds that component's rows of those tokens."""
    specs = three(num_heads=2)
    src = make_cache(specs, num_layers=2, num_pages=6, page_size=4)
    ids = ids_for(6, 6, torch.int64)
    packed = pack_regions(src, ids, 24, 6, backend)
    fmt = src.packed_format(24, region_tokens=6)
    ps, flat = src.page_size, packed
    for offset in range(0, fmt.nbytes, 7):
        loc = fmt.locate(offset)
        spec = next(c for c in specs if c.name == loc.component)
        pool = src.nhd_view(loc.component, loc.layer).contiguous().view(torch.uint8)
        row = pool[int(ids[loc.token // ps]), loc.token % ps].reshape(-1)
        assert int(flat[offset]) == int(row[loc.byte]), (offset, loc)
        assert loc.byte < spec.num_heads * spec.head_nbytes
    single = src.packed_format(6)  # one value: an ordinary slot of 6 tokens
    for v in range(fmt.num_regions):
        value = packed[fmt.region(v).slice]
        for layer in range(2):
            for c in range(3):
                assert torch.equal(value[single.block(layer, c).slice],
                                   packed[fmt.block(layer, c, v).slice]), (v, layer, c)
    span = fmt.segment(6, 12, 1, 2)
    assert span == (fmt.region(1).offset + fmt.block(1, 0).offset, 6 * fmt.layer_row_nbytes)


@pytest.mark.parametrize("call,exc,message", [
    (lambda c, ids: pack_pages(c, ids, num_tokens=30, region_tokens=8), ValueError,
     "region_tokens: num_tokens 30 expected a multiple of region_tokens 8"),
    (lambda c, ids: pack_pages(c, ids, region_tokens=0), ValueError,
     "region_tokens: expected a positive int, got 0"),
    (lambda c, ids: pack_pages(c, ids, region_tokens=True), ValueError,
     "region_tokens: expected a positive int, got True"),
    (lambda c, ids: pack_pages(c, ids, region_tokens=8.0), ValueError,
     "region_tokens: expected a positive int, got 8.0"),
    (lambda c, ids: unpack_pages(torch.zeros(c.packed_nbytes(32), dtype=torch.uint8), c, ids,
                                 region_tokens=8, format=c.packed_format(32)), ValueError,
     "packed format: region_tokens expected 8, got None"),
    (lambda c, ids: unpack_pages(torch.zeros(c.packed_nbytes(32), dtype=torch.uint8), c, ids,
                                 num_tokens=30, region_tokens=8), ValueError,
     "expected a multiple of region_tokens 8"),
])
def test_bad_regions_are_refused(call, exc, message):
    cache = make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=16)
    before = snapshot(cache)
    with pytest.raises(exc) as info:
        call(cache, torch.tensor([4, 1]))
    assert message in str(info.value)
    assert_cache_equals(cache, before, "pool")


def test_regions_are_checked_without_validation():
    """A wrong region size would place bytes outside the slot: refused even with
    validate=False (a host-only check, no synchronisation)."""
    cache = make_cache(mha(num_heads=2), num_layers=1, num_pages=4, page_size=16)
    with pytest.raises(ValueError, match="multiple of region_tokens 5"):
        pack_pages(cache, torch.tensor([1, 2]), region_tokens=5, validate=False)
