"""The word width both copy paths move bytes in.

Bytes move as same-width integers, never as floats (bit-exact for fp8/bf16 and NaN payloads),
and as wide ones: one 8-byte word costs the same as one byte in an element-wise copy.
"""

from __future__ import annotations

import torch

from ..layout import PagedKVCache

WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def word_bytes(cache: PagedKVCache, layers: range, heads: range, buffer: torch.Tensor) -> int:
    """Widest word (8/4/2/1 bytes) dividing every head row, stride and base address involved."""
    key = ("word", layers.start, layers.stop, heads.start, heads.stop)
    pool_word = cache._kernel_tables.get(key)
    if pool_word is None:  # the pool never moves: walk its layer tensors once
        quantities = []
        for spec in cache.components:
            quantities.append(spec.head_nbytes)
            for layer in layers:
                t = cache.nhd_view(spec.name, layer)
                quantities.append(t.data_ptr() + heads.start * t.stride(2) * spec.itemsize)
                quantities.extend(s * spec.itemsize for s in t.stride()[:3])
        pool_word = _widest(quantities)
        cache._kernel_tables[key] = pool_word
    return _widest([pool_word, buffer.data_ptr()])


def _widest(quantities) -> int:
    for w in (8, 4, 2):
        if all(q % w == 0 for q in quantities):
            return w
    return 1
