"""`__all__` is the contract: this pins it."""

import cpkv
import cpkv.kernels


def test_top_level_api():
    assert sorted(cpkv.__all__) == ["ComponentSpec", "PackedFormat", "PagedKVCache",
                                    "__version__"]


def test_kernels_api():
    assert sorted(cpkv.kernels.__all__) == ["pack_pages", "unpack_pages"]
    for name in cpkv.kernels.__all__:
        assert callable(getattr(cpkv.kernels, name))
