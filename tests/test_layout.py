"""PagedKVCache: construction, validation and sizes; PackedFormat: offsets and exchange."""

import pytest
import torch

from cpkv import ComponentSpec, PackedFormat, PagedKVCache


def test_mha_from_stacked_and_lists_agree():
    k = torch.zeros(4, 10, 16, 8, 128, dtype=torch.bfloat16)
    stacked = PagedKVCache.mha(k, torch.zeros_like(k), stacked=True)
    listed = PagedKVCache.mha(list(k), list(torch.zeros_like(k)))
    for c in (stacked, listed):
        assert (c.num_layers, c.num_pages, c.page_size, c.num_heads) == (4, 10, 16, 8)
        assert c.component_names == ["k", "v"]
        assert c.bytes_per_token() == 2 * 8 * 128 * 2
        assert c.bytes_per_token(heads=(0, 2)) == 2 * 2 * 128 * 2
        assert c.packed_nbytes(100) == 4 * 100 * 4096
        assert c.packed_nbytes(100, layers=(1, 3), heads=(4, 8)) == 2 * 100 * 2048


def test_mla_3d_latent_is_one_head_in_both_layouts():
    for layout in ("NHD", "HND"):
        c = PagedKVCache.mla([torch.zeros(5, 64, 576, dtype=torch.bfloat16) for _ in range(2)],
                             layout=layout)
        assert (c.num_heads, c.page_size, c.components[0].head_dim) == (1, 64, 576)
        assert c.packed_nbytes(10) == 2 * 10 * 1152


def test_hnd_geometry():
    c = PagedKVCache.empty_mha(num_layers=2, num_pages=3, page_size=16, num_heads=4,
                               head_dim=96, dtype=torch.float16, layout="HND")
    assert c.layer("k", 0).shape == (3, 4, 16, 96)
    assert c.nhd_view("k", 0).shape == (3, 16, 4, 96)
    assert (c.page_size, c.num_heads, c.num_entries) == (16, 4, 48)


def test_generic_components_with_mixed_dtypes():
    specs = [ComponentSpec("k", 2, 64, torch.float8_e4m3fn),
             ComponentSpec("v", 2, 64, torch.float8_e4m3fn),
             ComponentSpec("scale", 2, 1, torch.float32)]
    c = PagedKVCache.empty(specs, num_layers=3, num_pages=4, page_size=8)
    assert c.components == tuple(specs)
    assert c.bytes_per_token() == 2 * 64 + 2 * 64 + 2 * 4
    fmt = c.packed_format(5, layers=(1, 3))
    assert fmt.block_offsets() == [0, 640, 1280, 1320, 1960, 2600]
    assert fmt.nbytes == 2640 == c.packed_nbytes(5, layers=(1, 3))


def test_packed_format_round_trips_through_dict():
    c = PagedKVCache.empty_mla(num_layers=2, num_pages=4, page_size=8,
                               dtype=torch.float8_e5m2)
    fmt = c.packed_format(7)
    back = PackedFormat.from_dict(fmt.to_dict())
    assert back == fmt
    back.check_matches(fmt)
    with pytest.raises(ValueError, match="num_tokens expected 8, got 7"):
        fmt.check_matches(c.packed_format(8))


