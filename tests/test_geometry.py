"""The control plane's geometry is `PackedFormat`'s wire description: one description of a slot."""

import json

import pytest
import torch

from cpkv import ComponentSpec, PackedFormat, PagedKVCache
from cpkv.transfer.control import check_geometry, geometry


def pool(head_dim=64, dtype=torch.bfloat16, heads=4, layers=2, page_size=4, layout="NHD"):
    specs = [ComponentSpec("k", heads, head_dim, dtype), ComponentSpec("v", heads, head_dim,
                                                                       dtype)]
    return PagedKVCache.empty(specs, num_layers=layers, num_pages=3, page_size=page_size,
                              layout=layout)


def test_geometry_is_the_packed_format_on_the_wire():
    g = json.loads(json.dumps(geometry(pool())))  # what a peer reads back
    assert PackedFormat.from_dict(g["format"]) == pool().packed_format(1, layers=(0, 1),
                                                                       heads=(0, 1))
    assert (g["page_size"], g["num_heads"], g["num_layers"], g["layout"]) == (4, 4, 2, "NHD")


def test_head_layer_counts_and_layout_may_differ():
    check_geometry(geometry(pool()), geometry(pool(heads=2, layers=5, layout="HND")), "peer")


@pytest.mark.parametrize("theirs,message", [
    (geometry(pool(head_dim=96)), "components: packed format: component 'k' head_dim expected "
                                  "64, got 96"),
    (geometry(pool(dtype=torch.float16)), "component 'k' dtype expected torch.bfloat16, got "
                                          "torch.float16"),
    (geometry(pool(page_size=8)), "page_size is 4 here, 8 there"),
    ({**geometry(pool()), "format": {**geometry(pool())["format"], "version": 2}},
     "version is 1 here, 2 there"),
    ({"page_size": 4}, "'format'"),
    ({**geometry(pool()), "format": {**geometry(pool())["format"],
                                     "components": [["k", 1, 64, "nonsense"]]}},
     "unknown dtype 'nonsense'"),
])
def test_mismatch_names_the_field(theirs, message):
    with pytest.raises(ValueError, match="geometry mismatch with sender s: ") as e:
        check_geometry(geometry(pool()), theirs, "sender s")
    assert message in str(e.value)
