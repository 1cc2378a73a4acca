"""Pack a request's pages into a contiguous slot, unpack a slot into a pool, and reorganize a CP
all-gather into a pool: one Triton launch each.

One kernel serves all three. Its grid is (token blocks, blocks of the packed format); every
program copies a [BLOCK_T tokens, BLOCK_R words] tile between the pool and the slot. A per-block
descriptor table (built once per cache, layer range, head slice and word width, then cached)
holds each layer tensor's base address and strides, so all layers and components go in a single
launch whatever their number. Bytes move as same-width integer words (8, 4, 2 or 1 bytes: the
widest that divides every address, stride and row), never as floats.

Slot side: token t's row of block b sits at ``rows_per_rank * pre_words[b] + t * row_words[b]``
(the packed format). With a token map (reorganize), token t instead reads gathered row
``g = map[t]`` of rank region ``g // rows_per_rank`` (regions ``rank_words`` apart, each a packed
slot of ``rows_per_rank`` tokens), and is skipped where ``g < 0``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._checks import as_page_ids, check_buffer, check_num_tokens
from ..layout import PackedFormat, PagedKVCache, as_range
from .reference import pack_pages_torch, reorganize_torch, unpack_pages_torch
from .words import WORD_DTYPES, word_bytes

__all__ = ["pack_pages", "reorganize_pages", "unpack_pages"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Descriptor row per packed block (layer-major, then component), int64 fields in this order:
# base address, page / slot / head strides (words), words per head, words per row, words of
# every earlier block's row.
_N_FIELDS = 7


@triton.jit(do_not_specialize=["num_tokens", "rows_per_rank", "rank_words"])
def _paged_copy_kernel(
    slot,  # *word: the packed slot (or the gathered regions)
    desc,  # *int64 [n_blocks, N_FIELDS]
    page_ids,  # *int32 | *int64 [n_pages of the request]
    token_map,  # *int64 [num_tokens] gathered row per token, -1 to skip (HAS_TOKEN_MAP)
    num_tokens,
    page_size,
    rows_per_rank,
    rank_words,
    N_FIELDS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IS_UNPACK: tl.constexpr,
    HAS_TOKEN_MAP: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    p_desc = desc + i_b * N_FIELDS
    p_pool = tl.load(p_desc + 0).to(tl.pointer_type(slot.dtype.element_ty))
    stride_page = tl.load(p_desc + 1)
    stride_slot = tl.load(p_desc + 2)
    stride_head = tl.load(p_desc + 3)
    head_words = tl.load(p_desc + 4)
    row_words = tl.load(p_desc + 5)
    # Blocks are back to back: this one starts after the rows of every earlier block.
    o_block = rows_per_rank * tl.load(p_desc + 6)

    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    m_t = o_t < num_tokens
    if HAS_TOKEN_MAP:
        b_row = tl.load(token_map + o_t, mask=m_t, other=-1)
        m_t = m_t & (b_row >= 0)
        o_tok_slot = (b_row // rows_per_rank) * rank_words + o_block \
            + (b_row % rows_per_rank) * row_words
    else:
        o_tok_slot = o_block + o_t * row_words
    b_page = tl.load(page_ids + o_t // page_size, mask=m_t, other=0).to(tl.int64)
    o_tok_pool = b_page * stride_page + (o_t % page_size) * stride_slot
    for r0 in range(0, row_words, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        m = m_t[:, None] & (o_r < row_words)[None, :]
        o_row = (o_r // head_words) * stride_head + o_r % head_words  # heads may be strided
        o_pool = o_tok_pool[:, None] + o_row[None, :]
        o_slot = o_tok_slot[:, None] + o_r[None, :]
        if IS_UNPACK:
            tl.store(p_pool + o_pool, tl.load(slot + o_slot, mask=m), mask=m)
        else:
            tl.store(slot + o_slot, tl.load(p_pool + o_pool, mask=m), mask=m)


def _descriptors(cache: PagedKVCache, layers: range, heads: range, word: int) -> torch.Tensor:
    """The kernel's per-block table, cached on the pool (its tensors never move)."""
    key = (layers.start, layers.stop, heads.start, heads.stop, word)
    table = cache._kernel_tables.get(key)
    if table is None:
        rows, pre_words = [], 0
        for layer in layers:
            for spec in cache.components:
                t = cache.nhd_view(spec.name, layer)
                scale = spec.itemsize  # element strides -> byte strides -> words
                head_words = spec.head_nbytes // word
                row_words = len(heads) * head_words
                rows.append([
                    t.data_ptr() + heads.start * t.stride(2) * scale,
                    t.stride(0) * scale // word,
                    t.stride(1) * scale // word,
                    t.stride(2) * scale // word,
                    head_words,
                    row_words,
                    pre_words,
                ])
                pre_words += row_words
        table = torch.tensor(rows, dtype=torch.int64).to(cache.device)
        cache._kernel_tables[key] = table
    return table


