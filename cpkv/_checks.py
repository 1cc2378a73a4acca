"""Input checks shared by cpkv's public functions.

Each raises ValueError/TypeError naming what was expected and what came. Checks that read tensor
values (min/max/uniqueness) synchronise with the device; callers skip them when validate=False.
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def check_page_ids(page_ids, num_pages: int, device: torch.device, *, what: str = "page_ids",
                   unique: bool = False) -> None:
    """1-D int32/int64 ids on ``device`` with every value in [0, num_pages)."""
    if not isinstance(page_ids, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(page_ids).__name__}")
    if page_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{what}: expected dtype int32 or int64, got {page_ids.dtype}")
    if page_ids.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D tensor, got shape {tuple(page_ids.shape)}")
    if page_ids.device != device:
        raise ValueError(f"{what}: expected device {device}, got {page_ids.device}")
    if page_ids.numel() == 0:
        return
    lo, hi = int(page_ids.min()), int(page_ids.max())
    if lo < 0 or hi >= num_pages:
        raise ValueError(f"{what}: expected values in [0, {num_pages}), got min {lo}, max {hi}")
    if unique and torch.unique(page_ids).numel() != page_ids.numel():
        raise ValueError(f"{what}: expected distinct page ids (a page written twice is a race), "
                         f"got duplicates")


def check_num_tokens(num_tokens, n_pages: int, page_size: int) -> int:
    """``num_tokens`` defaults to every slot of the listed pages and may not exceed them."""
    capacity = n_pages * page_size
    if num_tokens is None:
        return capacity
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool):
        raise TypeError(f"num_tokens: expected int, got {type(num_tokens).__name__}")
    if not 0 <= num_tokens <= capacity:
        raise ValueError(f"num_tokens: expected 0 <= num_tokens <= {capacity} "
                         f"({n_pages} pages x page_size {page_size}), got {num_tokens}")
    return num_tokens


def check_buffer(buf, *, what: str, device: torch.device, min_nbytes: int | None = None,
                 nbytes: int | None = None, dtype: torch.dtype | None = None) -> None:
    """A contiguous tensor on ``device`` of the given dtype and byte size."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(buf).__name__}")
    if dtype is not None and buf.dtype != dtype:
        raise TypeError(f"{what}: expected dtype {dtype}, got {buf.dtype}")
    if buf.device != device:
        raise ValueError(f"{what}: expected device {device}, got {buf.device}")
    if not buf.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous tensor, got strides {buf.stride()}")
    size = buf.numel() * buf.element_size()
    if min_nbytes is not None and size < min_nbytes:
        raise ValueError(f"{what}: expected at least {min_nbytes} bytes, got {size}")
    if nbytes is not None and size != nbytes:
        raise ValueError(f"{what}: expected {nbytes} bytes for this geometry, got {size}")
