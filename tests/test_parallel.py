"""Parallel coordinates and the split arithmetic (`cpkv.parallel`), against brute force."""

import itertools

import pytest

from cpkv.cp import page_share, zigzag_split
from cpkv.parallel import (
    LAYER_GROUP_BYTES,
    ParallelRank,
    ParallelSizes,
    balanced_split,
    dcp_heads_of,
    dcp_rank_of,
    head_shard,
    heads_of,
    is_first_holder,
    layer_groups,
    layers_of,
)


def test_balanced_split_covers_in_order_and_balances():
    for n, parts in itertools.product(range(0, 23), range(1, 8)):
        got = [balanced_split(n, parts, i) for i in range(parts)]
        assert [x for r in got for x in r] == list(range(n))
        assert max(map(len, got)) - min(map(len, got)) <= 1
        assert sorted(map(len, got), reverse=True) == list(map(len, got))  # longer ones first


def test_page_shares_and_pp_stages_are_the_balanced_split():
    for n, parts in itertools.product(range(1, 20), range(1, 6)):
        for i in range(parts):
            assert page_share(n, parts, i) == balanced_split(n, parts, i)
            if n >= parts:
                assert layers_of(i, parts, n) == balanced_split(n, parts, i)


def test_zigzag_blocks_are_the_balanced_split():
    # zigzag cuts L tokens into 2*cp blocks, the first L % 2cp one longer: the balanced split
    for n, cp in ((10, 2), (17, 3), (33, 4)):
        plan = zigzag_split(n, cp)
        for r in range(cp):
            want = [*balanced_split(n, 2 * cp, r), *balanced_split(n, 2 * cp, 2 * cp - 1 - r)]
            assert plan.positions[r].tolist() == want


@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_heads_shards_and_first_holders(heads, tp):
    held = [heads_of(t, tp, heads) for t in range(tp)]
    assert sorted({h for r in held for h in r}) == list(range(heads))  # every head held
    shards = [head_shard(t, tp, heads) for t in range(tp)]
    for a, b in itertools.combinations(range(tp), 2):  # equal shard <=> equal heads
        assert (shards[a] == shards[b]) == (held[a] == held[b])
    first = [is_first_holder(t, tp, heads) for t in range(tp)]
    for t in range(tp):
        assert first[t] == (t == min(u for u in range(tp) if held[u] == held[t]))


def vllm_dcp_groups(tp: int, pcp: int, dcp: int) -> list[list[int]]:
    """DCP groups of one TP x PCP block as vLLM 0.32 builds them (global rank pcp_rank*tp +
    tp_rank; vllm/distributed/parallel_state.py transposes to (tp, pcp), PCP fastest, before
    cutting runs of dcp); with pcp 1 they are runs of consecutive TP ranks, as in vLLM 0.21 and
    SGLang 0.5.23."""
    order = [p * tp + t for t in range(tp) for p in range(pcp)]
    return [order[i:i + dcp] for i in range(0, len(order), dcp)]


@pytest.mark.parametrize("tp,pcp,dcp", [(1, 1, 1), (4, 1, 2), (8, 1, 8), (8, 1, 4), (2, 2, 2),
                                        (2, 2, 4), (1, 4, 4), (4, 2, 8)])
