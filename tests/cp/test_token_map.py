"""split_token_map: token offsets, host id forms, and the per-(plan, ids, offset) cache."""

import numpy as np
import pytest
import torch
from kvtest import mha

from cpkv import PagedKVCache
from cpkv.cp import GatherDone, split_token_map, zigzag_split


def _cache(page_size=4, num_pages=10):
    return PagedKVCache.empty(mha(), num_layers=1, num_pages=num_pages, page_size=page_size)


def test_offset_starts_the_map_mid_page():
    plan, cache = zigzag_split(6, 1), _cache()
    ids, tmap = split_token_map(plan, cache, torch.tensor([7, 2, 5]), token_offset=5)
    assert ids.tolist() == [7, 2, 5]
    assert tmap.tolist() == [-1] * 5 + list(range(6))  # tokens 0..4 (chunk 1) untouched
    plan2 = zigzag_split([4, 4], 2)
    _, tmap = split_token_map(plan2, cache, [[1, 2], [3, 4]], token_offset=[3, 1])
    got = tmap.tolist()
    assert got[:3] == [-1] * 3 and got[7:9] == [-1, -1]  # before each sequence's offset
    assert sorted(got[3:7] + got[9:13]) == sorted(plan2.gather_index.tolist())


@pytest.mark.parametrize("ids", [np.array([4, 1], dtype=np.int32), [4, 1], (4, 1),
                                 torch.tensor([4, 1])], ids=["numpy", "list", "tuple", "tensor"])
def test_host_id_forms(ids):
    ids_t, tmap = split_token_map(zigzag_split(8, 2), _cache(), ids)
    assert ids_t.tolist() == [4, 1] and ids_t.dtype in (torch.int32, torch.int64)
    assert tmap.numel() == 8


def test_map_is_built_once_per_plan_ids_and_offset():
    plan, cache = zigzag_split(8, 2), _cache()
    ids = torch.tensor([3, 6, 8])
    a = split_token_map(plan, cache, ids)
    b = split_token_map(plan, cache, ids)  # layer 2 of the same forward: no rebuild, no copy
    assert a[1] is b[1] and a[0] is b[0]
    c = split_token_map(plan, cache, ids, token_offset=1)
    assert c[1] is not a[1] and c[1].tolist()[0] == -1
    ids[0] = 4  # an in-place change of the ids invalidates
    d = split_token_map(plan, cache, ids)
    assert d[0].tolist() == [4, 6, 8] and d[1] is not a[1]
    arr = np.array([3, 6])
    assert split_token_map(plan, cache, arr)[1] is split_token_map(plan, cache, arr.copy())[1]
    other = zigzag_split(8, 2)  # an equal but distinct plan object is its own entry
    assert split_token_map(other, cache, ids)[1] is not d[1]


@pytest.mark.parametrize("kw,message", [
    (dict(token_offset=-1), "token_offset: expected a non-negative int"),
    (dict(token_offset=[1, 2]), "or one per sequence, 1"),
    (dict(token_offset=True), "token_offset: expected a non-negative int"),
    (dict(token_offset=3), "page_ids[0]: a sequence of 6 tokens after the 3 already there "
                           "needs 3 pages of 4, got 2"),
])
def test_bad_offsets(kw, message):
    with pytest.raises(ValueError) as info:
        split_token_map(zigzag_split(6, 1), _cache(), [1, 2], **kw)
    assert message in str(info.value)


def test_a_page_listed_twice_is_refused_once_when_the_map_is_built():
    plan, cache = zigzag_split([4, 4], 2), _cache()
    with pytest.raises(ValueError, match="expected distinct page ids"):
        split_token_map(plan, cache, [[1], [1]])
    ids, _ = split_token_map(plan, cache, [[1], [1]], validate=False)  # the caller's word
    assert ids.tolist() == [1, 1]


def test_gather_done_on_cpu_is_complete():
    done = GatherDone()
    assert done.query()
    done.wait()
    done.synchronize()
