"""Transfer completion cases the mutation run (scripts/mutate.py) found untested (issue 14):
each test fails on a named mutant of scripts/mutants.py and passes on the code. One process:
real Mooncake engines on TCP loopback, a real TCPStore; every failure is observed within a
short timeout the test sets."""

import threading
import time
import uuid

import pytest
import torch
from kvtest import (
    assert_untouched_outside,
    fill_sentinel,
    make_cache,
    mha,
    snapshot,
)
from txtest import close_all, group, wait_all

from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank
from cpkv.transfer import sender as sender_module
from cpkv.transfer.control import geometry
from cpkv.transfer.mapping import Route

PS = 4


def pools():
    src = make_cache(mha(), num_layers=2, num_pages=8, page_size=PS, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=2, num_pages=8, page_size=PS, seed=2))
    return src, dst


def rogue_receiver(rig, dst):
    """A receiver whose one sender the test plays through the control plane."""
    client = rig[3].scoped(uuid.uuid4().hex)
    client.put(client.key("reg", ParallelRank().key), {"inc": "rogue", "session": "x",
                                                       "geometry": geometry(dst)})
    recv = KVReceiver(dst, client, cp_size=1, timeout=5, engine=rig[0], arena=rig[2])
    return client, recv


def play(client, recv, rid, notes) -> str:
    """Append the sender's notes for ``rid``; returns the stream's key."""
    dest = client.get(client.key(recv.incarnation, "dest", rid))
    key = client.key(recv.incarnation, "use", dest["use"], "note", ParallelRank().key)
    for i, note in enumerate(notes):
        client.append(key, note, i)
    return key


def bytes_per_token(recv, dst) -> int:
    return recv.route_bpt[Route.whole(dst.num_heads, dst.num_layers).key]


