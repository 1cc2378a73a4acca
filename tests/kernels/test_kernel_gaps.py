"""Kernel-side cases the mutation run (scripts/mutate.py) found untested: each test here fails
on a named mutant of scripts/mutants.py and passes on the code."""

import pytest
import torch
from kvtest import assert_bytes_equal, kernel_device, make_cache, mha, on, oracle_pack, pool_on

from cpkv import PagedKVCache
from cpkv.kernels import pack_pages, unpack_pages

P, PS, H, D = 4, 4, 2, 8  # a bf16 layer is P * PS * H * D * 2 = 512 bytes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_pool_packs_into_slots_of_other_alignments(backend):
    """The launch plan is cached per pool; a plan made for a 16-byte aligned slot must not be
    reused for a slot at an odd address (k-plan-cache-key)."""
    cache = make_cache(mha(num_heads=2, head_dim=64), num_layers=2, num_pages=6, page_size=4)
    dev = kernel_device(backend)
    moved, ids = pool_on(cache, dev), torch.tensor([4, 0, 2], dtype=torch.int32)
    nbytes = cache.packed_nbytes(10)
    want = oracle_pack(cache, ids, 10, range(2), range(2))
    for offset in (0, 1, 2, 16, 1):  # aligned first, so the cached plan is the widest
        buf = torch.zeros(nbytes + 16, dtype=torch.uint8, device=dev)
        out = pack_pages(moved, on(ids, dev), num_tokens=10, out=buf[offset:offset + nbytes],
                         backend=backend)
        assert_bytes_equal(out.cpu(), want, f"packed at offset {offset}")
        unpacked = pool_on(make_cache(mha(num_heads=2, head_dim=64), num_layers=2, num_pages=6,
                                      page_size=4, seed=3), dev)
        unpack_pages(out, unpacked, on(ids, dev), num_tokens=10, backend=backend)
        assert_bytes_equal(pack_pages(unpacked, on(ids, dev), num_tokens=10,
                                      backend=backend).cpu(), want, f"round trip {offset}")


def pool_in(storage: torch.Tensor) -> PagedKVCache:
    """K and V of one layer, back to back at the start of ``storage`` (uint8)."""
    layer = P * PS * H * D * 2
    k = storage[:layer].view(torch.bfloat16).view(P, PS, H, D)
    v = storage[layer:2 * layer].view(torch.bfloat16).view(P, PS, H, D)
    return PagedKVCache.mha([k], [v])


@pytest.mark.parametrize("start,what", [(-1, "the pool's last byte"),
                                        (-100, "the pool's last 100 bytes"),
                                        (-1024, "the whole pool (and more)")])
def test_out_overlapping_the_pool_is_refused(start, what):
    """An ``out`` whose bytes meet the pool's anywhere is refused and nothing is written:
    overlapping by its last byte only (c-span-extent), or partly (c-alias-partial)."""
    pool_bytes = 2 * P * PS * H * D * 2
    storage = torch.randint(0, 256, (pool_bytes + 4096,), dtype=torch.uint8)
    cache = pool_in(storage)
    nbytes = cache.packed_nbytes(8)
    before = storage.clone()
    out = storage[pool_bytes + start:pool_bytes + start + nbytes]
    with pytest.raises(ValueError, match="expected a buffer apart from the pool"):
        pack_pages(cache, torch.tensor([1, 3]), num_tokens=8, out=out)
    assert torch.equal(storage, before), f"an out over {what} was written"
    with pytest.raises(ValueError, match="expected a buffer apart from the pool"):
        unpack_pages(out, cache, torch.tensor([1, 3]), num_tokens=8)
    assert torch.equal(storage, before)


def test_out_right_after_the_pool_is_accepted():
    """The boundary the two tests above pin from the other side: adjacent is not overlapping."""
    pool_bytes = 2 * P * PS * H * D * 2
    storage = torch.randint(0, 256, (pool_bytes + 4096,), dtype=torch.uint8)
    cache = pool_in(storage)
    nbytes = cache.packed_nbytes(8)
    out = pack_pages(cache, torch.tensor([1, 3]), num_tokens=8,
                     out=storage[pool_bytes:pool_bytes + nbytes])
    assert_bytes_equal(out, oracle_pack(cache, torch.tensor([1, 3]), 8, range(1), range(H)),
                       "packed next to the pool")
