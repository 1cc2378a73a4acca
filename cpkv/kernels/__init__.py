"""Triton kernels that move paged KV between a pool and contiguous staging slots.

Set ``TRITON_INTERPRET=1`` before importing this package to run the Triton path on CPU tensors.
"""

from .pack import pack_pages, unpack_pages

__all__ = ["pack_pages", "unpack_pages"]
