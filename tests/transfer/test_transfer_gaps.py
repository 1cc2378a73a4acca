"""Transfer completion cases the mutation run (scripts/mutate.py) found untested (issue 14):
each test fails on a named mutant of scripts/mutants.py and passes on the code. One process:
real Mooncake engines on TCP loopback, real sockets; every failure is observed within a
short timeout the test sets."""

import threading
import time

import pytest
import torch
from kvtest import (
    assert_untouched_outside,
    fill_sentinel,
    make_cache,
    mha,
    snapshot,
)
from mp import wait_for
from txtest import Group, Rogue, wait_all

from cpkv.transfer import KVReceiver, KVSender, KVStatus
from cpkv.transfer import sender as sender_module
from cpkv.transfer.protocol import Announce, End, Note

PS = 4


def pools():
    src = make_cache(mha(), num_layers=2, num_pages=8, page_size=PS, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=2, num_pages=8, page_size=PS, seed=2))
    return src, dst


# A sender that lies, played by hand: (pages, tokens, bytes short of what the tokens move,
# last) per note, the request's tokens, and what the refusal must name.
LIES = {
    # [0, 8) then [4, 8) as last of 12 tokens: 12 tokens counted, [8, 12) never arrived
    "overlap-plus-gap": ([((0, 2), (0, 8), 0, False), ((1, 2), (4, 8), 0, True)], 12,
                         "tokens [4, 8) were already received (layers [0, 2) overlap rows "
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
    recv = KVReceiver(dst, timeout=5, engine=rig[0], arena=rig[2])
    liar = Rogue(recv.address, dst)
    before = snapshot(dst)
    ids = torch.tensor([5, 1, 6][:-(-num_tokens // PS)])
    recv.expect(3, ids, source="rogue", num_tokens=num_tokens)
    liar.send(Announce(3, num_tokens, len(ids)))
    dest = liar.recv()
    bpt = dst.packed_nbytes(1)
    for p, t, short, last in notes:
        liar.send(Note(3, dest.use, p, t, (0, 2), (t[1] - t[0]) * bpt - short, "packed", last,
                       None, None))
    assert wait_all([(recv, 3)], timeout=10) == [KVStatus.Failed]
    want = message.format(want=8 * bpt, got=8 * bpt - 1)
    assert want in recv.reason(3), recv.reason(3)
    assert_untouched_outside(dst, before, ids)  # the request's own pages: undefined (rule 3)
    liar.send(End(3, dest.use, False, None))  # the rogue writes no more: slot freed
    assert recv.settle(5)
    liar.close()
    recv.close()


def test_sender_gives_up_on_a_destination_within_its_own_timeout(rig):
    """A request the receiver never expects: Failed within the sender's 1 s (plus slack)."""
    src, dst = pools()
    sender = KVSender(src, timeout=1.0, engine=rig[0], arena=rig[1])
    recv = KVReceiver(dst, timeout=10, engine=rig[0], arena=rig[2])
    t0 = time.monotonic()
    sender.send(5, torch.tensor([0, 1]), to=recv.address, num_tokens=8)
    assert wait_all([(sender, 5)], timeout=8) == [KVStatus.Failed]
    assert time.monotonic() - t0 <= 1.0 + 5.0
    assert f"no destination from receiver {recv.address} within 1.0 s" in sender.reason(5), \
        sender.reason(5)
    sender.close()
    recv.close()


def test_metadata_of_the_lowest_sender_key_wins(rig):
    """Two CP senders attach different blobs; the documented winner is the lowest sender id
    (cp0), even when cp1's last segment arrives first."""
    src, dst = pools()
    g = Group(src, dst, rig, cp=2)
    g.expect(6, torch.tensor([2, 3]), 8)
    g.send(6, torch.tensor([4, 5]), 8, senders=g.senders[1:], metadata=b"from-cp1")
    wait_for(lambda: g.recv.poll(6) is KVStatus.Transferring, 20, "cp1's last segment read")
    g.send(6, torch.tensor([4, 5]), 8, senders=g.senders[:1], metadata=b"from-cp0")
    assert wait_all([(g.recv, 6), (g.senders[0], 6)], timeout=20) == [KVStatus.Success] * 2
    assert g.recv.metadata(6) == b"from-cp0"
    g.close()


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
    sender = KVSender(src, mode=mode, engine=counting, arena=rig[1], timeout=10)
    recv = KVReceiver(dst, direct=mode == "direct", timeout=1.0, engine=rig[0],
                      arena=rig[2])
    recv.expect(1, torch.tensor([2, 5]), source="prefill", num_tokens=8)
    sender.send(1, torch.tensor([1, 4]), to=recv.address, num_tokens=8)
    assert wait_all([(recv, 1)], timeout=10) == [KVStatus.Failed]
    assert wait_all([(sender, 1)], timeout=15) == [KVStatus.Failed]
    assert stalled.is_set() and "failed the request" in sender.reason(1), \
        sender.reason(1)
    sender.close()  # joins the worker: the stalled chunk has ended one way or the other
    assert counting.writes == 0, f"{counting.writes} writes after the receiver's verdict"
    recv.close()
