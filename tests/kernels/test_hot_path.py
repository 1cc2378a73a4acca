"""The kernels' hot path: no host synchronisation under validate=False, launches under the
pool's device."""

import pytest
import torch
from kvtest import (
    make_cache,
    mha,
    pool_on,
)
from syncs import CPKV_DIR, SyncCounter

from cpkv import PagedKVCache
from cpkv.kernels import pack_pages, reorganize_pages, unpack_pages
from cpkv.kernels.paged_copy import _device_guard


def test_validate_false_makes_no_host_sync(monkeypatch, kernel_device):
    dev = kernel_device
    src = pool_on(make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=4, seed=1),
                  dev)
    dst = pool_on(make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=4, seed=2),
                  dev)
    ids = torch.tensor([4, 1, 3], dtype=torch.int32, device=dev)
    out = torch.empty(src.packed_nbytes(10), dtype=torch.uint8, device=dev)
    token_map = torch.tensor([0, 1, -1, 2, 3, 4, 5, 6, -1, 7], dtype=torch.int64, device=dev)
    tokens = torch.tensor([11, 0, 6, 3], dtype=torch.int32, device=dev)
    digest = torch.zeros(1, dtype=torch.int64, device=dev)
    gathered = pack_pages(src, ids, num_tokens=8)

    def calls():
        pack_pages(src, ids, num_tokens=10, out=out, backend="triton", validate=False)
        unpack_pages(out, dst, ids, num_tokens=10, backend="triton", validate=False)
        pack_pages(src, ids, num_tokens=10, region_tokens=5, out=out, backend="triton",
                   validate=False)
        unpack_pages(out, dst, ids, num_tokens=10, region_tokens=5, backend="triton",
                     validate=False)
        pack_pages(src, ids, num_tokens=6, token_offset=5, out=out, backend="triton",
                   validate=False)
        unpack_pages(out[:src.packed_nbytes(4)], dst, ids, tokens=tokens, backend="triton",
                     validate=False)
        for backend in ("triton", "torch"):
            pack_pages(src, ids, num_tokens=10, out=out, digest=digest, backend=backend,
                       validate=False)
            unpack_pages(out, dst, ids, num_tokens=10, digest=digest, backend=backend,
                         validate=False)
        reorganize_pages(gathered, dst, ids, token_map, rows_per_rank=8, backend="triton",
                         validate=False)

    calls()  # the first call of a geometry builds its descriptor tables (once per pool)
    # counted where cpkv's own code calls: the Triton interpreter (CPU machines) is not the
    # hot path
    counter = SyncCounter(monkeypatch, files=[CPKV_DIR])
    calls()
    monkeypatch.undo()
    assert counter.calls == []
    # ... and the counter does see the validating path's reads of the ids.
    counter = SyncCounter(monkeypatch, files=[CPKV_DIR])
    pack_pages(src, ids, num_tokens=10, out=out, backend="triton")
    monkeypatch.undo()
    assert counter.calls


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
