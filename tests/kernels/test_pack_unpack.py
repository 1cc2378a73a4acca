"""pack_pages / unpack_pages, Triton (interpreter on CPU) and torch, vs an index-walk oracle."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvtest import (
    GUARD,
    SENTINEL,
    as_bytes,
    assert_bytes_equal,
    check_pack,
    copy_back,
    kernel_device,
    make_cache,
    mha,
    mla,
    on,
    oracle_pack,
    pool_on,
    round_trip,
    three,
)

from cpkv import ComponentSpec
from cpkv.kernels import pack_pages, unpack_pages

BACKENDS = ["torch", "triton"]
KINDS = {"mha": mha, "mla": mla, "three": three}


def request_ids(pattern, n_pages, num_pages, dtype, seed=0):
    """Fragmented: random distinct ids from the whole pool; contiguous: a fresh run."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "frag":
        ids = torch.randperm(num_pages, generator=g)[:n_pages]
    else:
        ids = torch.arange(n_pages) + (num_pages - n_pages) // 2
    return ids.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,id_dtype", [("frag", torch.int32), ("contig", torch.int64)],
                         ids=["frag-int32", "contig-int64"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pack_partial_last_page(layout, kind, page_size, pattern, id_dtype, backend):
    cache = make_cache(KINDS[kind](), num_layers=2, num_pages=7, page_size=page_size,
                       layout=layout)
    ids = request_ids(pattern, 3, 7, id_dtype)
    check_pack(cache, ids, num_tokens=2 * page_size + 1, backend=backend)  # last page: 1 token


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("num_layers", [1, 2])  # the torch path: per layer, all layers stacked
def test_pages_listed_past_the_last_token(num_layers, layout, page_size, backend):
    """More pages listed than the tokens fill (a runner's block table is longer than the
    request): the partial last page is the one after the full ones, not the last listed; the
    pages past it are neither read nor written."""
    src = make_cache(mha(), num_layers=num_layers, num_pages=9, page_size=page_size,
                     layout=layout)
    dst = make_cache(mha(), num_layers=num_layers, num_pages=9, page_size=page_size,
                     layout=layout, seed=3)
    n = page_size + 3  # the tail is the second listed page of four
    check_pack(src, torch.tensor([6, 1, 7, 3]), n, backend)
    round_trip(src, dst, torch.tensor([6, 1, 7, 3]), torch.tensor([2, 8, 0, 5]), n, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_pack_dtypes(dtype, backend):
    cache = make_cache(mha(num_heads=3, head_dim=96, dtype=dtype), num_layers=2, num_pages=9,
                       page_size=16)
    check_pack(cache, request_ids("frag", 4, 9, torch.int64), num_tokens=50, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["zero-pages", "zero-tokens", "one-token", "one-layer",
                                  "layer-range", "head-slice", "odd-row-bytes",
                                  "strided-heads", "strided-pages", "strided-heads-hnd"])
def test_pack_awkward(case, backend):
    specs, layers, heads, layout, strided = mha(num_heads=4), None, None, "NHD", None
    num_layers, ids, num_tokens = 3, request_ids("frag", 3, 8, torch.int64), 40
    if case == "zero-pages":
        ids, num_tokens = ids[:0], None
    elif case == "zero-tokens":
        num_tokens = 0
    elif case == "one-token":
        num_tokens = 1
    elif case == "one-layer":
        num_layers = 1
    elif case == "layer-range":
        layers = (1, 3)
    elif case == "head-slice":
        heads = (1, 3)
    elif case == "odd-row-bytes":  # 7-byte rows force 1-byte words
        specs = [ComponentSpec("k", 3, 7, torch.uint8), ComponentSpec("v", 3, 96, torch.bfloat16)]
    elif case.startswith("strided"):
        strided = case.split("-")[1]
        layout = "HND" if case.endswith("hnd") else "NHD"
        heads = (1, 3)
    cache = make_cache(specs, num_layers=num_layers, num_pages=8, page_size=16, layout=layout,
                       strided=strided)
    n = len(ids) * 16 if num_tokens is None else num_tokens
    got = check_pack(cache, ids, n, backend, layers=layers, heads=heads)
    if case.startswith("zero"):
        assert got.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dst_layout", ["NHD", "HND"])
@pytest.mark.parametrize("src_ps,dst_ps", [(16, 1), (1, 16), (16, 64), (64, 16), (16, 16)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_unpack_other_page_size(kind, src_ps, dst_ps, dst_layout, backend):
    num_tokens = 2 * max(src_ps, dst_ps) + 3  # partial last page on both sides
    src = make_cache(KINDS[kind](), num_layers=2, num_pages=num_tokens // src_ps + 2,
                     page_size=src_ps, seed=1)
    dst = make_cache(KINDS[kind](), num_layers=2, num_pages=num_tokens // dst_ps + 3,
                     page_size=dst_ps, layout=dst_layout, seed=2)
    src_ids = request_ids("frag", -(-num_tokens // src_ps), src.num_pages, torch.int32)
    dst_ids = request_ids("frag", -(-num_tokens // dst_ps), dst.num_pages, torch.int64, seed=3)
    round_trip(src, dst, src_ids, dst_ids, num_tokens, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_head_slice_at_other_offset(backend):
    """Heads [2, 4) of an 8-head prefill pool land at heads [0, 2) and [1, 3) of decode pools."""
    src = make_cache(mha(num_heads=8), num_layers=3, num_pages=6, page_size=16)
    ids = request_ids("frag", 4, 6, torch.int64)
    for dst_heads, dst_h in [((0, 2), 2), ((1, 3), 4)]:
        dst = make_cache(mha(num_heads=dst_h), num_layers=3, num_pages=5, page_size=16,
                         layout="HND")
        round_trip(src, dst, ids, request_ids("frag", 4, 5, torch.int32), 55, backend,
                   heads=(2, 4), dst_heads=dst_heads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_layer_range_into_stage_offset(backend):
    """A pipeline stage's layers [0, 2) land at layers [2, 4) of a full-depth decode pool."""
    src = make_cache(mla(), num_layers=2, num_pages=4, page_size=16)
    dst = make_cache(mla(), num_layers=4, num_pages=30, page_size=1)
    ids = request_ids("frag", 2, 4, torch.int64)
    round_trip(src, dst, ids, torch.arange(20) + 7, 20, backend, dst_layers=(2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", ["heads", "pages"])
def test_unpack_strided_destination(strided, backend):
    src = make_cache(three(num_heads=2), num_layers=2, num_pages=5, page_size=16)
    dst = make_cache(three(num_heads=2), num_layers=2, num_pages=9, page_size=8, strided=strided)
    ids = request_ids("frag", 3, 5, torch.int64)
    round_trip(src, dst, ids, request_ids("frag", 5, 9, torch.int32), 37, backend)


def test_unpack_accepts_typed_packed_buffer():
    src = make_cache(mha(dtype=torch.float16), num_layers=2, num_pages=4, page_size=16)
    dst = make_cache(mha(dtype=torch.float16), num_layers=2, num_pages=4, page_size=16, seed=9)
    ids = torch.tensor([3, 0])
    packed = pack_pages(src, ids).view(torch.float16)
    unpack_pages(packed, dst, ids)
    assert_bytes_equal(pack_pages(dst, ids), as_bytes(packed), "round trip")


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_property(data):
    """pack -> unpack -> pack returns the same bytes, and no unlisted byte changes."""
    kind = data.draw(st.sampled_from(list(KINDS)))
    heads = data.draw(st.integers(1, 3)) if kind != "mla" else 1
    head_dim = data.draw(st.sampled_from([8, 96, 576])) if kind == "mha" else 576
    specs = mha(heads, head_dim) if kind == "mha" else mla() if kind == "mla" else three(heads)
    src_ps = data.draw(st.sampled_from([1, 2, 5, 16]))
    dst_ps = data.draw(st.sampled_from([1, 3, 16, 64]))
    num_layers = data.draw(st.integers(1, 3))
    num_tokens = data.draw(st.integers(0, 70))
    src_pages = -(-num_tokens // src_ps)
    dst_pages = -(-num_tokens // dst_ps)
    src = make_cache(specs, num_layers=num_layers, num_pages=src_pages + 2, page_size=src_ps,
                     layout=data.draw(st.sampled_from(["NHD", "HND"])), seed=4)
    dst = make_cache(specs, num_layers=num_layers, num_pages=dst_pages + 2, page_size=dst_ps,
                     layout=data.draw(st.sampled_from(["NHD", "HND"])), seed=5)
    src_ids = torch.randperm(src.num_pages)[:src_pages]
    dst_ids = torch.randperm(dst.num_pages)[:dst_pages].to(torch.int32)
    backend = data.draw(st.sampled_from(BACKENDS))
    round_trip(src, dst, src_ids, dst_ids, num_tokens, backend)
    dev = kernel_device(backend)
    assert_bytes_equal(pack_pages(pool_on(dst, dev), on(dst_ids, dev), num_tokens=num_tokens,
                                  backend=backend).cpu(),
                       pack_pages(src, src_ids, num_tokens=num_tokens, backend="torch"),
                       "repacked")


LONG_ROWS = {  # rows over 2 KiB loop in 2 KiB steps; over 8 KiB they split across programs
    "4KiB-rows": (mha(num_heads=16, head_dim=128), "NHD", None),
    "16KiB-rows": (mha(num_heads=64, head_dim=128), "NHD", None),
    "6KiB-hnd-strided": (mha(num_heads=24, head_dim=128), "HND", None),
    "head-slice-of-4KiB": (mha(num_heads=16, head_dim=128), "NHD", "heads"),
    "mixed-widths": ([ComponentSpec("k", 4, 128, torch.bfloat16),
                      ComponentSpec("scale", 4, 3, torch.float32),
                      ComponentSpec("v", 4, 128, torch.bfloat16),
                      ComponentSpec("odd", 4, 5, torch.uint8)], "NHD", None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LONG_ROWS))
def test_long_rows_and_mixed_widths(case, backend):
    """Multi-step and split rows, strided heads, and components of different word widths in
    one pool: every byte still lands where the oracle says, in both directions."""
    specs, layout, strided = LONG_ROWS[case]
    src = make_cache(specs, num_layers=2, num_pages=5, page_size=4, layout=layout,
                     strided=strided)
    dst = make_cache(specs, num_layers=2, num_pages=6, page_size=2, layout=layout, seed=3)
    ids = request_ids("frag", 3, 5, torch.int32)
    check_pack(src, ids, num_tokens=11, backend=backend)
    round_trip(src, dst, ids, request_ids("frag", 6, 6, torch.int64, seed=2), 11, backend)


def test_pool_on_keeps_the_layout():
    """The helper that puts pools on the kernel device keeps strided views strided."""
    for strided, layout in (("heads", "NHD"), ("pages", "HND")):
        cache = make_cache(mha(num_heads=3), num_layers=2, num_pages=4, page_size=4,
                           layout=layout, strided=strided)
        moved = pool_on(cache, "cpu", force=True)
        for name, ts in cache.buffers.items():
            for t, m in zip(ts, moved.buffers[name], strict=True):
                assert m.stride() == t.stride() and m.storage_offset() == t.storage_offset()
                assert m.data_ptr() != t.data_ptr() and torch.equal(as_bytes(m), as_bytes(t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1, 2, 4, 8, 16])
def test_slots_at_any_alignment(offset, backend):
    """A slot at any byte offset (a receiver's segment, a slice of a staging slot) narrows the
    word to what its address allows; the bytes are the same."""
    cache = make_cache(mha(num_heads=2, head_dim=64), num_layers=2, num_pages=6, page_size=4)
    dst = make_cache(mha(num_heads=2, head_dim=64), num_layers=2, num_pages=6, page_size=4,
                     seed=5)
    dev = kernel_device(backend)
    ids = request_ids("frag", 3, 6, torch.int32)
    nbytes = cache.packed_nbytes(10)
    buf = torch.full((nbytes + offset + GUARD,), SENTINEL, dtype=torch.uint8, device=dev)
    out = buf[offset:offset + nbytes]
    pack_pages(pool_on(cache, dev), on(ids, dev), num_tokens=10, out=out, backend=backend)
    assert_bytes_equal(out.cpu(), oracle_pack(cache, ids, 10, range(2), range(2)), "packed")
    assert bool((buf[:offset] == SENTINEL).all() and (buf[offset + nbytes:] == SENTINEL).all())
    moved = pool_on(dst, dev)
    unpack_pages(out, moved, on(ids, dev), num_tokens=10, backend=backend)
    copy_back(moved, dst)
    assert_bytes_equal(pack_pages(dst, ids, num_tokens=10, backend="torch"), out.cpu(),
                       "round trip")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pool_packs_into_slots_of_other_alignments(backend):
    """The launch plan is cached per pool; a plan made for a 16-byte aligned slot must not be
    reused for a slot at an odd address (k-plan-cache-key)."""
    cache = make_cache(mha(num_heads=2, head_dim=64), num_layers=2, num_pages=6, page_size=4)
    dev = kernel_device(backend)
    moved, ids = pool_on(cache, dev), torch.tensor([4, 0, 2], dtype=torch.int32)
    nbytes = cache.packed_nbytes(10)
    want = oracle_pack(cache, ids, 10, range(2), range(2))
    for offset in (0, 1, 2, 16, 1):  # aligned first, so the cached plan is the widest
        buf = torch.zeros(nbytes + 16, dtype=torch.uint8, device=dev)
        out = pack_pages(moved, on(ids, dev), num_tokens=10, out=buf[offset:offset + nbytes],
                         backend=backend)
        assert_bytes_equal(out.cpu(), want, f"packed at offset {offset}")
        unpacked = pool_on(make_cache(mha(num_heads=2, head_dim=64), num_layers=2, num_pages=6,
                                      page_size=4, seed=3), dev)
        unpack_pages(out, unpacked, on(ids, dev), num_tokens=10, backend=backend)
        assert_bytes_equal(pack_pages(unpacked, on(ids, dev), num_tokens=10,
                                      backend=backend).cpu(), want, f"round trip {offset}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mha", "mla", "three", "hnd-strided", "16KiB-rows"])
def test_gpu_tile_sizes(case, monkeypatch):
    """The GPU's tiles (8 KiB steps: a few tokens per program, many programs), also where the
    interpreter stands in for the GPU: every tile edge lands where the oracle says."""
    from cpkv.kernels import paged_copy

    monkeypatch.setattr(paged_copy, "_TILE_BYTES_INTERPRET", paged_copy._TILE_BYTES)
    specs, layout, strided = {
        "mha": (mha(), "NHD", None), "mla": (mla(), "NHD", None), "three": (three(), "NHD", None),
        "hnd-strided": (mha(num_heads=3), "HND", "heads"),
        "16KiB-rows": (mha(num_heads=64, head_dim=128), "NHD", None)}[case]
    src = make_cache(specs, num_layers=2, num_pages=7, page_size=16, layout=layout,
                     strided=strided)
    dst = make_cache(specs, num_layers=2, num_pages=9, page_size=8, seed=4)
    ids = request_ids("frag", 5, 7, torch.int32)
    check_pack(src, ids, num_tokens=70, backend="triton")
    round_trip(src, dst, ids, request_ids("frag", 9, 9, torch.int64), 70, "triton")
