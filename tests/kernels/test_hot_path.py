"""The kernels' hot path: no host synchronisation under validate=False, buffers that alias the
pool refused, launches under the pool's device."""

import sys
from pathlib import Path

import pytest
import torch
from kvtest import (
    SENTINEL,
    assert_cache_equals,
    make_cache,
    mha,
    pool_on,
    snapshot,
)

import cpkv
from cpkv import PagedKVCache
from cpkv.kernels import pack_pages, reorganize_pages, unpack_pages
from cpkv.kernels.paged_copy import _device_guard

CPKV_DIR = str(Path(cpkv.__file__).parent)
# Tensor methods that wait for the device (or copy to pageable host memory).
SYNCS = ("item", "cpu", "tolist", "numpy", "__int__", "__bool__", "__float__", "__index__")


class SyncCounter:
    """Counts the calls of SYNCS (and torch.cuda.synchronize) made from cpkv's own code; the
    Triton interpreter's internals (CPU machines) are not the hot path and are not counted."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize",
                            self._wrap("cuda.synchronize", torch.cuda.synchronize))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(CPKV_DIR):
                self.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return fn(*args, **kwargs)
        return counted


def test_validate_false_makes_no_host_sync(monkeypatch, kernel_device):
    dev = kernel_device
    src = pool_on(make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=4, seed=1),
                  dev)
    dst = pool_on(make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=4, seed=2),
                  dev)
    ids = torch.tensor([4, 1, 3], dtype=torch.int32, device=dev)
    out = torch.empty(src.packed_nbytes(10), dtype=torch.uint8, device=dev)
    token_map = torch.tensor([0, 1, -1, 2, 3, 4, 5, 6, -1, 7], dtype=torch.int64, device=dev)
    gathered = pack_pages(src, ids, num_tokens=8)

    def calls():
        pack_pages(src, ids, num_tokens=10, out=out, backend="triton", validate=False)
        unpack_pages(out, dst, ids, num_tokens=10, backend="triton", validate=False)
        pack_pages(src, ids, num_tokens=10, region_tokens=5, out=out, backend="triton",
                   validate=False)
        unpack_pages(out, dst, ids, num_tokens=10, region_tokens=5, backend="triton",
                     validate=False)
        reorganize_pages(gathered, dst, ids, token_map, rows_per_rank=8, backend="triton",
                         validate=False)

    calls()  # the first call of a geometry builds its descriptor tables (once per pool)
    counter = SyncCounter(monkeypatch)
    calls()
    monkeypatch.undo()
    assert counter.calls == []
    # ... and the counter does see the validating path's reads of the ids.
    counter = SyncCounter(monkeypatch)
    pack_pages(src, ids, num_tokens=10, out=out, backend="triton")
    monkeypatch.undo()
    assert counter.calls


def test_out_must_be_one_dimensional():
    src = make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=4)
    nbytes = src.packed_nbytes(8)
    out = torch.full((2, nbytes), SENTINEL, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"out: expected a 1-D tensor, got shape \(2, "):
        pack_pages(src, [1, 2], out=out)
    assert bool((out == SENTINEL).all())


def _pool_in(buffer: torch.Tensor, specs, num_layers, num_pages, page_size) -> PagedKVCache:
    """A pool whose layer tensors are views of ``buffer`` (uint8), back to back."""
    comps, pos = {}, 0
    for s in specs:
        shape = (num_layers, num_pages, page_size, s.num_heads, s.head_dim)
        n = torch.Size(shape).numel() * s.itemsize
        comps[s.name] = buffer[pos:pos + n].view(s.dtype).view(shape)
        pos += n
    return PagedKVCache(comps, stacked=True)


@pytest.mark.parametrize("op", ["pack-out", "unpack-packed", "reorganize-gathered"])
def test_buffers_overlapping_the_pool_are_refused(op):
    specs = mha(num_heads=2, head_dim=32)
    backing = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    cache = _pool_in(backing, specs, 2, 4, 4)
    nbytes = cache.packed_nbytes(8)
    buf = backing[1000:1000 + nbytes]  # inside K's layer 0
    before, buf_before = snapshot(cache), buf.clone()
    with pytest.raises(ValueError, match="apart from the pool"):
        if op == "pack-out":
            pack_pages(cache, [1, 2], out=buf)
        elif op == "unpack-packed":
            unpack_pages(buf, cache, [1, 2])
        else:
            reorganize_pages(buf, cache, [1, 2], torch.arange(8), rows_per_rank=8)
    assert_cache_equals(cache, before, "pool")
    assert torch.equal(buf, buf_before)
    # The bytes right after the pool are fine.
    end = sum(t.numel() * t.element_size() for ts in cache.buffers.values() for t in ts)
    pack_pages(cache, [1, 2], out=backing[end:end + nbytes])


def test_device_guard_is_a_no_op_on_cpu():
    before = torch.cuda.current_device() if torch.cuda.is_available() else None
    with _device_guard(torch.device("cpu")):
        pass
    if before is not None:
        assert torch.cuda.current_device() == before


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_pool_on_the_second_gpu_launches_there():
    """With cuda:0 current, a pool on cuda:1 is packed by a kernel on cuda:1 (else Triton
    would launch on cuda:0 with cuda:1 pointers: a fault or garbage)."""
    src = make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=16)
    want = pack_pages(src, [4, 1], num_tokens=20, backend="torch")
    gpu = PagedKVCache({n: [t.to("cuda:1") for t in ts] for n, ts in src.buffers.items()})
    torch.cuda.set_device(0)
    got = pack_pages(gpu, torch.tensor([4, 1], device="cuda:1"), num_tokens=20)
    assert torch.cuda.current_device() == 0
    assert torch.equal(got.cpu(), want)
