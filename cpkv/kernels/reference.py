"""Pure-torch pack/unpack with the same semantics as the Triton kernels.

The oracle beside the kernels, and the production path for CPU tensors. Bytes move through
integer views of the pool (the widest word that divides every row and stride, see `words`), so
every dtype round-trips bit for bit and element-wise copies move 8 bytes at a time.

Per (layer, component) block, the cheapest form that the pool's strides allow:
  * pages: each page is one contiguous run (no head slice, NHD), so whole pages move as 2-D rows
    with one ``index_select`` / ``index_copy_`` and the partial last page with one slice copy
    (2-D rows gather ~1.35x faster than [tokens, heads, row] on the CPU);
  * tokens: page and slot axes merge, so tokens move as rows of ``[num_pages * page_size]``;
  * otherwise advanced indexing over (page, slot).
"""

from __future__ import annotations

import torch

from ..layout import PagedKVCache
from .words import WORD_DTYPES, word_bytes

__all__ = ["pack_pages_torch", "reorganize_torch", "token_slots", "unpack_pages_torch"]


def token_slots(page_ids: torch.Tensor, num_tokens: int, page_size: int):
    """(page, slot) of request-local tokens [0, num_tokens), as int64 tensors."""
    t = torch.arange(num_tokens, device=page_ids.device)
    pages = page_ids.to(torch.int64)[t // page_size]
    return pages, t % page_size


def _page_rows(pool: torch.Tensor) -> torch.Tensor | None:
    """[P, ps, nh, row] -> [P, ps * nh * row] when every page is one contiguous run."""
    p, ps, nh, row = pool.shape
    if (nh > 1 and pool.stride(2) != row) or (ps > 1 and pool.stride(1) != nh * row):
        return None
    return pool.as_strided((p, ps * nh * row), (pool.stride(0), 1))


def _token_rows(pool: torch.Tensor) -> torch.Tensor | None:
    """[P, ps, nh, row] -> [P * ps, nh, row] when page and slot axes merge."""
    if pool.stride(0) != pool.shape[1] * pool.stride(1):
        return None
    return pool.as_strided((pool.shape[0] * pool.shape[1], *pool.shape[2:]),
                           (pool.stride(1), *pool.stride()[2:]))


def _blocks(cache: PagedKVCache, packed: torch.Tensor, num_tokens: int, layers: range,
            heads: range):
    """Yield (pool [P, ps, nh, row_words], packed block [T, nh, row_words]) in format order."""
    word = word_bytes(cache, layers, heads, packed)
    words = packed.view(WORD_DTYPES[word])
    pos = 0
    for layer in layers:
        for spec in cache.components:
            pool = cache.nhd_view(spec.name, layer)[:, :, heads.start:heads.stop]
            pool = pool.view(torch.uint8).view(WORD_DTYPES[word])
            row = spec.head_nbytes // word
            n = num_tokens * len(heads) * row
            yield pool, words[pos:pos + n].view(num_tokens, len(heads), row)
            pos += n


def _copy(cache: PagedKVCache, packed: torch.Tensor, page_ids: torch.Tensor, num_tokens: int,
          layers: range, heads: range, *, unpack: bool) -> None:
    ps = cache.page_size
    ids = page_ids.to(torch.int64)
    full, tail = divmod(num_tokens, ps)
    flat_idx = None
    for pool, block in _blocks(cache, packed, num_tokens, layers, heads):
        pages = _page_rows(pool)
        if pages is not None:
            whole = block[:full * ps].reshape(full, pages.shape[1])
            tail_ids, tail_rows = ids[full:full + 1], block[full * ps:].unsqueeze(0)
            if unpack:
                pages.index_copy_(0, ids[:full], whole)
                if tail:
                    pool[tail_ids, :tail] = tail_rows
            else:
                torch.index_select(pages, 0, ids[:full], out=whole)
                if tail:
                    tail_rows.copy_(pool[tail_ids, :tail])
            continue
        if flat_idx is None:
            p, s = token_slots(page_ids, num_tokens, ps)
            flat_idx = p * ps + s
        if unpack:
            _scatter_tokens(pool, flat_idx, block)
        else:
            tokens = _token_rows(pool)
            if tokens is not None:
                torch.index_select(tokens, 0, flat_idx, out=block)
            else:
                block.copy_(pool[flat_idx // pool.shape[1], flat_idx % pool.shape[1]])


def _scatter_tokens(pool: torch.Tensor, flat_idx: torch.Tensor, rows: torch.Tensor) -> None:
    """pool token (page * ps + slot) flat_idx[i] <- rows[i]."""
    tokens = _token_rows(pool)
    if tokens is not None:
        tokens.index_copy_(0, flat_idx, rows)
    else:
        ps = pool.shape[1]
        pool[flat_idx // ps, flat_idx % ps] = rows


def pack_pages_torch(cache: PagedKVCache, page_ids: torch.Tensor, num_tokens: int,
                     layers: range, heads: range, out: torch.Tensor) -> None:
    """Gather into ``out`` (uint8, exactly the packed size). Inputs are trusted."""
    _copy(cache, out, page_ids, num_tokens, layers, heads, unpack=False)


def unpack_pages_torch(packed: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                       num_tokens: int, layers: range, heads: range) -> None:
    """Scatter ``packed`` (uint8, exactly the packed size) into ``cache``. Inputs are trusted."""
    _copy(cache, packed, page_ids, num_tokens, layers, heads, unpack=True)


def reorganize_torch(gathered: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                     token_map: torch.Tensor, layers: range, rows_per_rank: int) -> None:
    """Request-local token t <- gathered row token_map[t] (skipped where < 0). Inputs are
    trusted; see `cpkv.kernels.reorganize_pages` for the layout of ``gathered``."""
    ps = cache.page_size
    tokens = torch.nonzero(token_map >= 0).flatten()
    rows = token_map[tokens]
    pages, slots = token_slots(page_ids, token_map.numel(), ps)
    flat_idx = (pages * ps + slots)[tokens]
    regions = gathered.view(-1, cache.packed_nbytes(rows_per_rank, layers=layers))
    heads = range(cache.num_heads)
    for r, region in enumerate(regions):
        mine = (rows >= r * rows_per_rank) & (rows < (r + 1) * rows_per_rank)
        local, dst = rows[mine] - r * rows_per_rank, flat_idx[mine]
        if not local.numel():
            continue
        # A region's rows usually land in order from row 0 (a split's local order): slice then.
        prefix = bool(torch.equal(local, torch.arange(local.numel(), device=local.device)))
        for pool, block in _blocks(cache, region, rows_per_rank, layers, heads):
            _scatter_tokens(pool, dst, block[:local.numel()] if prefix else block[local])
