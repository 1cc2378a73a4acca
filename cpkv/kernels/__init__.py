"""Triton kernels that move paged KV between a pool and contiguous staging slots.

Set ``TRITON_INTERPRET=1`` before importing this package to run the Triton path on CPU tensors.
"""

from .digest import packed_digest
from .paged_copy import pack_pages, reorganize_pages, unpack_pages

__all__ = ["pack_pages", "packed_digest", "reorganize_pages", "unpack_pages"]
