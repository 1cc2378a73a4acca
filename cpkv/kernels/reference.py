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

A slot cut into values (``region_tokens``) is seen as ``[values, rows, ...]`` strided views of
each block (`_blocks`): unpack scatters from them with one ``index_put_``; pack gathers into
them with one ``index_select`` per row position of a value when a value holds a few pages (no
temporary), else through a temporary of the block.
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


def _blocks(cache: PagedKVCache, packed: torch.Tensor, rows: int, n_regions: int,
            layers: range, heads: range):
    """Yield (pool [P, ps, nh, row_words], block [n_regions, rows, nh, row_words]) in format
    order: one (layer, component) block of every value, values of ``rows`` tokens back to back
    (one value: an uncut slot). Positions come from `PackedFormat`."""
    fmt = cache.packed_format(rows, layers=layers, heads=heads)
    word = word_bytes(cache, layers, heads, packed)  # divides every row, so the value stride
    words = packed.view(WORD_DTYPES[word])
    base, region = words.storage_offset(), fmt.region_nbytes // word
    for i, layer in enumerate(layers):
        for c, spec in enumerate(cache.components):
            pool = cache.nhd_view(spec.name, layer)[:, :, heads.start:heads.stop]
            pool = pool.view(torch.uint8).view(WORD_DTYPES[word])
            row = spec.head_nbytes // word
            offset = base + fmt.block(i, c).offset // word
            yield pool, words.as_strided((n_regions, rows, len(heads), row),
                                         (region, len(heads) * row, row, 1), offset)


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[v, j] <- src[idx[v, j]] for ``dst`` [values, k, ...] (values strided apart)."""
    n_values, k = idx.shape
    if n_values == 1:
        torch.index_select(src, 0, idx[0], out=dst[0])
    elif k <= 8:  # a few rows per value: straight into the strided view, no temporary
        for j in range(k):
            torch.index_select(src, 0, idx[:, j], out=dst[:, j])
    else:
        dst.copy_(torch.index_select(src, 0, idx.reshape(-1)).view(dst.shape))


def _scatter_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """dst[idx[v, j]] <- src[v, j] for ``src`` [values, k, ...] (values strided apart)."""
    if idx.shape[0] == 1:
        dst.index_copy_(0, idx[0], src[0])
    else:
        dst.index_put_((idx,), src)


def _copy(cache: PagedKVCache, packed: torch.Tensor, page_ids: torch.Tensor, num_tokens: int,
          layers: range, heads: range, *, unpack: bool, region_tokens: int | None = None) -> None:
    ps = cache.page_size
    ids = page_ids.to(torch.int64)
    rows = num_tokens if region_tokens is None else region_tokens
    n_regions = 1 if region_tokens is None else num_tokens // region_tokens
    full, tail = divmod(num_tokens, ps)
    flat_idx = None
    for pool, blocks in _blocks(cache, packed, rows, n_regions, layers, heads):
        pages = _page_rows(pool)
        if pages is not None and (n_regions == 1 or rows % ps == 0):
            k = rows // ps  # whole pages per value
            whole = blocks[:, :k * ps].view(n_regions, k, pages.shape[1])
            page_idx = ids[:n_regions * k].view(n_regions, k)
            block = blocks[0]
            tail_ids, tail_rows = ids[full:full + 1], block[full * ps:].unsqueeze(0)
            if unpack:
                _scatter_rows(pages, page_idx, whole)
                if tail:
                    pool[tail_ids, :tail] = tail_rows
            else:
                _gather_rows(pages, page_idx, whole)
                if tail:
                    tail_rows.copy_(pool[tail_ids, :tail])
            continue
        if flat_idx is None:
            p, s = token_slots(page_ids, num_tokens, ps)
            flat_idx = (p * ps + s).view(n_regions, rows)
        tokens = _token_rows(pool)
        if tokens is not None:
            (_scatter_rows if unpack else _gather_rows)(tokens, flat_idx, blocks)
        elif unpack:
            pool[flat_idx // ps, flat_idx % ps] = blocks
        else:
            blocks.copy_(pool[flat_idx // ps, flat_idx % ps])


def _scatter_tokens(pool: torch.Tensor, flat_idx: torch.Tensor, rows: torch.Tensor) -> None:
    """pool token (page * ps + slot) flat_idx[i] <- rows[i]."""
    tokens = _token_rows(pool)
    if tokens is not None:
        tokens.index_copy_(0, flat_idx, rows)
    else:
        ps = pool.shape[1]
        pool[flat_idx // ps, flat_idx % ps] = rows


def pack_pages_torch(cache: PagedKVCache, page_ids: torch.Tensor, num_tokens: int,
                     layers: range, heads: range, out: torch.Tensor, *,
                     region_tokens: int | None = None) -> None:
    """Gather into ``out`` (uint8, exactly the packed size). Inputs are trusted."""
    _copy(cache, out, page_ids, num_tokens, layers, heads, unpack=False,
          region_tokens=region_tokens)


def unpack_pages_torch(packed: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                       num_tokens: int, layers: range, heads: range, *,
                       region_tokens: int | None = None) -> None:
    """Scatter ``packed`` (uint8, exactly the packed size) into ``cache``. Inputs are trusted."""
    _copy(cache, packed, page_ids, num_tokens, layers, heads, unpack=True,
          region_tokens=region_tokens)


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
        for pool, blocks in _blocks(cache, region, rows_per_rank, 1, layers, heads):
            block = blocks[0]
            _scatter_tokens(pool, dst, block[:local.numel()] if prefix else block[local])
