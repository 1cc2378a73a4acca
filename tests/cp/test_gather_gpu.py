"""all_gather_kv and the symmetric arena on CUDA, with a group of one (NCCL). GPU-only."""

import datetime

import pytest
import torch
import torch.distributed as dist
from kvtest import (
    assert_cache_equals,
    fill_sentinel,
    full_kv,
    local_shard,
    mha,
    oracle_sequence_pool,
)

from cpkv import PagedKVCache
from cpkv.cp import GatherDone, all_gather_kv, gather_nbytes, zigzag_split
from cpkv.staging import ArenaError, StagingArena

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_group():
    from mp import free_port
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60),
                            device_id=torch.device("cuda", 0))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _cuda_cache(specs, pages, ps):
    cache = PagedKVCache.empty(specs, num_layers=2, num_pages=pages, page_size=ps, device="cuda")
    return fill_sentinel(cache)


@pytest.mark.parametrize("arena_backend", ["cuda", "symmetric"])
def test_gather_on_cuda_returns_an_event(nccl_group, arena_backend):
    plan = zigzag_split([9, 7], 1)
    cache = _cuda_cache(mha(), 8, 4)
    pages = [torch.tensor([5, 1, 6], device="cuda"), torch.tensor([2, 0], device="cuda")]
    full = full_kv(mha(), 2, plan.total_len, seed=2)
    want = oracle_sequence_pool(cache, {n: t.cuda() for n, t in full.items()}, plan.seq_lens,
                                [p.cpu() for p in pages], range(2))
    with StagingArena(1 << 20, backend=arena_backend, group=nccl_group) as arena:
        if arena_backend == "symmetric":
            assert arena.symmetric_backend is None or isinstance(arena.symmetric_backend, str)
        with arena.alloc(gather_nbytes(cache, plan)) as slot:
            local = {n: t.cuda() for n, t in local_shard(full, plan, 0).items()}
            done = all_gather_kv(local, plan, cache, pages, slot=slot, group=nccl_group)
            assert isinstance(done, GatherDone) and done.event is not None
            done.synchronize()
            assert done.query()
    assert_cache_equals(cache, want)


def test_symmetric_backend_that_is_not_in_force_raises(nccl_group):
    with pytest.raises(ArenaError, match="symmetric backend 'NO-SUCH'"):
        StagingArena(1 << 20, backend="symmetric", group=nccl_group,
                     symmetric_backend="NO-SUCH")
