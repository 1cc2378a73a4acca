"""PagedKVCache: construction, validation and sizes; PackedFormat: offsets and exchange."""

import pytest
import torch

from cpkv import ComponentSpec, PackedFormat, PagedKVCache


def test_mha_from_stacked_and_lists_agree():
    k = torch.zeros(4, 10, 16, 8, 128, dtype=torch.bfloat16)
    stacked = PagedKVCache.mha(k, torch.zeros_like(k))
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
        c = PagedKVCache.mla([torch.zeros(5, 64, 576, dtype=torch.bfloat16)] * 2, layout=layout)
        assert (c.num_heads, c.page_size, c.components[0].head_dim) == (1, 64, 576)
        assert c.packed_nbytes(10) == 2 * 10 * 1152


def test_hnd_geometry():
    c = PagedKVCache.empty_mha(num_layers=2, num_pages=3, page_size=16, num_heads=4,
                               head_dim=96, dtype=torch.float16, layout="HND")
    assert c.layer("k", 0).shape == (3, 4, 16, 96)
    assert c.nhd_view("k", 0).shape == (3, 16, 4, 96)
    assert (c.page_size, c.num_heads, c.num_token_slots) == (16, 4, 48)


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
    ({"k": [_t(4, 16)]}, "NHD", ValueError, "expected 3 or 4 dims, got shape (4, 16)"),
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
