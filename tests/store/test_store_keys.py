"""Store keys against a first-principles model of which bytes each rank holds (no master)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cpkv.cp.partition import page_share
from cpkv.layout import ComponentSpec, PackedFormat
from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.store import is_store_writer, page_hashes, page_keys

LAYOUTS = [  # kind, total KV heads, tp, pp, cp
    ("mha", 4, 1, 1, 2), ("mha", 4, 2, 2, 2), ("mha", 4, 4, 3, 3), ("mha", 2, 8, 1, 2),
    ("mha", 1, 2, 2, 1), ("mla", 1, 2, 2, 2), ("mla", 1, 4, 1, 3), ("mla", 1, 1, 4, 1),
]


def held_bytes(kind, heads, tp_rank, tp_size, pp_rank):
    """What a rank holds after the CP all-gather: its stage's layers and its KV heads."""
    if kind == "mla":
        return pp_rank, "latent"  # the latent is replicated over TP
    if tp_size <= heads:
        per = heads // tp_size
        return pp_rank, tuple(range(tp_rank * per, (tp_rank + 1) * per))
    return pp_rank, (tp_rank * heads // tp_size,)  # TP > heads: replicas of one head


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
def test_keys_follow_the_bytes(layout):
    kind, heads, tp, pp, cp = layout
    tokens = list(range(7 * 4 + 3))
    n_pages = 7
    sizes = ParallelSizes(tp=tp, pp=pp, cp=cp)
    ranks = [ParallelRank(tp=t, pp=p, cp=c)
             for t, p, c in itertools.product(range(tp), range(pp), range(cp))]
    keys = {r: page_keys(tokens, fmt(4), r, sizes, model="m", kind=kind, num_kv_heads=heads)
            for r in ranks}
    held = {r: held_bytes(kind, heads, r.tp, tp, r.pp) for r in ranks}
    for r in ranks:
        assert len(keys[r]) == n_pages
        assert all("/cp" not in k for k in keys[r])
    for a, b in itertools.combinations(ranks, 2):  # same key <=> same bytes
        assert (keys[a] == keys[b]) == (held[a] == held[b]), (a, b)
        assert not set(keys[a]) & set(keys[b]) or keys[a] == keys[b]
    for i in range(n_pages):  # every distinct byte set of every page: written exactly once
        for h in set(held.values()):
            writers = [r for r in ranks if held[r] == h and
                       is_store_writer(r, sizes, kind=kind, num_kv_heads=heads) and
                       i in page_share(n_pages, cp, r.cp)]
            assert len(writers) == 1, (i, h, writers)
    for c in range(cp):  # CP ranks split the writes: each writes its balanced share
        mine = [r for r in ranks if r.cp == c and r.tp == 0 and r.pp == 0]
        assert is_store_writer(mine[0], sizes, kind=kind, num_kv_heads=heads)


def fmt(page_size: int, heads: int = 1, head_dim: int = 8, dtype=torch.bfloat16,
        layers: int = 2) -> PackedFormat:
    """A store value's geometry: one page of ``page_size`` tokens of a K/V pool."""
    return PackedFormat(page_size, layers, (ComponentSpec("k", heads, head_dim, dtype),
                                            ComponentSpec("v", heads, head_dim, dtype)))


def test_hash_chain_names_prefixes():
    a = list(range(100, 164))  # 4 pages of 16
    b = a[:40] + [7] + a[41:]  # differs in page 2
    ha, hb = page_hashes(a, fmt(16), "m"), page_hashes(b, fmt(16), "m")
    assert ha[:2] == hb[:2] and all(x != y for x, y in zip(ha[2:], hb[2:], strict=True))
    assert page_hashes(a + [1, 2, 3], fmt(16), "m") == ha  # a partial tail page has no key
    assert page_hashes(a[:15], fmt(16), "m") == []
    assert page_hashes(a, fmt(8), "m")[1] != ha[0]  # another store page size never collides
    assert page_hashes(a, fmt(16), "other")[0] != ha[0]  # nor another model
    for other in (fmt(16, heads=2, head_dim=4), fmt(16, dtype=torch.float16),
                  fmt(16, heads=2, layers=1)):  # nor another geometry of the same byte size
        assert other.nbytes == fmt(16).nbytes and page_hashes(a, other, "m")[0] != ha[0]
    c = a[16:32] + a[:16] + a[32:]  # the same pages in another order: different prefixes
    assert page_hashes(c, fmt(16), "m")[1] != ha[1]
    assert len(set(ha)) == 4


def test_key_inputs_validated():
    with pytest.raises(ValueError, match="token"):
        page_hashes([1, 2], fmt(0), "m")
    with pytest.raises(TypeError, match="fmt"):
        page_hashes([1, 2], 16, "m")
    with pytest.raises(TypeError, match="token_ids"):
        page_hashes([1.5], fmt(1), "m")
    with pytest.raises(ValueError, match="model"):
        page_hashes([1], fmt(1), "")
    with pytest.raises(ValueError, match="model"):
        page_hashes([1], fmt(1), "a/b")
    with pytest.raises(ValueError, match="not divisible"):
        page_keys([1], fmt(1), ParallelRank(), ParallelSizes(tp=3), model="m", num_kv_heads=4)
    with pytest.raises(TypeError, match="rank"):
        page_keys([1], fmt(1), (0, 1), model="m")
    with pytest.raises(TypeError, match="sizes"):
        page_keys([1], fmt(1), ParallelRank(), (1, 1), model="m")
    with pytest.raises(ValueError, match="tp: expected 0 <= rank < size"):
        page_keys([1], fmt(1), ParallelRank(tp=2), ParallelSizes(tp=2), model="m")


def test_store_api():
    import cpkv.store

    assert sorted(cpkv.store.__all__) == ["KVStore", "LoadResult", "MasterError", "MasterProcess",
                                          "PrefixLoad", "PutResult", "StoreError",
                                          "find_master_binary", "is_store_writer",
                                          "page_hashes", "page_keys", "plan_layer_groups",
                                          "value_geometry"]
    assert all(hasattr(cpkv.store, n) for n in cpkv.store.__all__)