def _launch(cache: PagedKVCache, page_ids: torch.Tensor, num_tokens: int, layers: range,
            heads: range, slot: torch.Tensor, *, unpack: bool, token_map=None,
            rows_per_rank: int | None = None, rank_nbytes: int = 0) -> None:
    """Launch the copy kernel once for every layer and component. Inputs are trusted."""
    word = word_bytes(cache, layers, heads, slot)
    table = _descriptors(cache, layers, heads, word)
    max_row = max(len(heads) * s.head_nbytes // word for s in cache.components)
    block_r = min(triton.next_power_of_2(max_row), 1024 if _INTERPRET else 256)
    # Enough tokens per program to move ~16 KiB (GPU) / ~64K words (interpreter: programs are slow).
    budget = (1 << 16) if _INTERPRET else (16384 // word)
    block_t = max(1, min(budget // block_r, triton.next_power_of_2(num_tokens), 1024))
    grid = (triton.cdiv(num_tokens, block_t), table.shape[0])
    _paged_copy_kernel[grid](
        slot.view(WORD_DTYPES[word]), table, page_ids,
        page_ids if token_map is None else token_map, num_tokens, cache.page_size,
        num_tokens if rows_per_rank is None else rows_per_rank, rank_nbytes // word,
        N_FIELDS=_N_FIELDS, BLOCK_T=block_t, BLOCK_R=block_r, IS_UNPACK=unpack,
        HAS_TOKEN_MAP=token_map is not None,
    )


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend == "auto":
        return device.type == "cuda"
    if backend == "torch":
        return False
    if backend == "triton":
        if device.type != "cuda" and not _INTERPRET:
            raise ValueError(f"backend='triton' on device {device} needs TRITON_INTERPRET=1 set "
                             f"before cpkv.kernels is imported (or CUDA tensors)")
        return True
    raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")


def _request(cache, page_ids, num_tokens, layers, heads, validate, *, unique):
    """Resolve and check the arguments common to pack and unpack. The ids are always made a
    contiguous tensor (no kernel reads a strided view); their values are read back only when
    ``validate``."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected PagedKVCache, got {type(cache).__name__}")
    layer_range = as_range(layers, cache.num_layers, "layers")
    head_range = as_range(heads, cache.num_heads, "heads")
    page_ids = as_page_ids(page_ids, cache.num_pages, cache.device, unique=unique,
                           check_values=validate)
    num_tokens = check_num_tokens(num_tokens, page_ids.shape[0], cache.page_size)
    return page_ids, num_tokens, layer_range, head_range


def pack_pages(cache: PagedKVCache, page_ids: torch.Tensor, *, num_tokens: int | None = None,
               layers=None, heads=None, out: torch.Tensor | None = None, backend: str = "auto",
               validate: bool = True) -> torch.Tensor:
    """Gather a request's tokens from a paged pool into one contiguous packed slot.

    Args:
        cache: the source pool.
        page_ids: [n_pages] int32/int64 pool page ids of the request, in request order (a
            numpy array or list is converted; a strided tensor is made contiguous).
        num_tokens: tokens [0, num_tokens) are packed; default every slot of the listed pages.
        layers: layer range to pack (a pipeline stage): None, (start, stop), range or slice.
        heads: head range to pack (a tensor-parallel slice), same forms; default all heads.
        out: optional contiguous uint8 buffer (e.g. a staging slot) of at least the packed size.
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".
        validate: check every argument (reads ids back from the device); False skips the checks
            and makes no host synchronisation: out-of-range ids then corrupt memory.

    Returns:
        [packed_nbytes] uint8, the packed slot (a view of ``out`` when given); its layout is
        ``cache.packed_format(num_tokens, layers=layers, heads=heads)``.

    Example::

        cache = PagedKVCache.empty_mha(num_layers=2, num_pages=8, page_size=16, num_heads=4,
                                       head_dim=128, dtype=torch.bfloat16)
        slot = pack_pages(cache, torch.tensor([5, 2]), num_tokens=20)  # [20*2*2*4*256] uint8
    """
    page_ids, num_tokens, layer_range, head_range = _request(cache, page_ids, num_tokens, layers,
                                                             heads, validate, unique=False)
    nbytes = cache.packed_nbytes(num_tokens, layers=layer_range, heads=head_range)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=cache.device)
    elif validate:
        check_buffer(out, what="out", device=cache.device, min_nbytes=nbytes, dtype=torch.uint8)
    out = out[:nbytes]
    use_triton = _use_triton(backend, cache.device)
    if nbytes:
        if use_triton:
            _launch(cache, page_ids, num_tokens, layer_range, head_range, out, unpack=False)
        else:
            pack_pages_torch(cache, page_ids, num_tokens, layer_range, head_range, out)
    return out


def unpack_pages(packed: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor, *,
                 num_tokens: int | None = None, layers=None, heads=None,
                 format: PackedFormat | None = None, backend: str = "auto",
                 validate: bool = True) -> None:
    """Scatter a packed slot into a paged pool: the inverse of `pack_pages`.

    Token t lands in page ``page_ids[t // cache.page_size]``, slot ``t % cache.page_size``; the
    destination page size need not be the sender's. ``heads`` places the packed head slice at
    any head offset of the destination. Pages not listed, and slots past ``num_tokens`` in the
    last page, are never written.

    Args:
        packed: contiguous buffer of exactly the packed size; uint8, or the pool's dtype.
        cache: the destination pool.
        page_ids: [n_pages] int32/int64 distinct destination page ids, in request order.
        num_tokens, layers, heads, backend, validate: as in `pack_pages`, for the destination.
        format: the sender's `PackedFormat`; when given it must equal the destination's, which
            catches a head_dim, dtype, head-count or token-count mismatch by name.

    Example::

        unpack_pages(slot, decode_cache, torch.tensor([0, 1, 2]), num_tokens=20)  # page_size 8
    """
    page_ids, num_tokens, layer_range, head_range = _request(cache, page_ids, num_tokens, layers,
                                                             heads, validate, unique=True)
    expected = cache.packed_format(num_tokens, layers=layer_range, heads=head_range)
    if validate:
        if format is not None:
            if not isinstance(format, PackedFormat):
                raise TypeError(f"format: expected PackedFormat, got {type(format).__name__}")
            format.check_matches(expected)
        check_buffer(packed, what="packed", device=cache.device, nbytes=expected.nbytes)
        if packed.dtype != torch.uint8:
            for spec in cache.components:
                if spec.dtype != packed.dtype:
                    raise TypeError(f"packed: dtype {packed.dtype} differs from the destination "
                                    f"component {spec.name!r} dtype {spec.dtype}")
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    use_triton = _use_triton(backend, cache.device)
    if expected.nbytes:
        if use_triton:
            _launch(cache, page_ids, num_tokens, layer_range, head_range, packed, unpack=True)
        else:
            unpack_pages_torch(packed, cache, page_ids, num_tokens, layer_range, head_range)


def reorganize_pages(gathered: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                     token_map: torch.Tensor, *, rows_per_rank: int, layers=None,
                     backend: str = "auto", validate: bool = True) -> None:
    """Write gathered packed regions into the pool through a token map, in one launch.

    ``gathered`` holds equal regions, each a packed slot (see `pack_pages`) of ``rows_per_rank``
    tokens over ``layers`` and all heads. Request-local token t (page ``page_ids[t // ps]``, slot
    ``t % ps``) receives gathered row ``g = token_map[t]`` (row ``g % rows_per_rank`` of region
    ``g // rows_per_rank``), and is left untouched where ``g < 0``. Nothing else in the pool is
    written. `cpkv.cp` builds the map from a split plan (undoing zigzag/interleave, skipping
    padding and tokens already in the pages); the kernels know nothing of splits.

    Args:
        gathered: contiguous uint8 [n_regions * cache.packed_nbytes(rows_per_rank, layers=)].
        cache: the destination pool.
        page_ids: [n_pages] distinct page ids the map's tokens address.
        token_map: [num_tokens] int64 on the pool's device, num_tokens <= n_pages * page_size;
            each value -1 or a row in [0, n_regions * rows_per_rank).
        rows_per_rank: tokens per region.
        layers, backend, validate: as in `pack_pages`.
    """
    if validate:
        page_ids = check_reorganize(gathered, cache, page_ids, token_map,
                                    rows_per_rank=rows_per_rank, layers=layers)
    else:
        page_ids = as_page_ids(page_ids, cache.num_pages, cache.device, check_values=False)
    layer_range = as_range(layers, cache.num_layers, "layers")
    region = cache.packed_nbytes(rows_per_rank, layers=layer_range)
    num_tokens = token_map.numel()
    if not region or not num_tokens:
        return
    if _use_triton(backend, cache.device):
        _launch(cache, page_ids, num_tokens, layer_range, range(cache.num_heads), gathered,
                unpack=True, token_map=token_map, rows_per_rank=rows_per_rank,
                rank_nbytes=region)
    else:
        reorganize_torch(gathered, cache, page_ids, token_map, layer_range, rows_per_rank)


def check_reorganize(gathered, cache, page_ids, token_map, *, rows_per_rank: int,
                     layers=None) -> torch.Tensor:
    """The checks of `reorganize_pages` alone (nothing moves): ValueError/TypeError if bad.
    Returns the page ids as `reorganize_pages` uses them."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected PagedKVCache, got {type(cache).__name__}")
    layer_range = as_range(layers, cache.num_layers, "layers")
    page_ids = as_page_ids(page_ids, cache.num_pages, cache.device, unique=True)
    if not isinstance(rows_per_rank, int) or isinstance(rows_per_rank, bool) or rows_per_rank < 0:
        raise ValueError(f"rows_per_rank: expected a non-negative int, got {rows_per_rank!r}")
    if not isinstance(token_map, torch.Tensor) or token_map.dtype != torch.int64:
        raise TypeError(f"token_map: expected an int64 tensor, got "
                        f"{getattr(token_map, 'dtype', type(token_map).__name__)}")
    if token_map.dim() != 1 or not token_map.is_contiguous() or token_map.device != cache.device:
        raise ValueError(f"token_map: expected a contiguous 1-D tensor on {cache.device}, got "
                         f"shape {tuple(token_map.shape)} on {token_map.device}")
    capacity = page_ids.numel() * cache.page_size
    if token_map.numel() > capacity:
        raise ValueError(f"token_map: {token_map.numel()} tokens need "
                         f"{-(-token_map.numel() // cache.page_size)} pages of "
                         f"{cache.page_size}, got {page_ids.numel()}")
    region = cache.packed_nbytes(rows_per_rank, layers=layer_range)
    check_buffer(gathered, what="gathered", device=cache.device, dtype=torch.uint8)
    if region and gathered.numel() % region:
        raise ValueError(f"gathered: expected a whole number of regions of {region} bytes "
                         f"({rows_per_rank} tokens), got {gathered.numel()} bytes")
    rows = gathered.numel() // region * rows_per_rank if region else 0
    if token_map.numel():
        lo, hi = int(token_map.min()), int(token_map.max())
        if lo < -1 or hi >= rows:
            raise ValueError(f"token_map: expected values in [-1, {rows}), got min {lo}, "
                             f"max {hi}")
    return page_ids
