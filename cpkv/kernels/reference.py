"""Pure-torch pack/unpack with the same semantics as the Triton kernels.

The oracle beside the kernels, and the production path for CPU tensors. Bytes move through
integer views of the pool (the widest word that divides every row and stride, see `words`), so
every dtype round-trips bit for bit and element-wise copies move 8 bytes at a time.

Per (layer, component) block, the cheapest form that the pool's strides allow:
  * pages: each page is one contiguous run (no head slice, NHD), so whole pages move as 2-D rows
    with one ``index_select`` / ``index_copy_`` and the partial last page with one slice copy
    (2-D rows gather ~1.35x faster than [tokens, heads, row] on the CPU);
  * tokens: page and entry axes merge, so tokens move as rows of ``[num_pages * page_size]``;
  * otherwise advanced indexing over (page, entry).

A slot cut into values (``region_tokens``) is seen as ``[values, rows, ...]`` strided views of
each block (`_blocks`): unpack scatters from them with one ``index_put_``; pack gathers into
them with one ``index_select`` per row position of a value when a value holds a few pages (no
temporary), else through a temporary of the block.
"""

from __future__ import annotations

import torch

from ..layout import PackedFormat, PagedKVCache
from .words import WORD_DTYPES, pool_memo, word_bytes

__all__ = ["pack_pages_torch", "reorganize_torch", "token_entries", "unpack_pages_torch"]


