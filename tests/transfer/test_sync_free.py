"""Zero device synchronisations on the send and receive paths once the entry has validated
(issue 15): every host sync (`syncs.HOST_SYNCS`: a tensor read back with `item`, `cpu`,
`tolist`, `numpy`, `bool`, `int`...; `torch.cuda.synchronize`; an event's or a stream's
`synchronize`) is counted on the agents' threads (sender worker, landing and I/O; receiver
worker and I/O) and in `wait`, on the CPU path where the same calls would be device syncs on a
GPU. The counter itself is shown to see each kind of host sync, and not the device-side
orderings (`Event.wait`, `Stream.wait_event` / `wait_stream`), which do not block the host."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack
from syncs import AGENT_THREADS, CPKV_DIR, SyncCounter
from txtest import Group

from cpkv.cp import GatherDone
from cpkv.transfer import KVStatus


def test_send_and_receive_paths_read_nothing_back(rig, monkeypatch):
    counted = SyncCounter(monkeypatch, threads=AGENT_THREADS)  # and, below, in `wait`
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


def device_objects(monkeypatch):
    """A CUDA event and two streams. Without CUDA: the classes' methods that would call the
    driver replaced by no-ops (the counter wraps what is there, as it wraps the real ones on a
    GPU; torch's own `Stream.wait_event` / `wait_stream` stay and call them), and instances
    made without a device."""
    if torch.cuda.is_available():
        return torch.cuda.Event(), torch.cuda.Stream(), torch.cuda.Stream()

    def nothing(*args, **kwargs):
        return None

    for owner, name in [(torch.cuda, "synchronize"), (torch.accelerator, "synchronize"),
                        (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "wait"),
                        (torch.cuda.Event, "record"), (torch.cuda.Stream, "synchronize")]:
        monkeypatch.setattr(owner, name, nothing)
    monkeypatch.setattr(torch.cuda.Stream, "record_event",
                        lambda self, event=None: event or object.__new__(torch.cuda.Event))
    return (object.__new__(torch.cuda.Event), object.__new__(torch.cuda.Stream),
            object.__new__(torch.cuda.Stream))


# name -> (the call on (event, stream, other stream), counted: the host waits for the device)
CALLS = {
    "torch.cuda.synchronize": (lambda e, s, o: torch.cuda.synchronize(), True),
    "torch.accelerator.synchronize": (lambda e, s, o: torch.accelerator.synchronize(), True),
    "Event.synchronize": (lambda e, s, o: e.synchronize(), True),
    "Stream.synchronize": (lambda e, s, o: s.synchronize(), True),
    "Event.wait": (lambda e, s, o: e.wait(s), False),
    "Stream.wait_event": (lambda e, s, o: s.wait_event(e), False),
    "Stream.wait_stream": (lambda e, s, o: s.wait_stream(o), False),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_the_counter_sees_each_host_sync_on_an_agents_thread(call, monkeypatch):
    """Made on a thread named as a sender's worker is, a host sync is counted once, by name;
    a device-side ordering is not; neither is counted on another thread."""
    event, stream, other = device_objects(monkeypatch)
    counter = SyncCounter(monkeypatch, threads=AGENT_THREADS)
    fn, host_sync = CALLS[call]
    fn(event, stream, other)  # the test's own thread: not an agent's
    assert counter.calls == []
    with ThreadPoolExecutor(1, thread_name_prefix="cpkv-send-prefill-cp0") as agent:
        agent.submit(fn, event, stream, other).result()
    assert [c.split(" from ")[0] for c in counter.calls] == ([call] if host_sync else [])
    assert all(c.endswith("on cpkv-send-prefill-cp0_0") for c in counter.calls), counter.calls


def test_the_counter_sees_an_event_synchronize_in_cpkvs_code(monkeypatch):
    """Counting calls from cpkv's files (the kernels' hot-path check): `GatherDone.synchronize`
    blocks the host on its event and is counted; `GatherDone.wait` orders a stream, is not."""
    event, stream, _ = device_objects(monkeypatch)
    counter = SyncCounter(monkeypatch, files=[CPKV_DIR])
    done = GatherDone(event, torch.device("cuda", 0))
    done.wait(stream)
    assert counter.calls == []
    done.synchronize()
    assert len(counter.calls) == 1, counter.calls
    assert counter.calls[0].startswith("Event.synchronize from ") and \
        "cpkv/cp/gather.py:" in counter.calls[0], counter.calls
