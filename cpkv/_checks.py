"""Input checks shared by cpkv's public functions.

Each raises ValueError/TypeError naming what was expected and what came. Checks that read tensor
values (min/max/uniqueness) synchronise with the device; callers skip them when validate=False.
"""

from __future__ import annotations

import numpy as np
import torch

# The int predicates live in cpkv.parallel (which may import nothing of cpkv); from here on,
# every module takes them from this one.
from .parallel import check_count, check_index, is_int

__all__ = ["as_page_ids", "byte_span", "check_buffer", "check_count", "check_index", "check_int",
           "check_no_alias", "check_num_tokens", "check_seconds", "is_index", "is_int"]

INDEX_DTYPES = (torch.int32, torch.int64)
SMALL_IDS = 4096  # up to here a Python set finds duplicates faster than torch.unique (CPU)


def as_page_ids(page_ids, num_pages: int, device: torch.device, *, what: str = "page_ids",
                unique: bool = False, check_values: bool = True,
                items: str = "page ids") -> torch.Tensor:
    """The ids as a contiguous 1-D int32/int64 tensor on ``device``, checked.

    A numpy array or a list/tuple of ints is converted once (int64 unless numpy int32); a
    strided tensor is made contiguous, so a kernel never reads memory the view does not show.
    Any other index list (request-local ``tokens``) is checked the same way (``items`` names
    them in the messages), with ``num_pages`` the bound of its values.
    ``check_values`` reads the values back (min/max, and uniqueness with ``unique``): a device
    synchronisation, skipped under ``validate=False``; the type, shape and device checks are
    free and always run.
    """
    if not isinstance(page_ids, torch.Tensor):
        if isinstance(page_ids, np.ndarray):
            if page_ids.dtype not in (np.int32, np.int64):
                raise TypeError(f"{what}: expected an int32 or int64 array, "
                                f"got dtype {page_ids.dtype}")
            page_ids = torch.from_numpy(np.ascontiguousarray(page_ids)).to(device)
        elif isinstance(page_ids, (list, tuple)):
            if not all(is_index(v) for v in page_ids):
                raise TypeError(f"{what}: expected a list of ints")
            page_ids = torch.tensor(page_ids, dtype=torch.int64, device=device)
        else:
            raise TypeError(f"{what}: expected a torch.Tensor, numpy array or list of ints, "
                            f"got {type(page_ids).__name__}")
    if page_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{what}: expected dtype int32 or int64, got {page_ids.dtype}")
    if page_ids.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D tensor, got shape {tuple(page_ids.shape)}")
    if page_ids.device != device:
        raise ValueError(f"{what}: expected device {device}, got {page_ids.device}")
    page_ids = page_ids.contiguous()
    if not check_values or page_ids.numel() == 0:
        return page_ids
    lo, hi = int(page_ids.min()), int(page_ids.max())
    if lo < 0 or hi >= num_pages:
        raise ValueError(f"{what}: expected values in [0, {num_pages}), got min {lo}, max {hi}")
    if unique and (len(set(page_ids.tolist())) if page_ids.numel() <= SMALL_IDS and
                   page_ids.device.type == "cpu" else torch.unique(page_ids).numel()
                   ) != page_ids.numel():
        raise ValueError(f"{what}: expected distinct {items} (one written twice is a race), "
                         f"got duplicates")
    return page_ids


def check_num_tokens(num_tokens, n_pages: int, page_size: int, token_offset: int = 0) -> int:
    """``num_tokens`` defaults to every entry of the listed pages after the first
    ``token_offset`` tokens and may not exceed them."""
    if not is_int(token_offset):
        raise TypeError(f"token_offset: expected int, got {type(token_offset).__name__}")
    if not 0 <= token_offset <= n_pages * page_size:
        raise ValueError(f"token_offset: expected 0 <= token_offset <= {n_pages * page_size} "
                         f"({n_pages} pages x page_size {page_size}), got {token_offset}")
    capacity = n_pages * page_size - token_offset
    if num_tokens is None:
        return capacity
    if not is_int(num_tokens):
        raise TypeError(f"num_tokens: expected int, got {type(num_tokens).__name__}")
    if not 0 <= num_tokens <= capacity:
        after = f" after token_offset {token_offset}" if token_offset else ""
        raise ValueError(f"num_tokens: expected 0 <= num_tokens <= {capacity} "
                         f"({n_pages} pages x page_size {page_size}{after}), got {num_tokens}")
    return num_tokens


def check_buffer(buf, *, what: str, device: torch.device, min_nbytes: int | None = None,
                 nbytes: int | None = None, dtype: torch.dtype | None = None,
                 ndim: int | None = None) -> None:
    """A contiguous tensor on ``device`` of the given dtype, byte size and (if given) rank."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(buf).__name__}")
    if ndim is not None and buf.dim() != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D tensor, got shape {tuple(buf.shape)}")
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


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) addresses a (possibly strided) tensor view's bytes lie in."""
    lo = t.data_ptr()
    if t.numel() == 0:
        return lo, lo
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
    return lo, lo + extent * t.element_size()


def check_no_alias(buf: torch.Tensor, spans, *, what: str) -> None:
    """Refuse a buffer whose bytes overlap any of ``spans`` (`byte_span` of e.g. the pool's own
    layers): a copy between overlapping memory would corrupt both. Host-only, no sync."""
    lo, hi = byte_span(buf)
    for s_lo, s_hi in spans:
        if lo < s_hi and s_lo < hi:
            raise ValueError(f"{what}: expected a buffer apart from the pool, got one overlapping "
                             f"a pool tensor's memory ({hi - lo} bytes at {lo:#x})")


def is_index(value) -> bool:
    """An int or numpy integer that is not a bool: an element of a host id or length list."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_seconds(value, what: str, *, allow_zero: bool = False) -> float:
    """``value`` as seconds: an int or float (not a bool), positive (or, with ``allow_zero``,
    non-negative); ValueError naming ``what`` otherwise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
            or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{what}: expected a {kind} number of seconds, got {value!r}")
    return value


def check_int(value, what: str, minimum: int | None = 0, maximum: int | None = None) -> int:
    """``value`` as a checked int: TypeError if it is not one (bools and floats included),
    ValueError outside ``[minimum, maximum]``. Returns it."""
    if not is_int(value):
        raise TypeError(f"{what}: expected an int, got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{what}: expected an int {bounds}, got {value}")
    return value