# A sender that lies, played through the control plane: (pages, tokens, bytes short of what the
# tokens move, last) per note, the request's tokens, and what the refusal must name.
LIES = {
    # [0, 8) then [4, 8) as last of 12 tokens: 12 tokens counted, [8, 12) never arrived
    "overlap-plus-gap": ([((0, 2), (0, 8), 0, False), ((1, 2), (4, 8), 0, True)], 12,
                         "tokens [4, 8) were already received (layers [0, 2) overlap tokens "
                         "[0, 8) layers [0, 2))"),
    "fewer-bytes": ([((0, 2), (0, 8), 1, True)], 8,
                    "packed move {want} bytes, the notification says {got}"),
    "tokens-past-pages": ([((0, 1), (0, 8), 0, True)], 8,
                          "pages [0, 1) / tokens [0, 8) lie outside request 3"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_lying_sender_fails_the_request_by_name(case, rig):
    """Refused by name, the pool untouched (rx-overlap-exact, rx-nbytes, rx-token-range)."""
    notes, num_tokens, message = LIES[case]
    _, dst = pools()
    client, recv = rogue_receiver(rig, dst)
    before = snapshot(dst)
    ids = torch.tensor([5, 1, 6][:-(-num_tokens // PS)])
    recv.expect(3, ids, num_tokens=num_tokens)
    bpt = bytes_per_token(recv, dst)
    key = play(client, recv, 3, [dict(pages=list(p), tokens=list(t),
                                      nbytes=(t[1] - t[0]) * bpt - short, last=last)
                                 for p, t, short, last in notes])
    assert wait_all([(recv, 3)], timeout=10) == [KVStatus.Failed]
    want = message.format(want=8 * bpt, got=8 * bpt - 1)
    assert want in recv.reason(3), recv.reason(3)
    assert_untouched_outside(dst, before, ids)  # the request's own pages: undefined (rule 3)
    client.append(key, {"end": "ack"}, len(notes))  # the rogue writes no more: slot freed
    recv.close()


def test_sender_gives_up_on_a_destination_within_its_own_timeout(rig):
    """A request the receiver never expects: Failed within the sender's 1 s (plus slack), not
    the control plane's 30 s."""
    src, dst = pools()
    ns = rig[3].scoped(uuid.uuid4().hex)
    sender = KVSender(src, ns, cp_size=1, timeout=1.0, engine=rig[0], arena=rig[1])
    recv = KVReceiver(dst, ns, cp_size=1, timeout=10, engine=rig[0], arena=rig[2])
    t0 = time.monotonic()
    sender.send(5, torch.tensor([0, 1]), num_tokens=8)
    assert wait_all([(sender, 5)], timeout=8) == [KVStatus.Failed]
    assert time.monotonic() - t0 <= 1.0 + 5.0
    assert "no destination from the receiver within 1.0 s" in sender.reason(5), \
        sender.reason(5)
    sender.close()
    recv.close()


def test_metadata_of_the_lowest_sender_key_wins(rig):
    """Two CP senders attach different blobs; the documented winner is the lowest sender key
    (cp0), even when cp1's last chunk arrives first."""
    src, dst = pools()
    _, senders, recv = group(src, dst, rig, cp=2)
    recv.expect(6, torch.tensor([2, 3]), num_tokens=8)
    senders[1].send(6, torch.tensor([4, 5]), num_tokens=8, metadata=b"from-cp1")
    deadline = time.monotonic() + 20  # the receiver has read cp1's last chunk
    while recv.poll(6) is not KVStatus.Transferring and time.monotonic() < deadline:
        time.sleep(0.005)
    assert recv.poll(6) is KVStatus.Transferring, recv.reason(6)
    senders[0].send(6, torch.tensor([4, 5]), num_tokens=8, metadata=b"from-cp0")
    assert wait_all([(recv, 6), (senders[0], 6)], timeout=20) == [KVStatus.Success] * 2
    assert recv.metadata(6) == b"from-cp0"
    close_all(senders, recv)


class CountingWrites:
    """The shared engine, counting the writes submitted through it."""

    def __init__(self, engine):
        self._engine, self.writes = engine, 0

    def submit(self, *args, **kwargs):
        self.writes += 1
        return self._engine.submit(*args, **kwargs)

    def write(self, *args, **kwargs):
        self.writes += 1
        return self._engine.write(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.mark.parametrize("mode", ["packed", "direct"])
def test_no_write_after_the_receiver_ended_the_use(mode, rig, monkeypatch):
    """The sender stalls (a GC pause) while preparing its only chunk, past the receiver's 1 s
    timeout: when it resumes it must see the verdict and write nothing (the fence before each
    write), not put a dead request's bytes on the wire. (Its status is Failed as soon as it
    polls the verdict; the stalled worker is done only once `close` has joined it.)"""
    src, dst = pools()
    name = "pack_pages" if mode == "packed" else "direct_segments"
    real, stalled = getattr(sender_module, name), threading.Event()

    def stall_once(*args, **kwargs):
        if not stalled.is_set():
            stalled.set()
            time.sleep(3.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(sender_module, name, stall_once)
    counting = CountingWrites(rig[0])
    ns = rig[3].scoped(uuid.uuid4().hex)
    sender = KVSender(src, ns, mode=mode, engine=counting, arena=rig[1], timeout=10)
    recv = KVReceiver(dst, ns, direct=mode == "direct", timeout=1.0, engine=rig[0],
                      arena=rig[2])
    recv.expect(1, torch.tensor([2, 5]), num_tokens=8)
    sender.send(1, torch.tensor([1, 4]), num_tokens=8)
    assert wait_all([(recv, 1)], timeout=10) == [KVStatus.Failed]
    assert wait_all([(sender, 1)], timeout=15) == [KVStatus.Failed]
    assert stalled.is_set() and "receiver failed the request" in sender.reason(1), \
        sender.reason(1)
    sender.close()  # joins the worker: the stalled chunk has ended one way or the other
    assert counting.writes == 0, f"{counting.writes} writes after the receiver's verdict"
    recv.close()
