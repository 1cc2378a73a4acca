"""The word width both copy paths move bytes in, and the per-pool memo the kernels keep.

Bytes move as same-width integers, never as floats (bit-exact for fp8/bf16 and NaN payloads),
and as wide ones: one 8-byte word costs the same as one byte in an element-wise copy.
"""

from __future__ import annotations

import weakref

import torch

from ..layout import PagedKVCache

WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> {key: value}


def pool_memo(cache: PagedKVCache) -> dict:
    """What the kernels derive once per pool (word widths, launch tables, byte spans): a pool's
    tensors never move, and the entry dies with the pool (a weak key)."""
    memo = _POOLS.get(cache)
    if memo is None:
        memo = _POOLS.setdefault(cache, {})
    return memo


def widest_word(quantities, cap: int = 8) -> int:
    """The widest power of two, at most ``cap`` bytes, dividing every quantity (addresses,
    strides, row and offset sizes in bytes): the word (or aligned access) they all allow."""
    w = cap
    for q in quantities:
        while q % w:
            w //= 2
    return w


def word_bytes(cache: PagedKVCache, layers: range, heads: range, buffer: torch.Tensor) -> int:
    """Widest word (8/4/2/1 bytes) dividing every head row, stride and base address involved."""
    memo = pool_memo(cache)
    key = ("word", layers.start, layers.stop, heads.start, heads.stop)
    pool_word = memo.get(key)
    if pool_word is None:  # the pool never moves: walk its layer tensors once
        quantities = []
        for spec in cache.components:
            quantities.append(spec.head_nbytes)
            for layer in layers:
                t = cache.nhd_view(spec.name, layer)
                quantities.append(t.data_ptr() + heads.start * t.stride(2) * spec.itemsize)
                quantities.extend(s * spec.itemsize for s in t.stride()[:3])
        pool_word = widest_word(quantities)
        memo[key] = pool_word
    return widest_word([pool_word, buffer.data_ptr()])
