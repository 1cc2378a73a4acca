"""What agents tell each other about their pools is `PackedFormat`'s wire description (one
description of a slot), checked field by field by `check_peer`."""

import dataclasses
import json

import pytest
import torch

from cpkv import ComponentSpec, PagedKVCache
from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.transfer.endpoint import check_peer, identity, model_shape
from cpkv.transfer.protocol import Hello, Message, ProtocolError, decode, encode


def pool(head_dim=64, dtype=torch.bfloat16, heads=4, layers=2, page_size=4, layout="NHD"):
    specs = [ComponentSpec("k", heads, head_dim, dtype), ComponentSpec("v", heads, head_dim,
                                                                       dtype)]
    return PagedKVCache.empty(specs, num_layers=layers, num_pages=3, page_size=page_size,
                              layout=layout)


def hello(cache, tp=1, num_layers=None, **kw):
    rank, sizes = ParallelRank(), ParallelSizes(tp=tp)
    model = model_shape(cache, rank, sizes, "mha", cache.num_heads * tp, num_layers)
    return Hello(**identity(cache, "p", rank, sizes, model, "inc", "127.0.0.1:1"), **kw)


def test_the_unit_is_the_packed_format_on_the_wire():
    h = hello(pool())
    back = decode(json.dumps(json.loads(encode(h))).encode())  # what a peer reads back
    assert back == h
    assert back.unit == pool().packed_format(1, layers=(0, 1), heads=(0, 1))
    assert (back.page_size, back.num_heads, back.num_layers, back.layout) == (4, 4, 2, "NHD")


def test_page_size_head_layer_counts_and_layout_may_differ():
    # the same model (8 heads, 2 layers) held by TP 1 and TP 2 ranks, pages of 4 and 8
    check_peer(hello(pool(heads=8)), hello(pool(heads=4, page_size=8, layout="HND"), tp=2),
               "peer")


@pytest.mark.parametrize("theirs,message", [
    (hello(pool(head_dim=96)), "component 'k' head_dim expected 64, got 96"),
    (hello(pool(dtype=torch.float16)), "component 'k' dtype expected torch.bfloat16, got "
                                       "torch.float16"),
    (hello(pool(layers=3)), "serves another model"),
])
def test_mismatch_names_the_field(theirs, message):
    with pytest.raises(ProtocolError, match="sender s") as e:
        check_peer(hello(pool()), theirs, "sender s")
    assert message in str(e.value)


@pytest.mark.parametrize("field,value,message", [
    ("unit", {"version": 2}, "packed format: missing fields"),
    ("unit", {"version": 1, "num_tokens": 1, "num_layers": 1,
              "components": [["k", 1, 64, "nonsense"]]}, "unknown dtype 'nonsense'"),
    ("rank", [0, 0, -1, 0], "Hello.rank: expected an int in [0, 2**64), got -1"),
    ("sizes", [1, 0, 1, 1], "Hello.sizes: cp: expected a positive int, got 0"),
    ("page_size", True, "Hello.page_size: expected an int"),
    ("model", {"kind": "gqa", "num_kv_heads": 1, "num_layers": 1},
     "Hello.model: kind: expected 'mha'"),
    ("extra", 1, "unknown"),
])
def test_malformed_values_are_refused_by_name(field, value, message):
    wire = hello(pool()).to_wire()
    wire[field] = value
    with pytest.raises(ProtocolError) as e:
        Message.from_wire(wire)
    assert message in str(e.value), str(e.value)


def test_every_message_round_trips():
    h = hello(pool())
    for msg in (h, dataclasses.replace(h, instance="x" * 128)):
        assert Message.from_wire(json.loads(encode(msg))) == msg
