"""Zero device synchronisations on the send and receive paths once the entry has validated
(issue 15): every host read of a tensor (`item`, `cpu`, `tolist`, `numpy`, `bool`, `int`,
`torch.cuda.synchronize`, stream/event waits) is counted on the agents' threads (sender
worker, landing and I/O; receiver worker and I/O) and in `wait`, on the CPU path where the
same calls would be device syncs on a GPU."""

import threading

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack
from txtest import Group

from cpkv.transfer import KVStatus

HOST_READS = ["item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__"]


@pytest.fixture
def counted(monkeypatch):
    """Count host reads made on the agents' threads, or while `counted.on` is set."""
    calls, state = [], threading.local()

    def counting(name, original):
        def wrapper(*args, **kwargs):
            thread = threading.current_thread().name
            if thread.startswith(("cpkv-send", "cpkv-recv")) or getattr(state, "on", False):
                calls.append((name, thread))
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("cuda.synchronize",
                                                            torch.cuda.synchronize))

    class Counter:
        def __init__(self):
            self.calls = calls

        def __enter__(self):
            state.on = True

        def __exit__(self, *exc):
            state.on = False

    return Counter()


def test_send_and_receive_paths_read_nothing_back(rig, counted):
    src = make_cache(mha(), num_layers=2, num_pages=12, page_size=4, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=2, num_pages=12, page_size=4, seed=2))
    g = Group(src, dst, rig)
    s_ids, d_ids, n = torch.tensor([3, 8, 1, 5]), torch.tensor([0, 9, 4, 2]), 14
    want = oracle_unpack(src, s_ids, dst, d_ids, n, range(2), range(2), range(2), range(2))
    g.expect(1, d_ids, n)  # entries: validation may read the ids back
    g.send(1, s_ids, n)
    with counted:
        statuses = g.wait(1)
    assert statuses == [KVStatus.Success] * 3
    assert counted.calls == [], counted.calls[:10]
    assert_cache_equals(dst, want)
    g.close()
