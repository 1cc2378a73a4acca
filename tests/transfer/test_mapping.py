"""Rank mapping against a brute-force, cell-by-cell assignment, and worked examples."""

import itertools

import pytest

from cpkv.parallel import ParallelSizes, heads_of, layers_of
from cpkv.transfer.mapping import map_ranks

SIZES = range(1, 9)


def holders(h, tp, num_heads):
    return [t for t in range(tp) if h in heads_of(t, tp, num_heads)]


def brute_force(p, d, num_heads, num_layers, kind):
    """(decode tp, decode pp, global head, global layer) -> (prefill tp, prefill pp)."""
    truth = {}
    for dt, dq in itertools.product(range(d.tp), range(d.pp)):
        heads = [0] if kind == "mla" else list(heads_of(dt, d.tp, num_heads))
        for h, layer in itertools.product(heads, layers_of(dq, d.pp, num_layers)):
            pt = dt % p.tp if kind == "mla" else holders(h, p.tp, num_heads)[0]
            pq = next(s for s in range(p.pp) if layer in layers_of(s, p.pp, num_layers))
            truth[(dt, dq, h, layer)] = (pt, pq)
    return truth


def from_routes(mapping, p, d, num_heads, num_layers, kind):
    got = {}
    for (dt, dq), routes in mapping.items():
        d_h0 = 0 if kind == "mla" else heads_of(dt, d.tp, num_heads).start
        d_l0 = layers_of(dq, d.pp, num_layers).start
        for r in routes:
            p_h0 = 0 if kind == "mla" else heads_of(r.tp, p.tp, num_heads).start
            p_l0 = layers_of(r.pp, p.pp, num_layers).start
            assert len(r.src_heads) == len(r.dst_heads) and len(r.src_layers) == len(
                r.dst_layers), r
            for sh, dh in zip(r.src_heads, r.dst_heads, strict=True):
                assert sh + p_h0 == dh + d_h0, (r, "head offsets disagree")
                for sl, dl in zip(r.src_layers, r.dst_layers, strict=True):
                    assert sl + p_l0 == dl + d_l0, (r, "layer offsets disagree")
                    cell = (dt, dq, dh + d_h0, dl + d_l0)
                    assert cell not in got, f"{cell} sent twice"
                    got[cell] = (r.tp, r.pp)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("kind,num_heads", [("mha", 8), ("mha", 2), ("mha", 1), ("mla", 1)])
def test_mapping_matches_brute_force_for_every_layout_up_to_8(kind, num_heads):
    checked = 0
    for ptp, dtp, ppp, dpp in itertools.product(SIZES, SIZES, SIZES, SIZES):
        ok = all(t <= num_heads and num_heads % t == 0 or t % num_heads == 0
                 for t in (ptp, dtp)) or kind == "mla"
        if not ok:
            continue
        p, d = ParallelSizes(tp=ptp, pp=ppp), ParallelSizes(tp=dtp, pp=dpp)
        m = map_ranks(p, d, num_kv_heads=num_heads, num_layers=24, kind=kind)
        assert from_routes(m, p, d, num_heads, 24, kind) == brute_force(p, d, num_heads, 24,
                                                                         kind)
        checked += 1
    assert checked > 100


def test_worked_examples():
    m = map_ranks(ParallelSizes(tp=2), ParallelSizes(tp=1), num_kv_heads=8, num_layers=4)
    assert [(r.tp, r.src_heads, r.dst_heads) for r in m[(0, 0)]] == [
        (0, range(0, 4), range(0, 4)), (1, range(0, 4), range(4, 8))]
    # tp 1 with 2 KV heads -> tp 4: decode ranks 0, 1 get head 0 and ranks 2, 3 head 1
    m = map_ranks(ParallelSizes(tp=1), ParallelSizes(tp=4), num_kv_heads=2, num_layers=4)
    assert [[(r.src_heads, r.dst_heads) for r in m[(t, 0)]] for t in range(4)] == [
        [(range(0, 1), range(0, 1))]] * 2 + [[(range(1, 2), range(0, 1))]] * 2
    # tp 4 with 2 KV heads -> tp 1: replicated heads are sent once, by ranks 0 and 2
    m = map_ranks(ParallelSizes(tp=4), ParallelSizes(tp=1), num_kv_heads=2, num_layers=4)
    assert [(r.tp, r.dst_heads) for r in m[(0, 0)]] == [(0, range(0, 1)), (2, range(1, 2))]
    # pp 2 -> pp 1: each stage its layers
    m = map_ranks(ParallelSizes(pp=2), ParallelSizes(pp=1), num_kv_heads=8, num_layers=5)
    assert [(r.pp, r.src_layers, r.dst_layers) for r in m[(0, 0)]] == [
        (0, range(0, 3), range(0, 3)), (1, range(0, 2), range(3, 5))]
    # MLA tp 2 -> tp 1: one sender
    m = map_ranks(ParallelSizes(tp=2), ParallelSizes(tp=1), num_kv_heads=1, num_layers=4,
                  kind="mla")
    assert [r.tp for r in m[(0, 0)]] == [0]
    assert [s.key for s in m[(0, 0)][0].senders(cp=2)] == ["dp0.cp0.tp0.pp0",
                                                            "dp0.cp1.tp0.pp0"]


@pytest.mark.parametrize("call,message", [
    (lambda: heads_of(0, 3, 8), "num_kv_heads 8 is not divisible by tp 3"),
    (lambda: heads_of(0, 6, 4), "tp 6 is not a multiple of num_kv_heads 4"),
    (lambda: layers_of(0, 4, 3), "num_layers 3 is fewer than pp 4 stages"),
    (lambda: ParallelSizes(tp=0), "tp: expected a positive int, got 0"),
    (lambda: map_ranks(ParallelSizes(), ParallelSizes(), num_kv_heads=1, num_layers=1, kind="gqa"),
     "kind: expected 'mha' or 'mla'"),
])
def test_bad_layouts(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
