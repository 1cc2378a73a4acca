"""What the kernels and the CP gather derive per pool (launch tables, word widths, byte spans,
token maps) lives in their own modules, keyed weakly by the pool: it never keeps a pool (and
its memory) alive, and the pool object carries nothing of theirs."""

import gc
import weakref

import torch

from cpkv import PagedKVCache
from cpkv.cp import split_token_map, zigzag_split
from cpkv.kernels import pack_pages, unpack_pages


def test_per_pool_memos_die_with_the_pool():
    cache = PagedKVCache.empty_mha(num_layers=2, num_pages=4, page_size=4, num_heads=2,
                                   head_dim=8, dtype=torch.bfloat16)
    before = set(vars(cache))
    ids = torch.tensor([2, 0])
    for backend in ("torch", "triton"):
        slot = pack_pages(cache, ids, num_tokens=6, backend=backend)
        unpack_pages(slot, cache, ids, num_tokens=6, backend=backend)
    split_token_map(zigzag_split(6, 2), cache, ids)
    assert set(vars(cache)) == before  # nothing of theirs written into the pool
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None, "a per-pool memo keeps the pool alive"