def _t(*shape, dtype=torch.bfloat16, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("comps,layout,exc,message", [
    ({"k": [_t(4, 16, 2, 8)], "v": [_t(4, 16, 2, 8, dtype=torch.float16)]}, "NHD", None, None),
    ({"k": [_t(4, 16, 2, 8), _t(4, 16, 2, 8, dtype=torch.float16)]}, "NHD", TypeError,
     "layer 1: expected dtype torch.bfloat16 (as layer 0), got torch.float16"),
    ({"k": [_t(4, 16, 2, 8), _t(4, 16, 2, 8, device="meta")]}, "NHD", ValueError,
     "expected device cpu, got meta"),
    ({"k": [_t(4, 16, 2, 8), _t(5, 16, 2, 8)]}, "NHD", ValueError,
     "expected shape (4, 16, 2, 8) (as layer 0), got (5, 16, 2, 8)"),
    ({"k": [_t(4, 16, 2, 8)], "v": [_t(4, 8, 2, 8)]}, "NHD", ValueError,
     "expected page_size 16, got 8"),
    ({"k": [_t(4, 16, 2, 8)], "v": [_t(3, 16, 2, 8)]}, "NHD", ValueError,
     "expected num_pages 4, got 3"),
    ({"k": [_t(4, 16, 2, 8)], "v": [_t(4, 16, 1, 8)]}, "NHD", ValueError,
     "expected num_heads 2 (as 'k'), got 1"),
    ({"k": [_t(4, 16, 2, 8)], "v": [_t(4, 16, 2, 8)] * 2}, "NHD", ValueError,
     "expected 1 layers (as 'k'), got 2"),
    ({"k": [_t(4, 16, 8, 2).transpose(2, 3)]}, "NHD", ValueError, "head_dim axis must be contig"),
    ({"k": [_t(4, 16, 2, 8)]}, "HDN", ValueError, "layout: expected one of ('NHD', 'HND')"),
    ({"k": [_t(4, 16)]}, "NHD", ValueError,
     "expected [num_pages, page_size, num_heads, head_dim] (4 dims), got shape (4, 16)"),
    ({"k": []}, "NHD", ValueError, "expected at least one layer"),
    ({"k": 3}, "NHD", TypeError, "expected a list of tensors or a stacked tensor, got int"),
    ({}, "NHD", ValueError, "expected at least one component"),
    ({"k": [_t(0, 16, 2, 8)]}, "NHD", ValueError, "every dimension must be >= 1"),
])
def test_cache_validation(comps, layout, exc, message):
    if exc is None:
        PagedKVCache(comps, layout=layout)  # dtypes may differ between components
        return
    with pytest.raises(exc) as info:
        PagedKVCache(comps, layout=layout)
    assert message in str(info.value)


def test_empty_rejects_bad_sizes():
    with pytest.raises(ValueError, match="page_size: expected a positive int, got 0"):
        PagedKVCache.empty_mha(num_layers=1, num_pages=1, page_size=0, num_heads=1, head_dim=8,
                               dtype=torch.float16)


@pytest.mark.parametrize("call,message", [
    # SGLang's k_buffer[layer] is [slots, heads, dim]: no longer read as a one-head latent
    (lambda: PagedKVCache.mha([_t(34, 2, 8)], [_t(34, 2, 8)]),
     "expected [num_pages, page_size, num_heads, head_dim] (4 dims), got shape (34, 2, 8); "
     "a token-major [slots, heads, head_dim] buffer (SGLang's k_buffer[layer]) goes through "
     "cpkv.adapters.from_sglang_mha"),
    # one 4-D tensor is a layer, not stacked 3-D layers, unless the caller says so
    (lambda: PagedKVCache.mha(_t(4, 16, 2, 8), _t(4, 16, 2, 8)),
     "expected a list of per-layer tensors [num_pages, page_size, num_heads, head_dim], got "
     "one tensor of shape (4, 16, 2, 8); pass stacked=True if its axis 0 is layers"),
    (lambda: PagedKVCache.mha(_t(3, 4, 16, 2, 8), _t(3, 4, 16, 2, 8)), "pass stacked=True"),
    (lambda: PagedKVCache.mha(_t(4, 16, 2, 8), _t(4, 16, 2, 8), stacked=True),
     "stacked=True expects [layers] + [num_pages, page_size, num_heads, head_dim] (5 dims), "
     "got shape (4, 16, 2, 8)"),
    # vLLM flash-attn [2, blocks, block_size, heads, dim] per layer
    (lambda: PagedKVCache.mha([_t(2, 4, 16, 2, 8)], [_t(2, 4, 16, 2, 8)]),
     "goes through cpkv.adapters.from_vllm / from_flashinfer"),
    (lambda: PagedKVCache.mla([_t(4, 16, 1, 8)]),
     "expected [num_pages, page_size, dim] (3 dims), got shape (4, 16, 1, 8); an MHA "
     "component needs its heads axis declared"),
    (lambda: PagedKVCache({"k": [_t(4, 16, 2, 8)]}, latent=("x",)),
     "latent: expected names among ['k'], got ['x']"),
    (lambda: PagedKVCache.empty_mha(num_layers=1, num_pages=2, page_size=4, num_heads=1,
                                    head_dim=-8, dtype=torch.float16),
     "component 'k' head_dim: expected a positive int, got -8"),
    (lambda: PagedKVCache.empty_mha(num_layers=1, num_pages=2, page_size=4, num_heads=1.5,
                                    head_dim=8, dtype=torch.float16),
     "num_heads: expected a positive int, got 1.5"),
])
def test_no_geometry_is_guessed(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_latent_only_where_declared():
    lat = [_t(4, 16, 576), _t(4, 16, 576)]
    c = PagedKVCache({"latent": lat, "index": [_t(4, 16, 132, dtype=torch.uint8)] * 1 +
                      [_t(4, 16, 132, dtype=torch.uint8)]}, latent=("latent", "index"))
    assert (c.num_heads, c.page_size, [s.head_dim for s in c.components]) == (1, 16, [576, 132])
    assert c.layer("latent", 1).untyped_storage().data_ptr() == lat[1].untyped_storage().data_ptr()


def _refused(comps, message, **kw):
    with pytest.raises(ValueError) as info:
        PagedKVCache(comps, **kw)
    assert message in str(info.value)


def test_aliasing_components_and_layers_refused():
    k = _t(4, 16, 2, 8)
    _refused({"k": [k], "v": [k]}, "component 'k' layer 0 and component 'v' layer 0 share memory")
    _refused({"k": [k, k]}, "component 'k' layer 0 and component 'k' layer 1 share memory")
    big = _t(5, 16, 2, 8)  # V starts one page into K: pages 1..3 alias
    _refused({"k": [big[:4]], "v": [big[1:]]}, "share memory")
    # head 1 of K is head 0 of V
    fused = _t(4, 16, 3, 8)
    _refused({"k": [fused[:, :, :2]], "v": [fused[:, :, 1:]]}, "share memory")
    # a stride-0 page axis: every page is one memory
    _refused({"k": [_t(1, 16, 2, 8).expand(4, 16, 2, 8)]},
             "the page axis overlaps itself (stride 0: every index aliases one memory)")
    _refused({"k": [torch.zeros(4, 16, 2, 8).as_strided((4, 16, 2, 8), (128, 8, 4, 1))]},
             "the head axis overlaps itself (byte stride 16 < 32")


def test_interleaved_views_that_share_no_bytes_are_accepted():
    fused = _t(4, 16, 4, 8)  # K | V halves of one heads axis
    c = PagedKVCache({"k": [fused[:, :, :2]], "v": [fused[:, :, 2:]]})
    assert c.num_heads == 2
    raw = torch.zeros(6, 16 * 132, dtype=torch.uint8)  # per page: 16 x 128 values, 16 x 4 scales
    values = raw[:, :16 * 128].view(6, 16, 128)
    scales = raw[:, 16 * 128:].view(6, 16, 4)
    c = PagedKVCache({"values": [values], "scales": [scales]}, latent=("values", "scales"))
    assert c.num_pages == 6
    stacked = _t(3, 4, 16, 2, 8)
    PagedKVCache.mha(stacked[:, :, :, :1], stacked[:, :, :, 1:], stacked=True)


@pytest.mark.parametrize("patch,message", [
    ({"version": 2}, "version expected 1, got 2"),
    ({"version": True}, "version expected an int >= 1, got True"),
    ({"num_tokens": -1}, "num_tokens expected an int >= 0, got -1"),
    ({"num_tokens": 7.0}, "num_tokens expected an int >= 0, got 7.0"),
    ({"num_layers": False}, "num_layers expected an int >= 0, got False"),
    ({"components": [["k", -2, 8, "bfloat16"]]}, "k.num_heads expected an int >= 1, got -2"),
    ({"components": [["k", 2, 8.5, "bfloat16"]]}, "k.head_dim expected an int >= 1, got 8.5"),
    ({"components": [["k", 2, 8, "float9"]]}, "unknown dtype 'float9'"),
    ({"components": [["k", 2, 8]]}, "a component expected [name, num_heads, head_dim, dtype]"),
    ({"components": []}, "components expected a non-empty list"),
])
def test_packed_format_from_dict_refuses(patch, message):
    d = PagedKVCache.empty_mha(num_layers=1, num_pages=2, page_size=4, num_heads=2, head_dim=8,
                               dtype=torch.bfloat16).packed_format(7).to_dict()
    with pytest.raises(ValueError) as info:
        PackedFormat.from_dict({**d, **patch})
    assert message in str(info.value)


def test_layers_interleaved_in_one_buffer():
    """Blocks-major allocation (every layer's block b next to each other): accepted, fast;
    a layer view shifted into its neighbour is refused."""
    raw = _t(6, 4, 2, 16, 2, 8)  # [blocks, layers, K/V, block_size, heads, dim]
    k = [raw[:, layer, 0] for layer in range(4)]
    v = [raw[:, layer, 1] for layer in range(4)]
    c = PagedKVCache.mha(k, v)
    assert (c.num_layers, c.num_pages) == (4, 6)
    flat = raw.view(6, -1)
    shifted = flat[:, 8:8 + 16 * 2 * 8].view(6, 16, 2, 8)  # half a head row into layer 0's K
    _refused({"k": [k[0]], "v": [shifted]}, "share memory")


def _three(num_layers=2):
    specs = [ComponentSpec("k", 2, 64, torch.float8_e4m3fn),
             ComponentSpec("v", 2, 64, torch.float8_e4m3fn),
             ComponentSpec("scale", 2, 1, torch.float32)]
    return PagedKVCache.empty(specs, num_layers=num_layers, num_pages=4, page_size=8)


def test_format_sizes_per_token_layer_and_value():
    c = _three(num_layers=3)
    fmt = c.packed_format(12, region_tokens=4)
    assert fmt.row_nbytes == [128, 128, 8]
    assert (fmt.layer_row_nbytes, fmt.token_nbytes) == (264, 3 * 264)
    assert (fmt.rows_per_region, fmt.num_regions, fmt.region_nbytes) == (4, 3, 4 * 3 * 264)
    assert fmt.nbytes == 12 * 3 * 264 == c.packed_nbytes(12)
    plain = c.packed_format(12)
    assert (plain.rows_per_region, plain.num_regions, plain.region_nbytes) == (12, 1, plain.nbytes)
    assert c.packed_format(0, region_tokens=4).num_regions == 0


def test_values_blocks_and_segments_by_hand():
    """Offsets worked out by hand for 3 components x 2 layers, values of 4 tokens."""
    fmt = _three().packed_format(8, region_tokens=4)
    value = 4 * 2 * 264  # 2112
    assert fmt.region(1) == (value, value) and fmt.region(1).slice == slice(value, 2 * value)
    assert fmt.block_offsets() == [0, 512, 1024, 1056, 1568, 2080]  # inside a value
    assert fmt.block(1, 2, region=1) == (value + 2080, 32)
    assert fmt.block(0, 1) == (512, 512)
    assert fmt.segment(4, 8) == (value, value)
    assert fmt.segment(4, 8, 1, 2) == (value + 4 * 264, 4 * 264)
    assert fmt.segment(0, 8) == (0, 2 * value)
    # an uncut slot filled by two senders: tokens [0, 3) then [3, 8), layer-major each
    plain = _three().packed_format(8)
    assert plain.segment(3, 8) == (3 * 528, 5 * 528)
    assert plain.segment(3, 8, 1, 2) == (3 * 528 + 5 * 264, 5 * 264)
    assert plain.segment(0, 8, 1, 2).offset == plain.block(1, 0).offset
    assert plain.segment(5, 5).nbytes == 0


def test_locate_names_token_layer_component_byte():
    fmt = _three().packed_format(8, region_tokens=4)
    value = 2112
    assert fmt.locate(0) == (0, 0, "k", 0)
    assert fmt.locate(129) == (1, 0, "k", 1)
    assert fmt.locate(512 + 3 * 128 + 5) == (3, 0, "v", 5)
    assert fmt.locate(1024 + 8 + 7) == (1, 0, "scale", 7)
    assert fmt.locate(value + 1056) == (4, 1, "k", 0)
    assert fmt.locate(2 * value - 1) == (7, 1, "scale", 7)
    plain = _three().packed_format(8)
    assert plain.locate(8 * 128) == (0, 0, "v", 0)
    with pytest.raises(ValueError, match=r"offset: expected an int in \[0, 4224\), got 4224"):
        plain.locate(4224)


@pytest.mark.parametrize("call,message", [
    (lambda f: f.region(2), "region: expected an int in [0, 2), got 2"),
    (lambda f: f.region(-1), "region: expected an int in [0, 2), got -1"),
    (lambda f: f.block(2, 0), "layer: expected an int in [0, 2), got 2"),
    (lambda f: f.block(0, 3), "component: expected an int in [0, 3), got 3"),
    (lambda f: f.block(0, 0, region=2), "region: expected an int in [0, 2), got 2"),
    (lambda f: f.segment(0, 9), "expected tokens 0 <= t0 <= t1 <= 8, got [0, 9)"),
    (lambda f: f.segment(5, 4), "got [5, 4)"),
    (lambda f: f.segment(0, 4, 1, 3), "expected layers 0 <= l0 <= l1 <= 2, got [1, 3)"),
    (lambda f: f.segment(2, 6), "tokens [2, 6) do not start and end on values of 4 tokens"),
    (lambda f: f.segment(0, 8, 0, 1), "layers [0, 1) of several values are not contiguous"),
])
def test_addressing_refuses_what_is_not_there(call, message):
    with pytest.raises(ValueError) as info:
        call(_three().packed_format(8, region_tokens=4))
    assert message in str(info.value)


def test_cut_formats_on_the_wire():
    c = _three()
    fmt = c.packed_format(8, region_tokens=4)
    d = fmt.to_dict()
    assert d["region_tokens"] == 4 and "region_tokens" not in c.packed_format(8).to_dict()
    assert PackedFormat.from_dict(d) == fmt
    with pytest.raises(ValueError, match="region_tokens expected 4, got None"):
        c.packed_format(8).check_matches(fmt)
    for bad, message in ((0, "region_tokens expected an int >= 1, got 0"),
                         (3, "num_tokens 8 expected a multiple of region_tokens 3")):
        with pytest.raises(ValueError, match=message):
            PackedFormat.from_dict({**d, "region_tokens": bad})
    with pytest.raises(ValueError, match="region_tokens: num_tokens 8 expected a multiple of "
                                         "region_tokens 3"):
        c.packed_format(8, region_tokens=3)
