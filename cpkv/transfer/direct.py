"""The per-page "direct" baseline: no staging, one descriptor per contiguous run, written
straight into the receiver's registered pool (SGLang semantics).

Runs break wherever either side's page ids stop advancing by one. Whole pages move when a route
carries every head on both sides (the last page whole too, as the baseline does); a head slice
can only move token by token, which is exactly why it is slow. Direct mode needs the same
page size and layout on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import is_int
from ..layout import PagedKVCache
from .mapping import Route

__all__ = ["contiguous_runs", "direct_descriptors", "direct_nbytes", "direct_segments",
           "pool_addresses"]


def contiguous_runs(src_ids: Sequence[int] | torch.Tensor,
                    dst_ids: Sequence[int] | torch.Tensor) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs in which both id lists advance by one.

    >>> contiguous_runs([4, 5, 6, 9, 10], [0, 1, 7, 8, 9])
    [(4, 0, 2), (6, 7, 1), (9, 8, 2)]
    """
    src = src_ids.tolist() if isinstance(src_ids, torch.Tensor) else list(src_ids)
    dst = dst_ids.tolist() if isinstance(dst_ids, torch.Tensor) else list(dst_ids)
    if len(src) != len(dst):
        raise ValueError(f"contiguous_runs: expected equally many ids, got {len(src)} and "
                         f"{len(dst)}")
    for what, ids in (("src_ids", src), ("dst_ids", dst)):
        bad = next((v for v in ids if not is_int(v) or v < 0), None)
        if bad is not None:
            raise ValueError(f"contiguous_runs: {what}: expected non-negative int page ids, "
                             f"got {bad!r}")
    runs = []
    for s, d in zip(src, dst, strict=True):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def pool_addresses(cache: PagedKVCache) -> list[dict]:
    """What a sender needs to address a receiver's pool: per (layer, component), the base
    address and the (page, entry, head) byte strides of the NHD view, layer-major."""
    out = []
    for layer in range(cache.num_layers):
        for spec in cache.components:
            t = cache.nhd_view(spec.name, layer)
            out.append({"addr": t.data_ptr(),
                        "strides": [s * spec.itemsize for s in t.stride()[:3]]})
    return out


def whole_pages(cache_heads: int, remote_heads: int, route: Route) -> bool:
    """Full heads on both sides: whole pages move (else token by token)."""
    return len(route.src_heads) == cache_heads == len(route.dst_heads) == remote_heads


def direct_descriptors(src_ids, dst_ids, num_tokens: int, num_blocks: int,
                       full_pages: bool) -> int:
    """Descriptors a direct send of one share uses: a contiguous page run per (layer,
    component) block with whole pages, else one per token per block."""
    if not full_pages:
        return num_tokens * num_blocks
    return len(contiguous_runs(src_ids, dst_ids)) * num_blocks


def direct_nbytes(bytes_per_token: int, page_size: int, pages: range, tokens: range,
                  full_pages: bool) -> int:
    """Bytes a direct send of this share writes (what the receiver expects to hear)."""
    return (len(pages) * page_size if full_pages else len(tokens)) * bytes_per_token


def direct_segments(cache: PagedKVCache, src_ids: torch.Tensor, remote: list[dict],
                    remote_heads: int, dst_ids: Sequence[int], pages: range, tokens: range,
                    route: Route, pairs: list[tuple[int, int]] | None = None
                    ) -> list[tuple[int, int, int]]:
    """(src_addr, dst_addr, nbytes) descriptors for one share of a request: whole page runs
    where both sides hold every head, else one per token. ``pairs`` (source position,
    destination position) list the tokens one by one instead (a decode-context-parallel
    destination, or one holding a prefix already): one per run of tokens that follow each
    other inside a page on both sides (a whole page where DCP's interleave is the page size),
    else one per token."""
    ps, n_comp = cache.page_size, len(cache.components)
    src_list = src_ids.tolist()
    full = pairs is None and whole_pages(cache.num_heads, remote_heads, route)
    if pairs is None:
        pairs = [(t, t) for t in tokens]
    segments = []
    for sl, dl in zip(route.src_layers, route.dst_layers, strict=True):
        for c, spec in enumerate(cache.components):
            t = cache.nhd_view(spec.name, sl)
            sp, ss, sh = (s * spec.itemsize for s in t.stride()[:3])
            dst = remote[dl * n_comp + c]
            dp, ds, dh = dst["strides"]
            base_s, base_d = t.data_ptr(), dst["addr"]
            head_bytes = spec.head_nbytes
            todo = pairs
            if full:
                page_bytes = ps * cache.num_heads * head_bytes
                dense = sp == dp == page_bytes and ss == ds == cache.num_heads * head_bytes \
                    and sh == dh == head_bytes
                if dense:  # a run of pages is one contiguous block on both sides
                    for s0, d0, n in contiguous_runs(src_list[pages.start:pages.stop],
                                                     dst_ids[pages.start:pages.stop]):
                        segments.append((base_s + s0 * sp, base_d + d0 * dp, n * page_bytes))
                    continue
                todo = [(tok, tok) for tok in range(pages.start * ps, pages.stop * ps)]
            n_heads = len(route.src_heads)
            heads_dense = sh == head_bytes and dh == head_bytes
            row = n_heads * head_bytes
            rows_dense = heads_dense and ss == ds == row  # a page's tokens are back to back
            for s_tok, d_tok in todo:
                s_addr = base_s + src_list[s_tok // ps] * sp + s_tok % ps * ss \
                    + route.src_heads.start * sh
                d_addr = base_d + dst_ids[d_tok // ps] * dp + d_tok % ps * ds \
                    + route.dst_heads.start * dh
                if rows_dense and segments and s_tok % ps and d_tok % ps and \
                        segments[-1][0] + segments[-1][2] == s_addr and \
                        segments[-1][1] + segments[-1][2] == d_addr:  # the run goes on
                    segments[-1] = (*segments[-1][:2], segments[-1][2] + row)
                elif heads_dense:
                    segments.append((s_addr, d_addr, row))
                else:
                    segments.extend((s_addr + h * sh, d_addr + h * dh, head_bytes)
                                    for h in range(n_heads))
    return segments
