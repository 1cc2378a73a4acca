"""reorganize_pages: a CP all-gather written into the pool in sequence order, vs an oracle."""

import pytest
import torch
from kvtest import (
    assert_cache_equals,
    copy_back,
    disjoint_page_lists,
    fill_sentinel,
    full_kv,
    gathered_oracle,
    kernel_device,
    make_cache,
    mha,
    mla,
    oracle_sequence_pool,
    pool_on,
    snapshot,
    three,
)

from cpkv.cp import interleave_split, split_token_map, zigzag_split
from cpkv.kernels import reorganize_pages

SPLITS = {"zigzag": zigzag_split, "interleave": interleave_split}
KINDS = {"mha": mha, "mla": mla, "three": three}


def run(kind, split, seq_lens, cp, page_size, backend, *, layout="NHD", layers=None,
        num_layers=2):
    specs = KINDS[kind]()
    plan = SPLITS[split](seq_lens, cp)
    lr = range(num_layers) if layers is None else range(*layers)
    need = sum(-(-n // page_size) for n in plan.seq_lens)
    cache = fill_sentinel(make_cache(specs, num_layers=num_layers, num_pages=need + 3,
                                     page_size=page_size, layout=layout))
    pages = disjoint_page_lists(cache.num_pages, plan.seq_lens, page_size)
    full = full_kv(specs, len(lr), plan.total_len)
    want = oracle_sequence_pool(cache, full, plan.seq_lens, pages, lr)
    gathered = gathered_oracle(cache, full, plan, lr)
    ids = pages[0] if len(pages) == 1 else pages
    all_ids, token_map = split_token_map(plan, cache, ids)
    dev = kernel_device(backend)
    moved = pool_on(cache, dev)
    reorganize_pages(gathered.to(dev), moved, all_ids.to(dev), token_map.to(dev),
                     rows_per_rank=plan.padded_len, layers=layers, backend=backend)
    copy_back(moved, cache)
    assert_cache_equals(cache, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("cp", [2, 3])
def test_reorganize_matches_oracle(cp, split, kind, page_size, backend):
    run(kind, split, 37, cp, page_size, backend)  # uneven: padding on some ranks


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["batch", "hnd", "layer-range", "one-layer", "page64"])
def test_reorganize_awkward(case, backend):
    if case == "batch":
        run("mha", "zigzag", [9, 20, 13], 2, 16, backend)
    elif case == "hnd":
        run("mha", "interleave", [11, 6], 3, 4, backend, layout="HND")
    elif case == "layer-range":
        run("mla", "zigzag", 25, 2, 16, backend, layers=(1, 3), num_layers=3)
    elif case == "one-layer":
        run("three", "interleave", 23, 3, 1, backend, layers=(1, 2), num_layers=3)
    else:
        run("mha", "zigzag", [70, 5], 2, 64, backend)


def test_split_token_map_rejects_bad_page_lists():
    plan = zigzag_split([10, 6], 2)
    cache = make_cache(mha(), num_layers=2, num_pages=6, page_size=4)
    ok = disjoint_page_lists(6, plan.seq_lens, 4)
    cases = [
        (ok[:1], "expected one id tensor per sequence (2), got 1"),
        ([ok[0], ok[1][:1]], "a sequence of 6 tokens needs 2 pages of 4"),
        ([ok[0], torch.tensor([5, 6])], "page_ids[1]: expected values in [0, 6), got min 5"),
    ]
    for ids, message in cases:
        with pytest.raises(ValueError) as info:
            split_token_map(plan, cache, ids)
        assert message in str(info.value)


def test_reorganize_rejects_bad_input():
    plan = zigzag_split([10, 6], 2)
    cache = make_cache(mha(), num_layers=2, num_pages=6, page_size=4)
    ok = disjoint_page_lists(6, plan.seq_lens, 4)
    ids, tmap = split_token_map(plan, cache, ok)
    rpr = plan.padded_len
    gathered = torch.zeros(2 * cache.packed_nbytes(rpr), dtype=torch.uint8)
    before = snapshot(cache)
    bad_map = tmap.clone()
    bad_map[0] = 2 * rpr
    cases = [
        (gathered, torch.cat([ok[0], ok[0][:2]]), tmap, ValueError, "distinct page ids"),
        (gathered, ids[:2], tmap, ValueError, f"{tmap.numel()} tokens need"),
        (gathered, ids, bad_map, ValueError, f"expected values in [-1, {2 * rpr})"),
        (gathered, ids, tmap.int(), TypeError, "token_map: expected an int64 tensor"),
        (gathered, ids, tmap[::2], ValueError, "token_map: expected a contiguous 1-D"),
        (gathered[:-8], ids, tmap, ValueError, "expected a whole number of regions"),
        (gathered.view(torch.int16), ids, tmap, TypeError, "expected dtype torch.uint8"),
    ]
    for buf, pids, m, exc, message in cases:
        with pytest.raises(exc) as info:
            reorganize_pages(buf, cache, pids, m, rows_per_rank=rpr)
        assert message in str(info.value)
    assert_cache_equals(cache, before)
