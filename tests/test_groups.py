"""The group MIN (`cpkv._groups`): status agreement and store prefix hits reduce where the
group's backend can (CPU tensors for gloo, CUDA tensors for NCCL, which refuses CPU ones)."""

import datetime

import pytest
import torch
import torch.distributed as dist
from mp import free_port

from cpkv._groups import group_device, group_min
from cpkv.store import KVStore
from cpkv.transfer import KVStatus, agree


def _world(backend: str):
    extra = {"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60), **extra)


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_min_over_the_groups_backend(backend):
    _world(backend)
    try:
        assert group_device(None).type == ("cuda" if backend == "nccl" else "cpu")
        statuses = [KVStatus.Success, KVStatus.Transferring, KVStatus.Failed]
        assert agree(statuses, [None, None]) == statuses  # None: the default group, reduced
        assert group_min([7, 2], [None, dist.group.WORLD]) == [7, 2]
        assert KVStore.agree(5, dist.group.WORLD) == 5 and KVStore.agree(5) == 5
    finally:
        dist.destroy_process_group()


def test_no_group_is_no_collective():
    assert not dist.is_initialized()
    assert group_min([3, 1], []) == [3, 1]
    assert agree([KVStatus.Bootstrapping], []) == [KVStatus.Bootstrapping]