def token_entries(page_ids: torch.Tensor, num_tokens: int, page_size: int, *,
                  token_offset: int = 0, tokens: torch.Tensor | None = None):
    """(page, entry) of packed rows [0, num_tokens) as int64 tensors: row j is request-local
    token ``token_offset + j``, or ``tokens[j]`` (entry: the position inside the page)."""
    t = torch.arange(token_offset, token_offset + num_tokens, device=page_ids.device) \
        if tokens is None else tokens.to(torch.int64)
    pages = page_ids.to(torch.int64)[t // page_size]
    return pages, t % page_size


def _page_rows(pool: torch.Tensor) -> torch.Tensor | None:
    """[P, ps, nh, row] -> [P, ps * nh * row] when every page is one contiguous run."""
    p, ps, nh, row = pool.shape
    if (nh > 1 and pool.stride(2) != row) or (ps > 1 and pool.stride(1) != nh * row):
        return None
    return pool.as_strided((p, ps * nh * row), (pool.stride(0), 1))


def _token_rows(pool: torch.Tensor) -> torch.Tensor | None:
    """[P, ps, nh, row] -> [P * ps, nh, row] when page and entry axes merge."""
    if pool.stride(0) != pool.shape[1] * pool.stride(1):
        return None
    return pool.as_strided((pool.shape[0] * pool.shape[1], *pool.shape[2:]),
                           (pool.stride(1), *pool.stride()[2:]))


def _blocks(cache: PagedKVCache, packed: torch.Tensor, fmt: PackedFormat, layers: range,
            heads: range):
    """Yield (pool [P, ps, nh, row_words], block [values, rows, nh, row_words]) in format
    order: one (layer, component) block of every value of a slot of format ``fmt`` (one value:
    an uncut slot). Positions come from `PackedFormat.component_view`."""
    word = word_bytes(cache, layers, heads, packed)  # divides every row, so every offset
    words = packed.view(WORD_DTYPES[word])
    views = [fmt.component_view(words, c) for c in range(len(cache.components))]
    for i, layer in enumerate(layers):
        for c, spec in enumerate(cache.components):
            pool = cache.nhd_view(spec.name, layer)[:, :, heads.start:heads.stop]
            pool = pool.view(torch.uint8).view(WORD_DTYPES[word])
            yield pool, views[c][:, i]


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


STACKED_MAX_ROWS = 16  # pages (or tokens) per block up to which all layers move in one op


def _stacked_pools(cache: PagedKVCache, layers: range, heads: range, word: int):
    """Per component, the layers [L, P, ps, nh, row_words] as one strided view when they sit
    at equal distances in memory with equal strides (a stacked pool, as `PagedKVCache.empty`
    allocates), else None. Cached per pool: its memory never moves."""
    memo = pool_memo(cache)
    key = ("stacked", layers.start, layers.stop, heads.start, heads.stop, word)
    if key not in memo:
        pools = []
        for spec in cache.components:
            views = [cache.nhd_view(spec.name, layer)[:, :, heads.start:heads.stop]
                     .view(torch.uint8).view(WORD_DTYPES[word]) for layer in layers]
            first = views[0]
            step = views[1].data_ptr() - first.data_ptr()
            storage = first.untyped_storage().data_ptr()  # one allocation, not equal gaps
            if step <= 0 or step % word or any(
                    v.stride() != first.stride() or v.data_ptr() - first.data_ptr() != i * step
                    or v.untyped_storage().data_ptr() != storage for i, v in enumerate(views)):
                pools = None
                break
            pools.append(first.as_strided((len(layers), *first.shape),
                                          (step // word, *first.stride()),
                                          first.storage_offset()))
        memo[key] = pools
    return memo[key]


def _stacked(cache: PagedKVCache, packed: torch.Tensor, num_tokens: int, layers: range,
             heads: range):
    """(pool [L, P, ps, nh, row_words], block [L, rows, nh, row_words]) per component for a
    stacked pool (`_stacked_pools`), else None."""
    if len(layers) < 2:
        return None
    word = word_bytes(cache, layers, heads, packed)
    pools = _stacked_pools(cache, layers, heads, word)
    if pools is None:
        return None
    fmt = cache.packed_format(num_tokens, layers=layers, heads=heads)
    words = packed.view(WORD_DTYPES[word])
    return [(pool, fmt.component_view(words, c)[0]) for c, pool in enumerate(pools)]


def _as_rows(pool: torch.Tensor, unit: int):
    """The stacked pool [L, P, ps, nh, row] as rows of ``unit`` words (a page, or a token),
    when every layer and page start on a row: (rows, rows per layer, rows per page), or None.
    The caller has checked that a unit is one contiguous run."""
    n_layers, n_pages = pool.shape[:2]
    layer, page = pool.stride(0), pool.stride(1)
    if layer % unit or page % unit:
        return None
    end = (n_layers - 1) * layer + (n_pages - 1) * page + pool.shape[2] * pool.stride(2)
    rows = pool.as_strided((-(-end // unit), unit), (unit, 1), pool.storage_offset())
    return rows, layer // unit, page // unit


def _copy_stacked(stacked, ids: torch.Tensor, flat_idx: torch.Tensor | None, num_tokens: int,
                  ps: int, unpack: bool) -> bool:
    """Every layer of each component in one op: whole pages (the partial last page in one
    more) where the rows start on a page, else token rows (``flat_idx``: page * ps + entry of
    each row), gathered by one flat index over the layers (a dim-0 gather: the fast one).
    Only for a few rows per block, where the per-op cost dominates; False if not taken."""
    full, tail = divmod(num_tokens, ps)
    plans = []
    for pool, block in stacked:
        n_heads, row = pool.shape[3:]
        token = n_heads * row
        if pool.stride()[2:] != (token, row, 1):  # tokens are contiguous runs
            return False
        if flat_idx is None and pool.stride(1) == ps * token and full <= STACKED_MAX_ROWS:
            found = _as_rows(pool, ps * token)
            unit, count = ps * token, full
            index = None if found is None else ids[:full] * found[2]
        elif flat_idx is not None and num_tokens <= STACKED_MAX_ROWS * ps:
            found = _as_rows(pool, token)
            unit, count = token, num_tokens
            index = None if found is None else (flat_idx // ps) * found[2] + flat_idx % ps
        else:
            return False
        if found is None:
            return False
        plans.append((pool, block, found[0], found[1], unit, index, count, flat_idx is None))
    for pool, block, rows, per_layer, unit, index, count, pages in plans:
        n_layers = pool.shape[0]
        flat = (torch.arange(n_layers, device=index.device).unsqueeze(1) * per_layer +
                index).reshape(-1)
        dense = block.as_strided((n_layers, count, unit), (block.stride(0), unit, 1))
        if unpack:
            rows.index_copy_(0, flat, dense.reshape(n_layers * count, unit))
            if pages and tail:
                pool[:, ids[full], :tail] = block[:, full * ps:]
        else:
            dense.copy_(rows.index_select(0, flat).view(n_layers, count, unit))
            if pages and tail:
                block[:, full * ps:] = pool[:, ids[full], :tail]
    return True


def _copy(cache: PagedKVCache, packed: torch.Tensor, page_ids: torch.Tensor, num_tokens: int,
          layers: range, heads: range, *, unpack: bool, region_tokens: int | None = None,
          token_offset: int = 0, tokens: torch.Tensor | None = None) -> None:
    ps = cache.page_size
    ids = page_ids.to(torch.int64)
    whole_pages = tokens is None and token_offset % ps == 0  # rows start on a page
    if whole_pages:
        ids = ids[token_offset // ps:]
    stacked = _stacked(cache, packed, num_tokens, layers, heads) \
        if region_tokens is None else None
    if stacked is not None:
        flat = None
        if not whole_pages:
            p, e = token_entries(page_ids, num_tokens, ps, token_offset=token_offset,
                                 tokens=tokens)
            flat = p * ps + e
        if _copy_stacked(stacked, ids, flat, num_tokens, ps, unpack):
            return
    fmt = cache.packed_format(num_tokens, layers=layers, heads=heads,
                              region_tokens=region_tokens)
    rows, n_regions = fmt.rows_per_region, fmt.num_regions
    full, tail = divmod(num_tokens, ps)
    flat_idx = None
    for pool, blocks in _blocks(cache, packed, fmt, layers, heads):
        pages = _page_rows(pool) if whole_pages else None
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
            p, e = token_entries(page_ids, num_tokens, ps, token_offset=token_offset,
                                 tokens=tokens)
            flat_idx = (p * ps + e).view(n_regions, rows)
        tokens = _token_rows(pool)
        if tokens is not None:
            (_scatter_rows if unpack else _gather_rows)(tokens, flat_idx, blocks)
        elif unpack:
            pool[flat_idx // ps, flat_idx % ps] = blocks
        else:
            blocks.copy_(pool[flat_idx // ps, flat_idx % ps])


def _scatter_tokens(pool: torch.Tensor, flat_idx: torch.Tensor, rows: torch.Tensor) -> None:
    """pool token (page * ps + entry) flat_idx[i] <- rows[i]."""
    tokens = _token_rows(pool)
    if tokens is not None:
        tokens.index_copy_(0, flat_idx, rows)
    else:
        ps = pool.shape[1]
        pool[flat_idx // ps, flat_idx % ps] = rows


def pack_pages_torch(cache: PagedKVCache, page_ids: torch.Tensor, num_tokens: int,
                     layers: range, heads: range, out: torch.Tensor, **where) -> None:
    """Gather into ``out`` (uint8, exactly the packed size). Inputs are trusted; ``where``:
    ``region_tokens``, ``token_offset``, ``tokens`` as in `cpkv.kernels.pack_pages`."""
    _copy(cache, out, page_ids, num_tokens, layers, heads, unpack=False, **where)


def unpack_pages_torch(packed: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                       num_tokens: int, layers: range, heads: range, **where) -> None:
    """Scatter ``packed`` (uint8, exactly the packed size) into ``cache``. Inputs are trusted;
    ``where`` as in `pack_pages_torch`."""
    _copy(cache, packed, page_ids, num_tokens, layers, heads, unpack=True, **where)


def reorganize_torch(gathered: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                     token_map: torch.Tensor, layers: range, rows_per_rank: int) -> None:
    """Request-local token t <- gathered row token_map[t] (skipped where < 0). Inputs are
    trusted; see `cpkv.kernels.reorganize_pages` for the layout of ``gathered``."""
    ps = cache.page_size
    tokens = torch.nonzero(token_map >= 0).flatten()
    rows = token_map[tokens]
    pages, entries = token_entries(page_ids, token_map.numel(), ps)
    flat_idx = (pages * ps + entries)[tokens]
    fmt = cache.packed_format(rows_per_rank, layers=layers)  # one rank's region
    regions = gathered.view(-1, fmt.nbytes)
    heads = range(cache.num_heads)
    for r, region in enumerate(regions):
        mine = (rows >= r * rows_per_rank) & (rows < (r + 1) * rows_per_rank)
        local, dst = rows[mine] - r * rows_per_rank, flat_idx[mine]
        if not local.numel():
            continue
        # A region's rows usually land in order from row 0 (a split's local order): slice then.
        prefix = bool(torch.equal(local, torch.arange(local.numel(), device=local.device)))
        for pool, blocks in _blocks(cache, region, fmt, layers, heads):
            block = blocks[0]
            _scatter_tokens(pool, dst, block[:local.numel()] if prefix else block[local])
