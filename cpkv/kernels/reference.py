"""Pure-torch pack/unpack with the same semantics as the Triton kernels.

The oracle in tests, and the production path for CPU tensors. Bytes are moved through uint8
views of the pool, so every dtype (fp8 included) round-trips bit for bit.

Per (layer, component) it is one ``index_select`` straight into the packed block, or one
``index_copy_`` out of it, over the pool viewed as ``[num_pages * page_size, heads, row_bytes]``;
pools whose page and slot axes cannot be flattened into one (HND, odd strides) use advanced
indexing instead.
"""

from __future__ import annotations

import torch

from ..layout import PackedFormat, PagedKVCache

__all__ = ["pack_pages_torch", "unpack_pages_torch", "token_slots"]


def token_slots(page_ids: torch.Tensor, num_tokens: int, page_size: int):
    """(page, slot) of request-local tokens [0, num_tokens), as int64 tensors."""
    t = torch.arange(num_tokens, device=page_ids.device)
    pages = page_ids.to(torch.int64)[t // page_size]
    return pages, t % page_size


def _blocks(cache: PagedKVCache, fmt: PackedFormat, packed: torch.Tensor, layers: range,
            heads: range):
    """Yield (pool view [P, ps, nh, row_bytes] uint8, packed block [T, nh, row_bytes] uint8)."""
    offsets = iter(fmt.block_offsets())
    for layer in layers:
        for spec in cache.components:
            pool = cache.nhd_view(spec.name, layer)[:, :, heads.start:heads.stop].view(torch.uint8)
            off = next(offsets)
            nbytes = fmt.num_tokens * len(heads) * spec.head_nbytes
            block = packed[off:off + nbytes].view(fmt.num_tokens, len(heads), spec.head_nbytes)
            yield pool, block


def _flat_tokens(pool: torch.Tensor) -> torch.Tensor | None:
    """The pool as a [P * ps, nh, row] view when page and slot axes merge, else None."""
    if pool.stride(0) != pool.shape[1] * pool.stride(1):
        return None
    return pool.as_strided((pool.shape[0] * pool.shape[1], *pool.shape[2:]),
                           (pool.stride(1), *pool.stride()[2:]))


def pack_pages_torch(cache: PagedKVCache, page_ids: torch.Tensor, num_tokens: int,
                     layers: range, heads: range, out: torch.Tensor) -> None:
    """Gather into ``out`` (uint8, exactly the packed size). Inputs are trusted."""
    fmt = cache.packed_format(num_tokens, layers=layers, heads=heads)
    pages, slots = token_slots(page_ids, num_tokens, cache.page_size)
    flat_idx = pages * cache.page_size + slots
    for pool, block in _blocks(cache, fmt, out, layers, heads):
        flat = _flat_tokens(pool)
        if flat is not None:
            torch.index_select(flat, 0, flat_idx, out=block)
        else:
            block.copy_(pool[pages, slots])


def unpack_pages_torch(packed: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                       num_tokens: int, layers: range, heads: range) -> None:
    """Scatter ``packed`` (uint8, exactly the packed size) into ``cache``. Inputs are trusted."""
    fmt = cache.packed_format(num_tokens, layers=layers, heads=heads)
    pages, slots = token_slots(page_ids, num_tokens, cache.page_size)
    flat_idx = pages * cache.page_size + slots
    for pool, block in _blocks(cache, fmt, packed, layers, heads):
        flat = _flat_tokens(pool)
        if flat is not None:
            flat.index_copy_(0, flat_idx, block)
        else:
            pool[pages, slots] = block
