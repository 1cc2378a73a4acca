"""Pack a request's pages into a contiguous packed slot, unpack a slot into a pool, and reorganize
a CP all-gather into a pool: one Triton kernel, O(1) launches per call.

The launcher (`plan_launch`) sorts the packed format's blocks (one per layer and component) into
groups of one specialisation: word width, alignment, heads contiguous or strided, head and
row length. Each group is one launch of a kernel specialised to it, whatever the number of layers
and pages: page size, head words and row words are compile-time constants (no division by a
run-time value, no recompile per request size), and the alignment the host checked is asserted
to the compiler, so a 16-byte aligned row moves in 128-bit accesses. A narrower component (fp32
scales beside bf16 K/V, an odd head size) gets its own group and word, never dragging the others
to its width. Bytes move as same-width integer words (8, 4, 2 or 1 bytes), never as floats.

Each program copies a [BLOCK_T tokens, CHUNK_WORDS words] tile of one block in BLOCK_R-word
steps; a row longer than CHUNK_WORDS is split across programs (grid axis 2), so a request of
few tokens still fills the GPU. Tile sizes depend only on the specialisation and are budgeted in
bytes (see `_TILE_BYTES`). A per-group descriptor table (kept per pool, `words.pool_memo`: its
tensors never move) holds each block's pool base address, strides and packed offset.

Slot side: packed row j of block b sits at ``rows_per_region * pre_words[b] + j * ROW_WORDS``
(the packed format). A slot cut into values (regions: `pack_pages(region_tokens=)`, and the
rank regions of a CP all-gather) puts row j in value ``j // rows_per_region``, values
``region_words`` apart, each an ordinary packed slot of ``rows_per_region`` rows: one 32-bit
division per token, never in the copy loop. With a token map (reorganize), pool token t instead
reads packed row ``map[t]`` (regions of ``rows_per_rank`` rows), and is skipped where it is < 0.

Pool side: packed row j is request-local token ``token_offset + j`` (a run-time value) or
``tokens[j]`` (a list: HAS_TOKEN_LIST), in page ``page_ids[t // PAGE_SIZE]``.

Digest (HAS_DIGEST): each word adds its share of the packed buffer's digest
(`cpkv.kernels.digest`) to a per-program sum as it passes between load and store, and each
program adds its sum to the counter with one atomic; launched with 8 warps and its steps not
unrolled, so the multiply-adds do not keep every step's words live.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import (
    as_page_ids,
    byte_span,
    check_buffer,
    check_count,
    check_no_alias,
    check_num_tokens,
)
from ..layout import PackedFormat, PagedKVCache, as_range
from .digest import add_digest, digest_terms
from .reference import pack_pages_torch, reorganize_torch, unpack_pages_torch
from .words import WORD_DTYPES, pool_memo, widest_word

__all__ = ["pack_pages", "reorganize_pages", "unpack_pages"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Descriptor row per block of a group, int64 fields in this order: pool base address (bytes),
# page / entry / head strides (words), words of every earlier block's row in the packed format.
_N_FIELDS = 5
# Bytes one tile step moves: 8 KiB over 4 warps is 64 B (four 128-bit accesses) per thread.
# The interpreter runs programs one by one, so it gets far larger tiles.
_TILE_BYTES = 8192
_TILE_BYTES_INTERPRET = 1 << 19
_STEP_MAX_BYTES = 2048  # widest row step; longer rows loop (or split across programs)
_CHUNK_MAX_BYTES = 8192  # row bytes one program covers; longer rows split across programs
_MAX_ALIGN = 16  # bytes of the widest access (128-bit)


@triton.jit(do_not_specialize=["num_rows", "rows_per_region", "region_words", "token_offset"])
def _paged_copy_kernel(
    slot,  # *word: the packed slot (or the gathered regions)
    desc,  # *int64 [n_blocks, _N_FIELDS] of this group
    page_ids,  # *int32 | *int64 [n_pages of the request]
    token_map,  # *int64 [num_rows] packed row per token, -1 to skip (HAS_TOKEN_MAP)
    tokens,  # *int32 | *int64 [num_rows] request-local token per packed row (HAS_TOKEN_LIST)
    digest,  # *int64 [1] the packed bytes' digest is added here (HAS_DIGEST)
    num_rows,  # packed rows (pack, unpack) or request-local tokens (token map)
    rows_per_region,  # rows of one value (HAS_REGIONS), else of the whole slot
    region_words,  # words from one value to the next (HAS_REGIONS)
    token_offset,  # request-local token of packed row 0 (without a token list)
    PAGE_SIZE: tl.constexpr,
    HEAD_WORDS: tl.constexpr,
    ROW_WORDS: tl.constexpr,
    CONTIG_HEADS: tl.constexpr,  # a row's heads are back to back in the pool
    VEC: tl.constexpr,  # words every address, stride and row is a multiple of
    ALIGN_BYTES: tl.constexpr,  # VEC * word bytes
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK_WORDS: tl.constexpr,  # a multiple of BLOCK_R
    IS_UNPACK: tl.constexpr,
    HAS_TOKEN_MAP: tl.constexpr,
    HAS_REGIONS: tl.constexpr,
    HAS_TOKEN_LIST: tl.constexpr,
    HAS_DIGEST: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_c = tl.program_id(2)
    p_desc = desc + i_b * 5
    p_pool = tl.load(p_desc).to(tl.pointer_type(slot.dtype.element_ty))
    p_pool = tl.multiple_of(p_pool, ALIGN_BYTES)
    stride_page = tl.multiple_of(tl.load(p_desc + 1), VEC)
    stride_entry = tl.multiple_of(tl.load(p_desc + 2), VEC)
    stride_head = tl.multiple_of(tl.load(p_desc + 3), VEC)
    o_block = tl.multiple_of(rows_per_region.to(tl.int64) * tl.load(p_desc + 4), VEC)

    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: token counts stay far below 2**31
    m_t = o_t < num_rows
    if HAS_TOKEN_MAP:
        g = tl.load(token_map + o_t, mask=m_t, other=-1)
        m_t = m_t & (g >= 0)
        row = g.to(tl.int32)
    else:
        row = o_t
    if HAS_REGIONS:
        region = row // rows_per_region  # once per token, 32-bit; never in the copy loop
        o_tok_slot = region.to(tl.int64) * region_words + o_block \
            + (row - region * rows_per_region).to(tl.int64) * ROW_WORDS
    else:
        o_tok_slot = o_block + row.to(tl.int64) * ROW_WORDS
    if HAS_TOKEN_LIST:  # pool side: which request-local token this row is
        tok = tl.load(tokens + o_t, mask=m_t, other=0).to(tl.uint32)
    else:
        tok = (o_t + token_offset).to(tl.uint32)  # unsigned: page and entry: a shift and a mask
    page = tl.load(page_ids + tok // PAGE_SIZE, mask=m_t, other=0).to(tl.int64)
    o_tok_pool = tl.multiple_of(
        page * stride_page + (tok % PAGE_SIZE).to(tl.int64) * stride_entry, VEC)
    o_tok_slot = tl.multiple_of(o_tok_slot, VEC)
    if HAS_DIGEST:
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.uint64)
    # Unrolled, but for the digest: its multiply-adds would keep every step's words live.
    for r0 in tl.range(0, CHUNK_WORDS, BLOCK_R, num_stages=1,
                       loop_unroll_factor=1 if HAS_DIGEST else CHUNK_WORDS // BLOCK_R):
        o_r = i_c * CHUNK_WORDS + r0 + tl.arange(0, BLOCK_R)
        o_r = tl.max_contiguous(tl.multiple_of(o_r, BLOCK_R), BLOCK_R)
        m = m_t[:, None] & (o_r < ROW_WORDS)[None, :]
        if CONTIG_HEADS:
            o_row = o_r.to(tl.int64)
        else:  # HND or a head slice of a wider buffer: constant divisor, no division
            o_row = (o_r // HEAD_WORDS).to(tl.int64) * stride_head + (o_r % HEAD_WORDS)
        o_pool = o_tok_pool[:, None] + o_row[None, :]
        o_slot = o_tok_slot[:, None] + o_r[None, :]
        if IS_UNPACK:
            b_row = tl.load(slot + o_slot, mask=m)
            tl.store(p_pool + o_pool, b_row, mask=m)
        else:
            b_row = tl.load(p_pool + o_pool, mask=m)
            tl.store(slot + o_slot, b_row, mask=m)
        if HAS_DIGEST:  # the bytes as they pass: no second read
            acc += tl.where(m, digest_terms(b_row, o_slot, ALIGN_BYTES // VEC), 0)
    if HAS_DIGEST:  # one atomic per program; a sum mod 2**64 in any order, read after the
        # kernel: relaxed (no fence, no L1 invalidation around it)
        tl.atomic_add(digest, tl.sum(acc).to(tl.int64, bitcast=True), sem="relaxed")


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of the copy kernel: its compile-time constants."""

    word: int  # bytes per word
    vec: int  # words per aligned run (16-byte alignment with 8-byte words: 2)
    page_size: int
    head_words: int
    row_words: int
    contig_heads: bool
    block_t: int
    block_r: int
    chunk_words: int
    is_unpack: bool
    has_token_map: bool
    has_regions: bool = False
    has_token_list: bool = False
    has_digest: bool = False
    num_warps: int = 4  # 8 with the digest: half the words (and registers) per thread

    @property
    def n_chunks(self) -> int:
        return -(-self.row_words // self.chunk_words)

    def constexprs(self) -> dict:
        return dict(PAGE_SIZE=self.page_size, HEAD_WORDS=self.head_words,
                    ROW_WORDS=self.row_words, CONTIG_HEADS=self.contig_heads, VEC=self.vec,
                    ALIGN_BYTES=self.vec * self.word, BLOCK_T=self.block_t,
                    BLOCK_R=self.block_r, CHUNK_WORDS=self.chunk_words,
                    IS_UNPACK=self.is_unpack, HAS_TOKEN_MAP=self.has_token_map,
                    HAS_REGIONS=self.has_regions, HAS_TOKEN_LIST=self.has_token_list,
                    HAS_DIGEST=self.has_digest)


@dataclass(frozen=True)
class LaunchGroup:
    """One launch: a specialisation and the descriptor rows of its blocks."""

    spec: KernelSpec
    rows: tuple[tuple[int, ...], ...]


def slot_alignment(slot: torch.Tensor) -> int:
    """Bytes (<= 16) the slot's address is a multiple of; also its offset in its storage, so
    the slot can be viewed as words of that width."""
    return widest_word([slot.data_ptr(), slot.storage_offset() * slot.element_size()], _MAX_ALIGN)


def _tiles(row_words: int, vec: int, word: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_R, CHUNK_WORDS) for a row: fixed by the specialisation, budgeted in bytes."""
    # The widest power-of-two step (<= 2 KiB) whose padding wastes at most 1/8 of the row.
    block_r, cap = vec, max(vec, min(triton.next_power_of_2(row_words), _STEP_MAX_BYTES // word))
    while block_r * 2 <= cap and -(-row_words // (block_r * 2)) * block_r * 2 * 8 <= row_words * 9:
        block_r *= 2
    steps = min(-(-row_words // block_r), max(1, _CHUNK_MAX_BYTES // (block_r * word)))
    tile = _TILE_BYTES_INTERPRET if interpret else _TILE_BYTES
    block_t = max(1, min(tile // (block_r * word), 1024 if interpret else 256))  # powers of 2
    return block_t, block_r, steps * block_r


def plan_launch(cache: PagedKVCache, layers: range, heads: range, slot_align: int = 16, *,
                unpack: bool, token_map: bool = False, regions: bool = False,
                token_list: bool = False, digest: bool = False,
                interpret: bool = _INTERPRET) -> list[LaunchGroup]:
    """Group the packed format's blocks by specialisation (word, alignment, head and row
    words, contiguous heads): one `LaunchGroup` each.

    Pure host work on the pool's shapes, strides and addresses (no device access); the same
    code serves `_launch` and the codegen report (`benchmarks.codegen`). ``slot_align`` is the
    alignment in bytes of every value's start in the slot (`slot_alignment`, with the distance
    between values where the slot is cut); it caps the word. ``regions`` addresses a slot cut
    into values (`pack_pages(region_tokens=)`); ``token_map`` selects the reorganize kernel
    (packed rows chosen per pool token, in regions: it implies ``regions``); ``token_list``
    reads the request-local token of each packed row from a list (`pack_pages(tokens=)`);
    ``digest`` adds the packed bytes' digest (`cpkv.kernels.digest`) to a device counter.
    """
    # Block (layer, component) of a value starts at rows_per_region times its offset in a
    # slot of one token: the kernel multiplies by the run-time row count.
    unit = cache.packed_format(1, layers=layers, heads=heads)
    blocks = []
    for i, layer in enumerate(layers):
        for c, spec in enumerate(cache.components):
            t = cache.nhd_view(spec.name, layer)
            isz = spec.itemsize
            contig = len(heads) == 1 or t.stride(2) * isz == spec.head_nbytes
            strides = (t.stride(0) * isz, t.stride(1) * isz,
                       t.stride(2) * isz if len(heads) > 1 else spec.head_nbytes)
            base = t.data_ptr() + heads.start * t.stride(2) * isz
            blocks.append((base, strides, spec.head_nbytes, unit.row_nbytes[c], contig,
                           unit.block(i, c).offset))
    groups: dict[tuple, list] = {}
    for base, strides, head, row, contig, pre_b in blocks:
        quantities = [base, *strides, head, row, pre_b, slot_align]
        align = widest_word(quantities, _MAX_ALIGN)
        word = min(align, 8)
        key = (word, align // word, head // word, row // word, contig)
        groups.setdefault(key, []).append(
            (base, *(s // word for s in strides), pre_b // word))
    plan = []
    for (word, vec, head_words, row_words, contig), rows in groups.items():
        block_t, block_r, chunk = _tiles(row_words, vec, word, interpret)
        spec = KernelSpec(word, vec, cache.page_size, head_words, row_words, contig, block_t,
                          block_r, chunk, unpack, token_map, regions or token_map, token_list,
                          digest, 8 if digest else 4)
        plan.append(LaunchGroup(spec, tuple(rows)))
    return plan


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one; nothing to do on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(cache: PagedKVCache, page_ids: torch.Tensor, num_rows: int, layers: range,
            heads: range, slot: torch.Tensor, *, unpack: bool, token_map=None,
            rows_per_region: int | None = None, region_nbytes: int = 0, token_offset: int = 0,
            tokens: torch.Tensor | None = None, digest: torch.Tensor | None = None) -> None:
    """One launch per specialisation for every layer and component. Inputs are trusted; no host
    synchronisation (the descriptor tables are built and copied once per pool and launch key).
    ``rows_per_region`` / ``region_nbytes``: the slot is cut into values of that many rows,
    that many bytes apart (regions); else it is one packed slot of ``num_rows`` rows. Packed
    row j is request-local token ``token_offset + j``, or ``tokens[j]``. ``digest`` ([1] int64)
    gets the packed bytes' digest added."""
    has_map, regions, has_list = token_map is not None, rows_per_region is not None, \
        tokens is not None
    has_digest = digest is not None
    align = widest_word([slot_alignment(slot), region_nbytes], _MAX_ALIGN)  # every value's start
    key = ("plan", layers.start, layers.stop, heads.start, heads.stop, unpack, has_map, regions,
           has_list, has_digest, align)
    memo = pool_memo(cache)
    launches = memo.get(key)
    if launches is None:
        plan = plan_launch(cache, layers, heads, align, unpack=unpack, token_map=has_map,
                           regions=regions, token_list=has_list, digest=has_digest)
        launches = [(g.spec, torch.tensor(g.rows, dtype=torch.int64).to(cache.device))
                    for g in plan]
        memo[key] = launches
    rows = num_rows if rows_per_region is None else rows_per_region
    with _device_guard(cache.device):
        for spec, table in launches:
            words = slot[:slot.numel() // spec.word * spec.word].view(WORD_DTYPES[spec.word])
            grid = (triton.cdiv(num_rows, spec.block_t), table.shape[0], spec.n_chunks)
            _paged_copy_kernel[grid](
                words, table, page_ids, page_ids if token_map is None else token_map,
                page_ids if tokens is None else tokens, page_ids if digest is None else digest,
                num_rows, rows,
                region_nbytes // spec.word, token_offset, **spec.constexprs(),
                num_warps=spec.num_warps)


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


def _pool_spans(cache: PagedKVCache) -> list[tuple[int, int]]:
    """The byte spans of the pool's layer tensors (cached: the pool never moves)."""
    memo = pool_memo(cache)
    spans = memo.get("spans")
    if spans is None:
        spans = [byte_span(t) for layers in cache.buffers.values() for t in layers
                 if t.numel()]
        memo["spans"] = spans
    return spans


def _request(cache, page_ids, num_tokens, layers, heads, validate, *, unique, token_offset=0,
             tokens=None, digest=None):
    """Resolve and check the arguments common to pack and unpack. The ids (and ``tokens``) are
    always made contiguous tensors (no kernel reads a strided view); their values are read back
    only when ``validate``. Returns (page ids, packed rows, layers, heads, placement), the
    placement being `_launch`'s / the torch path's ``token_offset`` and ``tokens``."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected PagedKVCache, got {type(cache).__name__}")
    layer_range = as_range(layers, cache.num_layers, "layers")
    head_range = as_range(heads, cache.num_heads, "heads")
    page_ids = as_page_ids(page_ids, cache.num_pages, cache.device, unique=unique,
                           check_values=validate)
    if digest is not None and not (isinstance(digest, torch.Tensor) and digest.dtype ==
                                   torch.int64 and digest.numel() == 1
                                   and digest.device == cache.device):
        raise TypeError(f"digest: expected a one-element int64 tensor on {cache.device}, got "
                        f"{_describe(digest)}")
    if tokens is None:
        num_tokens = check_num_tokens(num_tokens, page_ids.shape[0], cache.page_size,
                                      token_offset)
        return page_ids, num_tokens, layer_range, head_range, {"token_offset": token_offset}
    if token_offset != 0:
        raise ValueError(f"token_offset: expected 0 with tokens= (the list names every packed "
                         f"row's token), got {token_offset!r}")
    tokens = as_page_ids(tokens, page_ids.shape[0] * cache.page_size, cache.device,
                         what="tokens", unique=unique, check_values=validate,
                         items="request-local tokens")
    if num_tokens is not None and num_tokens != tokens.shape[0]:
        raise ValueError(f"num_tokens: expected None or len(tokens) = {tokens.shape[0]}, "
                         f"got {num_tokens!r}")
    return page_ids, tokens.shape[0], layer_range, head_range, {"tokens": tokens}


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def pack_pages(cache: PagedKVCache, page_ids: torch.Tensor, *, num_tokens: int | None = None,
               token_offset: int = 0, tokens: torch.Tensor | None = None, layers=None,
               heads=None, region_tokens: int | None = None, out: torch.Tensor | None = None,
               digest: torch.Tensor | None = None, backend: str = "auto",
               validate: bool = True) -> torch.Tensor:
    """Gather a request's tokens from a paged pool into one contiguous packed slot.

    Args:
        cache: the source pool.
        page_ids: [n_pages] int32/int64 pool page ids of the request, in request order (a
            numpy array or list is converted; a strided tensor is made contiguous).
        num_tokens: how many tokens (packed rows); default every entry of the listed pages
            after ``token_offset``.
        token_offset: packed row j is request-local token ``token_offset + j`` (page
            ``page_ids[(token_offset + j) // page_size]``, entry ``(token_offset + j) %
            page_size``): a segment that starts mid-page. Default 0.
        tokens: [n_rows] int32/int64 tensor on the pool's device: packed row j is request-local
            token ``tokens[j]`` (a selection, e.g. the tokens a decode-context-parallel rank
            owns); with ``validate`` each must be in [0, len(page_ids) * page_size).
            Exclusive with ``token_offset``; ``num_tokens`` is then ``len(tokens)``.
        layers: layer range to pack (a pipeline stage): None, (start, stop), range or slice.
        heads: head range to pack (a tensor-parallel slice), same forms; default all heads.
        region_tokens: cut the slot into values of this many tokens (a divisor of
            ``num_tokens``): value v is the packed slot of tokens [v R, v R + R), so each value
            is one store page, page-major, straight from the kernel. Default: one slot.
        out: optional contiguous 1-D uint8 buffer (e.g. a staging slot) of at least the packed
            size, apart from the pool's memory (an overlapping one is refused).
        digest: optional [1] int64 tensor on the pool's device: the packed slot's digest
            (`cpkv.kernels.packed_digest`, position 0 = the slot's first byte) is added to it
            (mod 2**64), computed inside the kernel as the bytes pass (no second read on the
            GPU; the torch path reads the slot again). No host synchronisation.
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".
        validate: check every argument (reads ids and tokens back from the device); False
            skips the checks and makes no host synchronisation (nor any check): out-of-range
            ids or tokens, a 2-D or overlapping ``out`` then corrupt memory.

    Returns:
        [packed_nbytes] uint8, the packed slot (a view of ``out`` when given); its layout is
        ``cache.packed_format(num_tokens, layers=layers, heads=heads,
        region_tokens=region_tokens)``, which also says where each value and block lies.

    Example::

        cache = PagedKVCache.empty_mha(num_layers=2, num_pages=8, page_size=16, num_heads=4,
                                       head_dim=128, dtype=torch.bfloat16)
        slot = pack_pages(cache, torch.tensor([5, 2]), num_tokens=20)  # [20*2*2*4*256] uint8
        values = pack_pages(cache, torch.tensor([5, 2]), region_tokens=16)  # 2 store pages
        tail = pack_pages(cache, torch.tensor([5, 2]), token_offset=10, num_tokens=8)  # 10..17
        odd = pack_pages(cache, torch.tensor([5, 2]), tokens=torch.arange(1, 32, 2))  # 16 rows
    """
    page_ids, num_tokens, layer_range, head_range, place = _request(
        cache, page_ids, num_tokens, layers, heads, validate, unique=False,
        token_offset=token_offset, tokens=tokens, digest=digest)
    fmt = cache.packed_format(num_tokens, layers=layer_range, heads=head_range,
                              region_tokens=region_tokens)
    nbytes = fmt.nbytes
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=cache.device)
    elif validate:
        check_buffer(out, what="out", device=cache.device, min_nbytes=nbytes, dtype=torch.uint8,
                     ndim=1)
        check_no_alias(out[:nbytes], _pool_spans(cache), what="out")
    out = out[:nbytes]
    _move(cache, page_ids, fmt, layer_range, head_range, out, place, digest,
          _use_triton(backend, cache.device), unpack=False)
    return out


def _move(cache: PagedKVCache, page_ids: torch.Tensor, fmt: PackedFormat, layers: range,
          heads: range, slot: torch.Tensor, place: dict, digest, use_triton: bool, *,
          unpack: bool) -> None:
    """Pack into (or unpack from) ``slot``, of format ``fmt``, on the chosen path; the digest
    inside the kernel, or over the slot after the torch path."""
    if not fmt.nbytes:
        return
    if use_triton:
        regions = {} if fmt.region_tokens is None else {
            "rows_per_region": fmt.region_tokens, "region_nbytes": fmt.region_nbytes}
        _launch(cache, page_ids, fmt.num_tokens, layers, heads, slot, unpack=unpack,
                **regions, **place, digest=digest)
        return
    where = dict(region_tokens=fmt.region_tokens, **place)
    if unpack:
        unpack_pages_torch(slot, cache, page_ids, fmt.num_tokens, layers, heads, **where)
    else:
        pack_pages_torch(cache, page_ids, fmt.num_tokens, layers, heads, slot, **where)
    if digest is not None:  # the torch path reads the slot again
        add_digest(slot, digest)


def unpack_pages(packed: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor, *,
                 num_tokens: int | None = None, token_offset: int = 0,
                 tokens: torch.Tensor | None = None, layers=None, heads=None,
                 region_tokens: int | None = None, format: PackedFormat | None = None,
                 digest: torch.Tensor | None = None, backend: str = "auto",
                 validate: bool = True) -> None:
    """Scatter a packed slot into a paged pool: the inverse of `pack_pages`.

    Packed row j lands at request-local token t = ``token_offset + j`` (or ``tokens[j]``): page
    ``page_ids[t // cache.page_size]``, entry ``t % cache.page_size``; the destination page size
    need not be the sender's. ``heads`` places the packed head slice at any head offset of the
    destination. Pages not listed, and entries of listed pages no row lands in (the first
    ``token_offset`` tokens: a prefix already there; entries past the last token), are never
    written.

    Args:
        packed: contiguous buffer of exactly the packed size; uint8, or the pool's dtype; apart
            from the pool's memory (an overlapping one is refused).
        cache: the destination pool.
        page_ids: [n_pages] int32/int64 distinct destination page ids, in request order.
        num_tokens, layers, heads, backend, validate: as in `pack_pages`, for the destination.
        token_offset, tokens: as in `pack_pages`, where the rows land; ``tokens`` must be
            distinct (checked with ``validate``: two rows into one token are a race).
        region_tokens: ``packed`` is cut into values of this many tokens (as `pack_pages`
            writes them: store pages, page-major); any destination page size.
        format: the sender's `PackedFormat`; when given it must equal the destination's, which
            catches a head_dim, dtype, head-count, token-count or region mismatch by name.
        digest: as in `pack_pages`: the digest of ``packed`` is added to it; equal to the
            sender's pack digest when the bytes arrived unchanged (`cpkv.kernels.digest` says
            which changes a difference is guaranteed to reveal).

    Example::

        unpack_pages(slot, decode_cache, torch.tensor([0, 1, 2]), num_tokens=20)  # page_size 8
        # a 20-token segment after a 5-token prefix already in page 0: tokens 5..24
        unpack_pages(slot, decode_cache, torch.tensor([0, 1, 2, 3]), token_offset=5,
                     num_tokens=20)
    """
    page_ids, num_tokens, layer_range, head_range, place = _request(
        cache, page_ids, num_tokens, layers, heads, validate, unique=True,
        token_offset=token_offset, tokens=tokens, digest=digest)
    expected = cache.packed_format(num_tokens, layers=layer_range, heads=head_range,
                                   region_tokens=region_tokens)
    if validate:
        if format is not None:
            if not isinstance(format, PackedFormat):
                raise TypeError(f"format: expected PackedFormat, got {type(format).__name__}")
            format.check_matches(expected)
        check_buffer(packed, what="packed", device=cache.device, nbytes=expected.nbytes)
        check_no_alias(packed, _pool_spans(cache), what="packed")
        if packed.dtype != torch.uint8:
            for spec in cache.components:
                if spec.dtype != packed.dtype:
                    raise TypeError(f"packed: dtype {packed.dtype} differs from the destination "
                                    f"component {spec.name!r} dtype {spec.dtype}")
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    _move(cache, page_ids, expected, layer_range, head_range, packed, place, digest,
          _use_triton(backend, cache.device), unpack=True)


def reorganize_pages(gathered: torch.Tensor, cache: PagedKVCache, page_ids: torch.Tensor,
                     token_map: torch.Tensor, *, rows_per_rank: int, layers=None,
                     backend: str = "auto", validate: bool = True) -> None:
    """Write gathered packed regions into the pool through a token map, in one launch.

    ``gathered`` holds equal regions, each a packed slot (see `pack_pages`) of ``rows_per_rank``
    tokens over ``layers`` and all heads. Request-local token t (page ``page_ids[t // ps]``,
    entry ``t % ps``) receives gathered row ``g = token_map[t]`` (row ``g % rows_per_rank`` of
    region ``g // rows_per_rank``), and is left untouched where ``g < 0``. Nothing else in the
    pool is written. `cpkv.cp` builds the map from a split plan (undoing zigzag/interleave, skipping
    padding and tokens already in the pages); the kernels know nothing of splits.

    Args:
        gathered: contiguous 1-D uint8 [n_regions * cache.packed_nbytes(rows_per_rank,
            layers=)], apart from the pool's memory.
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
        _launch(cache, page_ids, num_tokens, layer_range, range(cache.num_heads),
                gathered.reshape(-1),
                unpack=True, token_map=token_map, rows_per_region=rows_per_rank,
                region_nbytes=region)
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
    check_count(rows_per_rank, "rows_per_rank")
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
    check_buffer(gathered, what="gathered", device=cache.device, dtype=torch.uint8, ndim=1)
    check_no_alias(gathered, _pool_spans(cache), what="gathered")
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
