"""The aliasing proof behind `PagedKVCache`: no two rows of a pool (across components and
layers) share a byte.

A write through one layer tensor must never change another (K and V aliasing, a layer listed
twice, a stride-0 axis). Views of one buffer that interleave without sharing bytes (fused K|V
halves, values and scales in one page) are legal and must pass, so the check reasons about
row footprints, not just address ranges: each layer tensor is a page period and the sorted
byte offsets of its (entry, head) rows inside one page; two tensors of one allocation with the
same page period are compared page by page near the pages where they could meet.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["check_no_overlap"]


def _footprint(t: torch.Tensor, layout: str, where: str):
    """(first byte, byte span, page stride in bytes, row bytes, row starts of page 0) of a
    layer tensor; raises if it overlaps itself (a stride-0 axis, interleaved axes)."""
    nhd = t if layout == "NHD" else t.transpose(1, 2)
    isz = t.element_size()
    row = nhd.shape[3] * isz
    span = row
    axes = sorted((nhd.stride(a) * isz, nhd.shape[a], a) for a in range(3) if nhd.shape[a] > 1)
    names = ("page", "entry", "head")
    for stride, size, a in axes:
        if stride < span:
            what = "stride 0: every index aliases one memory" if stride == 0 else \
                f"byte stride {stride} < {span} bytes it must step over"
            raise ValueError(f"{where}: the {names[a]} axis overlaps itself ({what}); "
                             f"expected every (page, entry, head) row at its own bytes")
        span += (size - 1) * stride
    page_stride = nhd.stride(0) * isz if nhd.shape[0] > 1 else span
    o_e = np.arange(nhd.shape[1], dtype=np.int64)[:, None] * (nhd.stride(1) * isz)
    o_h = np.arange(nhd.shape[2], dtype=np.int64)[None, :] * (nhd.stride(2) * isz)
    return t.data_ptr(), span, page_stride, row, np.sort((o_e + o_h).ravel())


def _rows_intersect(a: np.ndarray, ra: int, b: np.ndarray, rb: int) -> bool:
    """Do intervals [a_i, a_i + ra) and [b_j, b_j + rb) meet (a, b sorted)?"""
    i = np.searchsorted(b, a + ra, side="left")  # b_j < a_i + ra  <=>  j < i
    return bool(np.any((i > 0) & (b[np.maximum(i - 1, 0)] + rb > a)))


def check_no_overlap(buffers: Mapping[str, list[torch.Tensor]], layout: str) -> None:
    """Refuse a pool whose layer tensors share bytes (K and V aliasing, a layer twice, a
    stride-0 axis): a write through one would silently change another. Views of one buffer
    that interleave without sharing bytes (fused K|V halves, values + scales in one page) pass."""
    items = []
    for name, layers in buffers.items():
        for i, t in enumerate(layers):
            where = f"component {name!r} layer {i}"
            start, span, pstride, row, rows = _footprint(t, layout, where)
            n_pages = t.shape[0]
            items.append((t.untyped_storage().data_ptr(), start, start + span, pstride, row,
                          rows, n_pages, where))
    items.sort(key=lambda x: (x[0], x[1]))
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if b[0] != a[0] or b[1] >= a[2]:
                break
            if _shares_bytes(a, b):
                raise ValueError(f"{a[7]} and {b[7]} share memory (overlapping bytes); "
                                 f"expected every component and layer at its own bytes")


def _shares_bytes(a, b) -> bool:
    (_, sa, _, pa, ra, rows_a, na, _), (_, sb, _, pb, rb, rows_b, nb, _) = a, b
    fa, fb = int(rows_a[-1]) + ra, int(rows_b[-1]) + rb  # footprint of one page
    if pa != pb or fa > pa or fb > pb:
        return True  # not the same page period: cannot prove the rows disjoint
    if (sb - sa) % pa >= fa and (sa - sb) % pa >= fb:
        return False  # the page footprints never meet, whatever the page (e.g. other layers)
    k0 = (sb - sa) // pa  # page i of a meets page j of b only where i - j is near k0
    for k in range(k0 - 1, k0 + 2):
        if -(nb - 1) <= k <= na - 1 and _rows_intersect(rows_a + sa + k * pa, ra,
                                                         rows_b + sb, rb):
            return True
    return False
