"""Storage keys: equal keys exactly where ranks hold equal bytes; one writer per key."""

import itertools

import pytest

from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.store.keys import is_key_writer, storage_key


def held_bytes(kind, num_kv_heads, r, s, cp_replicated):
    """What a rank holds for one page, from first principles (not from the key scheme)."""
    layers = r.pp  # each stage its own layers
    if kind == "mla" or s.tp == 1:
        heads = tuple(range(num_kv_heads))
    elif s.tp <= num_kv_heads:
        per = num_kv_heads // s.tp
        heads = tuple(range(r.tp * per, (r.tp + 1) * per))
    else:
        heads = (r.tp * num_kv_heads // s.tp,)
    tokens = "all" if cp_replicated else r.cp
    return (layers, heads, tokens)


CONFIGS = [(kind, heads, tp, pp, cp, repl)
           for kind, heads in (("mha", 8), ("mha", 2), ("mla", 1))
           for tp, pp, cp in itertools.product((1, 2, 4, 8), (1, 2), (1, 2, 3))
           for repl in (True, False)
           if kind == "mla" or tp <= heads or tp % heads == 0]


@pytest.mark.parametrize("kind,heads,tp,pp,cp,repl", CONFIGS)
def test_keys_match_bytes_and_one_writer(kind, heads, tp, pp, cp, repl):
    by_key, by_bytes = {}, {}
    sizes = ParallelSizes(tp=tp, pp=pp, cp=cp)
    for t, p, c in itertools.product(range(tp), range(pp), range(cp)):
        rank = ParallelRank(tp=t, pp=p, cp=c)
        key = storage_key("m", "h0", rank, sizes, kind=kind, num_kv_heads=heads,
                          cp_replicated=repl)
        held = held_bytes(kind, heads, rank, sizes, repl)
        by_key.setdefault(key, set()).add(held)
        by_bytes.setdefault(held, set()).add(key)
        writer = is_key_writer(rank, sizes, kind=kind, num_kv_heads=heads, cp_replicated=repl)
        by_key.setdefault(("writers", key), []).append(writer)
    for key, held in by_key.items():
        if isinstance(key, tuple):
            assert sum(held) == 1, f"{key[1]}: {sum(held)} writers"
        else:
            assert len(held) == 1, f"key {key} names different bytes {held}"
    assert all(len(keys) == 1 for keys in by_bytes.values()), "equal bytes, several keys"


def test_key_examples():
    mla = ParallelRank(tp=3, cp=1), ParallelSizes(tp=4, cp=2)
    assert storage_key("ds3", "abc", *mla, kind="mla") == "ds3/abc"
    assert not is_key_writer(*mla, kind="mla")
    gqa = ParallelRank(tp=3, pp=1, cp=1), ParallelSizes(tp=4, pp=2, cp=2)
    assert storage_key("l70", "abc", *gqa, num_kv_heads=2) == "l70/abc/pp1/tp1"
    assert storage_key("l70", "abc", *gqa, num_kv_heads=2, cp_replicated=False) == \
        "l70/abc/pp1/tp1/cp1"


def test_key_rejects_bad_layouts():
    with pytest.raises(ValueError, match="tp: expected 0 <= rank < size, got rank 4, size 4"):
        storage_key("m", "h", ParallelRank(tp=4), ParallelSizes(tp=4))
    with pytest.raises(ValueError, match="tp: expected 0 <= rank < size, got rank 4, size 4"):
        is_key_writer(ParallelRank(tp=4), ParallelSizes(tp=4))
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads 4"):
        storage_key("m", "h", ParallelRank(), ParallelSizes(tp=6), num_kv_heads=4)
    with pytest.raises(ValueError, match="kind: expected 'mha' or 'mla', got 'gqa'"):
        storage_key("m", "h", ParallelRank(), ParallelSizes(), kind="gqa")
    with pytest.raises(TypeError, match="rank: expected a ParallelRank, got tuple"):
        storage_key("m", "h", (0, 1), ParallelSizes())
