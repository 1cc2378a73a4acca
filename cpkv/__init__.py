"""cpkv: move a context-parallel paged KV cache between LLM serving workers.

    from cpkv import PagedKVCache
    from cpkv.kernels import pack_pages, unpack_pages
"""

from .layout import ComponentSpec, PackedFormat, PagedKVCache

__version__ = "0.1.0"
__all__ = ["ComponentSpec", "PackedFormat", "PagedKVCache", "__version__"]
