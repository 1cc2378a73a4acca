"""Storage keys: equal keys exactly where ranks hold equal bytes; one writer per key."""

import itertools

import pytest

from cpkv.cp.keys import RankCoords, is_key_writer, storage_key


def held_bytes(kind, num_kv_heads, c, cp_replicated):
    """What a rank holds for one page, from first principles (not from the key scheme)."""
    layers = c.pp_rank  # each stage its own layers
    if kind == "mla" or c.tp_size == 1:
        heads = tuple(range(num_kv_heads))
    elif c.tp_size <= num_kv_heads:
        per = num_kv_heads // c.tp_size
        heads = tuple(range(c.tp_rank * per, (c.tp_rank + 1) * per))
    else:
        heads = (c.tp_rank * num_kv_heads // c.tp_size,)
    tokens = "all" if cp_replicated else c.cp_rank
    return (layers, heads, tokens)


CONFIGS = [(kind, heads, tp, pp, cp, repl)
           for kind, heads in (("mha", 8), ("mha", 2), ("mla", 1))
           for tp, pp, cp in itertools.product((1, 2, 4, 8), (1, 2), (1, 2, 3))
           for repl in (True, False)
           if kind == "mla" or tp <= heads or tp % heads == 0]


@pytest.mark.parametrize("kind,heads,tp,pp,cp,repl", CONFIGS)
def test_keys_match_bytes_and_one_writer(kind, heads, tp, pp, cp, repl):
    by_key, by_bytes = {}, {}
    for t, p, c in itertools.product(range(tp), range(pp), range(cp)):
        coords = RankCoords(t, tp, p, pp, c, cp)
        key = storage_key("m", "h0", coords, kind=kind, num_kv_heads=heads, cp_replicated=repl)
        held = held_bytes(kind, heads, coords, repl)
        by_key.setdefault(key, set()).add(held)
        by_bytes.setdefault(held, set()).add(key)
        writer = is_key_writer(coords, kind=kind, num_kv_heads=heads, cp_replicated=repl)
        by_key.setdefault(("writers", key), []).append(writer)
    for key, held in by_key.items():
        if isinstance(key, tuple):
            assert sum(held) == 1, f"{key[1]}: {sum(held)} writers"
        else:
            assert len(held) == 1, f"key {key} names different bytes {held}"
    assert all(len(keys) == 1 for keys in by_bytes.values()), "equal bytes, several keys"


def test_key_examples():
    mla = RankCoords(tp_rank=3, tp_size=4, cp_rank=1, cp_size=2)
    assert storage_key("ds3", "abc", mla, kind="mla") == "ds3/abc"
    assert not is_key_writer(mla, kind="mla")
    gqa = RankCoords(tp_rank=3, tp_size=4, pp_rank=1, pp_size=2, cp_rank=1, cp_size=2)
    assert storage_key("l70", "abc", gqa, num_kv_heads=2) == "l70/abc/pp1/tp1"
    assert storage_key("l70", "abc", gqa, num_kv_heads=2, cp_replicated=False) == \
        "l70/abc/pp1/tp1/cp1"


def test_key_rejects_bad_layouts():
    with pytest.raises(ValueError, match="tp: expected 0 <= rank < size, got rank 4, size 4"):
        RankCoords(tp_rank=4, tp_size=4)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads 4"):
        storage_key("m", "h", RankCoords(0, 6), num_kv_heads=4)
    with pytest.raises(ValueError, match="kind: expected 'mha' or 'mla', got 'gqa'"):
        storage_key("m", "h", RankCoords(), kind="gqa")