def test_dcp_rank_follows_the_runners_groups(tp, pcp, dcp):
    for group in vllm_dcp_groups(tp, pcp, dcp):
        for i, g in enumerate(group):
            assert dcp_rank_of(g % tp, dcp, pcp_size=pcp, pcp_rank=g // tp) == i


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_dcp_heads(tp, heads):
    for dcp in (d for d in (1, 2, 4, 8, 16) if tp % d == 0):
        groups = tp // dcp
        if max(groups, heads) % min(groups, heads):
            continue
        held = [dcp_heads_of(t, tp, dcp, heads) for t in range(tp)]
        for t in range(tp):  # one DCP group, one set of heads
            assert held[t] == held[t - t % dcp]
        assert sorted({h for r in held for h in r}) == list(range(heads))
        # SGLang: each rank holds max(1, H // (tp // dcp)) heads (model_config.get_num_kv_heads)
        assert {len(r) for r in held} == {max(1, heads // groups)}
        # vLLM (GQA needs tp > H and dcp <= tp / H; MLA's one head always): its plain-TP heads,
        # tp_rank // (tp / H) (QKVParallelLinear's replicas)
        if dcp == 1 or heads == 1 or (tp > heads and dcp <= tp // heads):
            assert held == [heads_of(t, tp, heads) for t in range(tp)]


def test_dcp_heads_refuse_groups_that_mix_heads():
    # tp 12, H 2, dcp 4: plain TP puts heads 0 and 1 in DCP group [4, 8)
    assert heads_of(5, 12, 2) != heads_of(6, 12, 2)
    with pytest.raises(ValueError, match="dcp size 4 at tp 12: expected a number of DCP groups "
                                         "that divides or is a multiple of num_kv_heads 2"):
        dcp_heads_of(5, 12, 4, 2)
    with pytest.raises(ValueError, match="dcp size: expected a divisor of tp 4, got 3"):
        dcp_heads_of(0, 4, 3, 1)
    with pytest.raises(ValueError, match=r"pcp rank: expected an int in \[0, 2\), got 2"):
        dcp_rank_of(0, 2, pcp_size=2, pcp_rank=2)
    with pytest.raises(ValueError, match="dcp size: expected a positive int, got 0"):
        dcp_rank_of(0, 0)


def test_layer_groups_cover_and_reach_the_minimum():
    for n, layer_nbytes, minimum in itertools.product((1, 3, 32, 61), (1, 1000, 3 << 20),
                                                      (1, 4096, 16 << 20)):
        groups = layer_groups(n, layer_nbytes, minimum)
        assert [x for g in groups for x in g] == list(range(n))
        for g in groups[:-1]:
            assert len(g) * layer_nbytes >= minimum and (len(g) - 1) * layer_nbytes < minimum
    assert layer_groups(range(5, 9), 1, 2) == [range(5, 7), range(7, 9)]
    assert layer_groups(0, 100) == []


def test_layer_groups_match_the_sender_and_the_gather():
    """The sender and the CP gather cut layers with `layer_groups` and one constant."""
    from cpkv.cp import gather
    from cpkv.shapes import SHAPES
    from cpkv.transfer import sender

    assert not hasattr(sender, "layer_groups") or sender.layer_groups is layer_groups

    cache = SHAPES["A"].cache(num_pages=2, page_size=16, num_layers=6)
    plan = zigzag_split(4096, 2)
    per_layer = 2 * cache.packed_nbytes(plan.padded_len, layers=(0, 1))
    for layers in (None, (1, 5)):
        got = [chunk for chunk, _ in gather.gather_chunks(cache, plan, layers=layers)]
        r = range(6) if layers is None else range(*layers)
        assert got == layer_groups(r, per_layer, gather.GATHER_CHUNK_BYTES)
    assert sender.PIPELINE_CHUNK_BYTES == gather.GATHER_CHUNK_BYTES == LAYER_GROUP_BYTES


def test_rank_and_sizes():
    r = ParallelRank(dp=1, cp=2, tp=3, pp=0)
    assert r.key == "dp1.cp2.tp3.pp0" and repr(r) == "ParallelRank(dp1.cp2.tp3.pp0)"
    assert r == ParallelRank(1, 2, 3, 0) and len({r, ParallelRank(1, 2, 3, 0)}) == 1
    sizes = ParallelSizes(dp=2, cp=3, tp=4)
    assert len(sizes.ranks()) == 24 and len(set(sizes.ranks())) == 24
    for rank in sizes.ranks():
        sizes.check(rank)


@pytest.mark.parametrize("make,exc,message", [
    (lambda: ParallelRank(cp=-1), ValueError, "cp: expected a non-negative int, got -1"),
    (lambda: ParallelRank(tp=True), ValueError, "tp: expected a non-negative int, got True"),
    (lambda: ParallelSizes(tp=0), ValueError, "tp: expected a positive int, got 0"),
    (lambda: ParallelSizes(pp=1.0), ValueError, "pp: expected a positive int, got 1.0"),
    (lambda: ParallelSizes(cp=2).check(ParallelRank(cp=2)), ValueError,
     "cp: expected 0 <= rank < size, got rank 2, size 2"),
    (lambda: ParallelSizes().check((0, 0)), TypeError, "rank: expected a ParallelRank, got tuple"),
    (lambda: heads_of(0, 3, 8), ValueError, "num_kv_heads 8 is not divisible by tp 3"),
    (lambda: heads_of(0, 6, 4), ValueError, "tp 6 is not a multiple of num_kv_heads 4"),
    (lambda: heads_of(0, 1, 0), ValueError, "num_kv_heads: expected >= 1, got 0"),
    (lambda: layers_of(0, 4, 3), ValueError, "num_layers 3 is fewer than pp 4 stages"),
])
def test_bad_input(make, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
