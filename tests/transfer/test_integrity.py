"""Never Success with wrong bytes (issues 9 and 18): request lifecycle, id reuse, robust
polling, restarts, trust and inputs. One process: real Mooncake engines on TCP loopback, real
sockets; misbehaving peers are played by hand-driven connections (`txtest.Rogue`).

Each defect test drives the public API only (poll/forget/expect), so it ran against the code
before the fix and failed there."""

import re
import subprocess
import time

import pytest
import torch
from kvtest import (
    assert_cache_equals,
    assert_untouched_outside,
    fill_sentinel,
    make_cache,
    mha,
    oracle_unpack,
    snapshot,
)
from mp import wait_for
from txtest import Group, Rogue, StallOnce, wait_all

from cpkv.kernels import packed_digest
from cpkv.staging import StagingArena
from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank, ParallelSizes
from cpkv.transfer.protocol import Announce, Note, ProtocolError
from cpkv.transfer.sender import checksum

PS = 4


def caches(src_pages=16, dst_pages=24):
    src = make_cache(mha(), num_layers=2, num_pages=src_pages, page_size=PS, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=2, num_pages=dst_pages, page_size=PS,
                                   seed=2))
    return src, dst


def expected(src, dst, s_ids, d_ids, n, want=None):
    return oracle_unpack(src, s_ids, dst, d_ids, n, range(2), range(src.num_heads), range(2),
                         range(dst.num_heads), want=want)


def deliver(g, rid, s_ids, d_ids, n):
    """Every sender sends ``rid``; all end Success and the pool holds exactly its bytes."""
    src, dst = g.senders[0].cache, g.recv.cache
    want = expected(src, dst, s_ids, d_ids, n, snapshot(dst))
    g.expect(rid, d_ids, n)
    g.send(rid, s_ids, n)
    assert g.wait(rid) == [KVStatus.Success] * (1 + len(g.senders)), \
        [x.reason(rid) for x in (g.recv, *g.senders)]
    assert_cache_equals(dst, want)


@pytest.mark.slow
def test_late_writer_cannot_corrupt_the_next_request(rig):
    """Request A fails because CP rank 1 stalls past the receiver's timeout; B arrives at
    once; rank 1 wakes and writes A's share. B must be Success with exactly its bytes (or
    Failed), never Success with A's bytes."""
    src, dst = caches()
    g = Group(src, dst, rig, timeout=10)
    g.recv.timeout = 1.0  # A's deadline: rank 1 stalls 2.5 s
    g.senders[1].engine = StallOnce(g.senders[1].engine, 2.5)
    a_src, a_dst, a_n = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), 4 * PS
    b_src = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15])
    b_dst, b_n = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15]), 8 * PS
    g.expect(1, a_dst, a_n)
    g.send(1, a_src, a_n)
    assert wait_all([(g.recv, 1)]) == [KVStatus.Failed]
    assert g.senders[1].engine.stalled.is_set()
    g.recv.timeout = 10.0  # B has time to wait for rank 1
    want = expected(src, dst, b_src, b_dst, b_n, snapshot(dst))
    g.expect(2, b_dst, b_n)
    g.send(2, b_src, b_n)
    status = wait_all([(g.recv, 2)])[0]
    assert status is KVStatus.Success, g.recv.reason(2)  # here it can be: A's slot is fenced
    assert_cache_equals(dst, want, "request B after A's late write")
    wait_all([(s, 2) for s in g.senders])
    g.close()


def test_forgotten_request_id_reused_never_sees_stale_notifications(rig):
    """forget on both sides, then the same id again: the first poll must not be Success."""
    src, dst = caches()
    g = Group(src, dst, rig)
    deliver(g, 5, torch.tensor([1, 2]), torch.tensor([3, 4]), 2 * PS)
    for obj in (g.recv, *g.senders):
        obj.forget(5)
    before = snapshot(dst)
    g.expect(5, torch.tensor([6, 7]), 2 * PS)
    time.sleep(0.2)
    assert g.recv.poll(5) in (KVStatus.Bootstrapping, KVStatus.WaitingForInput)
    assert_cache_equals(dst, before, "pool before the reused id's senders sent")
    g.recv.forget(5)
    # every sender lets the abandoned use's pushed destination go before the id comes again
    # (without it, a call racing the verdict may take it: the next test and docs/transfer.md)
    assert g.recv.settle(10)
    deliver(g, 5, torch.tensor([9, 10]), torch.tensor([6, 7]), 2 * PS)
    g.close()


def test_a_pushed_destination_of_an_abandoned_use_is_let_go(rig):
    """The race behind a reused id: the receiver pushes a destination for use U of an id,
    gives U up (forget), and expects the id again (use U+1) while the sender's call of that id
    is being made: the call can take U's pushed destination before it hears U's verdict. The
    sender must let U go (it wrote nothing under it) and take U+1's destination; with the
    verdict taken as this call's, the call failed ("forgotten by the receiver"). Made
    deterministic: the sender's I/O thread is held while the call is made, and its worker is
    busy with another request, so U's verdict reaches the call before any job of it runs."""
    import threading

    src, dst = caches()
    g = Group(src, dst, rig, cp=1)
    sender, recv = g.senders[0], g.recv
    deliver(g, 1, torch.tensor([1]), torch.tensor([1]), PS)  # connected, engines warm
    sender.engine = StallOnce(sender.engine, 1.0)
    peer = sender._peer(recv.address)
    g.expect(2, torch.tensor([2]), PS)  # the request that keeps the worker busy
    g.expect(5, torch.tensor([3]), PS)  # use U of id 5: its destination is pushed
    wait_for(lambda: {2, 5} <= set(peer.pushed), 10, "the pushed destinations")
    held, gate = threading.Event(), threading.Event()
    sender.hub._call(lambda: (held.set(), gate.wait(10)))
    assert held.wait(10)  # the sender's I/O thread reads nothing more until the gate opens
    recv.forget(5)  # U ends: its verdict goes to the sender, unread
    want = expected(src, dst, torch.tensor([2]), torch.tensor([2]), PS, snapshot(dst))
    want = expected(src, dst, torch.tensor([9]), torch.tensor([4]), PS, want)
    g.expect(5, torch.tensor([4]), PS)  # use U+1: its destination follows the verdict
    g.send(2, torch.tensor([2]), PS)
    assert sender.engine.stalled.wait(10)  # the worker is inside request 2's write
    g.send(5, torch.tensor([9]), PS)  # takes U's destination, still pushed
    gate.set()
    assert g.wait(5) == [KVStatus.Success] * 2, (recv.reason(5), sender.reason(5))
    assert g.wait(2) == [KVStatus.Success] * 2
    assert_cache_equals(dst, want, "ids 2 and 5 (under its second use)")
    assert recv.settle(10)  # U's slot came back: the sender ended it
    g.close()


def test_an_old_failure_does_not_fail_the_reused_id(rig):
    src, dst = caches()
    g = Group(src, dst, rig)
    g.expect(6, torch.tensor([1, 2]), 2 * PS)
    g.senders[0].send(6, torch.tensor([1, 2]), to=g.recv.address, num_tokens=2 * PS)
    g.senders[1].send(6, torch.tensor([1, 2]), to=g.recv.address,
                      num_tokens=2 * PS - 1)  # disagrees: fails
    assert wait_all([(g.recv, 6)]) == [KVStatus.Failed]
    assert re.search(r"has 7 tokens, this receiver expects 8|expects 8 tokens .* this sender "
                     r"has 7", g.recv.reason(6)), g.recv.reason(6)  # as either side saw it
    wait_all([(s, 6) for s in g.senders])
    for obj in (g.recv, *g.senders):
        obj.forget(6)
    g.expect(6, torch.tensor([3, 4]), 2 * PS)
    time.sleep(0.2)
    assert g.recv.poll(6) in (KVStatus.Bootstrapping, KVStatus.WaitingForInput), \
        g.recv.reason(6)
    g.send(6, torch.tensor([1, 2]), 2 * PS)
    assert g.wait(6) == [KVStatus.Success] * 3
    g.close()


def test_receiver_restarted_at_the_same_address(rig):
    """A new receiver incarnation on the same port: the old connections end (what was in
    flight fails), no stale Success, and the senders reconnect on their next request."""
    engine, send_arena, recv_arena = rig
    src, dst = caches()
    g = Group(src, dst, rig)
    deliver(g, 7, torch.tensor([2]), torch.tensor([1]), PS)
    address = g.recv.address
    g.expect(8, torch.tensor([2]), PS)  # in flight when the receiver goes
    g.recv.close()
    for s in g.senders:
        s.forget(7)
    with StagingArena(1 << 20) as arena2:  # a new arena: a new destination address
        engine.register_arena(arena2)
        port = int(address.rsplit(":", 1)[1])
        g.recv = KVReceiver(dst, port=port, timeout=10, engine=engine, arena=arena2)
        assert g.recv.address == address
        before = snapshot(dst)
        g.expect(7, torch.tensor([5]), PS)
        time.sleep(0.2)
        assert g.recv.poll(7) is KVStatus.Bootstrapping
        assert_cache_equals(dst, before)
        g.recv.forget(7)
        deliver(g, 7, torch.tensor([3]), torch.tensor([5]), PS)
        g.close()


def test_state_returns_to_baseline_after_successes_and_failures(rig):
    """Every request leaves nothing behind on either side once forgotten: no fenced slot,
    no staging bytes, no remembered announcement or verdict; one connection per sender."""
    src, dst = caches()
    g = Group(src, dst, rig)
    for rid in range(30):
        n = 2 * PS - 1
        g.expect(rid, torch.tensor([rid % 20, 20 + rid % 4]), n)
        for r, s in enumerate(g.senders):  # rank 1 disagrees on every 3rd request: it fails
            s.send(rid, torch.tensor([rid % 16, 15 - rid % 16]), to=g.recv.address,
                   num_tokens=n - (r == 1 and rid % 3 == 0))
        want = KVStatus.Failed if rid % 3 == 0 else KVStatus.Success
        assert g.wait(rid) == [want] * 3
        for obj in (g.recv, *g.senders):
            obj.forget(rid)
    assert g.recv.settle(10)
    stats = g.recv.stats()
    assert (stats["requests"], stats["fenced"], stats["announced"], stats["staging_bytes"],
            stats["connections"]) == (0, 0, 0, 0, 2), stats
    assert len(g.recv._ended) == 30  # verdicts kept for late senders, bounded (MAX_ENDED)
    assert all(s.stats()["open_legs"] == 0 and s.stats()["connections"] == 1
               for s in g.senders)
    assert g.recv.arena.live_slots == []
    g.close()


def test_sender_ends_in_the_receivers_status(rig):
    """Rank 0 finished its share; rank 1 fails; the receiver fails the request: rank 0 must
    not stay Success."""
    src, dst = caches()
    g = Group(src, dst, rig)
    g.expect(8, torch.tensor([1, 2]), 2 * PS)
    g.senders[0].send(8, torch.tensor([1, 2]), to=g.recv.address, num_tokens=2 * PS)
    wait_for(lambda: g.senders[0].poll(8) is KVStatus.Transferring, what="rank 0 sending")
    g.senders[1].send(8, torch.tensor([1, 2]), to=g.recv.address, num_tokens=2 * PS - 1)
    assert wait_all([(g.recv, 8)]) == [KVStatus.Failed]
    assert wait_all([(g.senders[0], 8)]) == [KVStatus.Failed]
    assert "failed the request" in g.senders[0].reason(8)
    g.close()


def rogue_pair(rig, **kw):
    """A receiver whose only sender is played by the test over a real connection."""
    _, dst = caches()
    kw = {"grace": 0.5, **kw}  # closing waits up to the grace for the rogue to stop
    recv = KVReceiver(dst, timeout=5, engine=rig[0], arena=rig[2], **kw)
    return dst, recv


def forge_segment(rig, recv, liar, rid, check_of):
    """The rogue sender announces ``rid`` (expected into pages 4 + rid and 10 + rid), writes
    random bytes into its destination as a real engine write, and notes them as one whole
    packed segment with the check ``check_of(payload)`` (None: no check)."""
    bpt = recv.cache.packed_nbytes(1)
    recv.expect(rid, torch.tensor([4 + rid, 10 + rid]), source="rogue", num_tokens=2 * PS)
    liar.send(Announce(rid, 2 * PS, 2))
    dest = liar.recv()
    payload = torch.randint(0, 256, (2 * PS * bpt,), dtype=torch.uint8)
    with StagingArena(1 << 16) as arena:
        rig[0].register_arena(arena)
        slot = arena.alloc(payload.numel())
        slot.tensor.copy_(payload)
        rig[0].write(recv.engine.session_id, [(slot.tensor.data_ptr(), dest.addr,
                                               payload.numel())])
        slot.release()
    liar.send(Note(rid, dest.use, (0, 2), (0, 2 * PS), (0, 2), payload.numel(), "packed",
                   True, check_of(payload), None))


@pytest.mark.parametrize("raw,message", [
    (b"{not json", "unreadable frame"),
    (b"[" * 100000, "unreadable frame"),
    (b'{"t": "note", "rid": 3, "use": 0, "pages": "x", "tokens": [0, 4], "layers": [0, 2], '
     b'"nbytes": 1, "mode": "packed", "last": true, "check": null, "metadata": null}',
     "Note.pages: expected 2 values"),
    (b'{"t": "note", "rid": 3, "use": 0, "pages": [0, 1], "tokens": [0, 4], "layers": [0, 2], '
     b'"nbytes": 1.5, "mode": "packed", "last": true, "check": null, "metadata": null}',
     "Note.nbytes: expected an int"),
    (b"[1, 2]", "expected a tagged message"),
    (b'{"t": "note", "rid": 3, "use": 0, "pages": [0, 1], "tokens": [0, 4], "layers": [0, 2], '
     b'"nbytes": 0, "mode": "packed", "last": "yes", "check": null, "metadata": null}',
     "Note.last: expected a bool"),
    (b'{"t": "note", "rid": 3}', "fields ["),
], ids=["not-json", "deep", "pages", "nbytes", "untagged", "last", "fields"])
def test_poll_never_raises_on_malformed_notifications(raw, message, rig):
    dst, recv = rogue_pair(rig)
    liar = Rogue(recv.address, dst)
    before = snapshot(dst)
    recv.expect(3, torch.tensor([4, 5]), source="rogue", num_tokens=8)
    liar.send(Announce(3, 8, 2))
    liar.recv()  # the destination
    liar.raw(raw)
    assert wait_all([(recv, 3)], timeout=10) == [KVStatus.Failed]
    assert message in recv.reason(3), recv.reason(3)
    assert "protocol error" in recv.reason(3)
    assert_cache_equals(dst, before)
    liar.close()
    recv.close()


def test_a_sender_that_vanishes_fails_its_request_at_once(rig):
    """The connection of a sender holding the destination ends (its process died): the
    request fails promptly with the reason, `poll` never raises, and the slot comes back
    once the drain has passed (the dead process cannot write any more)."""
    dst, recv = rogue_pair(rig)
    recv.timeout = 30
    liar = Rogue(recv.address, dst)
    recv.expect(1, torch.tensor([0]), source="rogue", num_tokens=PS)
    liar.send(Announce(1, PS, 1))
    liar.recv()
    t0 = time.monotonic()
    liar.close()
    assert wait_all([(recv, 1)], timeout=20) == [KVStatus.Failed]
    assert time.monotonic() - t0 < 10
    assert "disconnected" in recv.reason(1), recv.reason(1)
    assert recv.settle(5)
    recv.close()
    assert rig[2].live_slots == []


def test_restarted_or_closed_sender_can_connect_again(rig):
    """A closed sender's id is free at once; so is a crashed one's (its connection ends)."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=5, engine=rig[0], arena=rig[2])
    kw = dict(instance="p", engine=rig[0], arena=rig[1])
    for rid in range(2):
        a = KVSender(src, **kw)
        recv.expect(rid, torch.tensor([rid]), source="p", num_tokens=PS)
        a.send(rid, torch.tensor([0]), to=recv.address, num_tokens=PS)
        assert [recv.wait(rid), a.wait(rid)] == [KVStatus.Success] * 2
        a.close()
    crashed = Rogue(recv.address, src, instance="p")  # the same id, then gone without a word
    crashed.close()
    c = KVSender(src, **kw)
    recv.expect(9, torch.tensor([9]), source="p", num_tokens=PS)
    c.send(9, torch.tensor([0]), to=recv.address, num_tokens=PS)
    assert [recv.wait(9), c.wait(9)] == [KVStatus.Success] * 2, (recv.reason(9), c.reason(9))
    c.close()
    recv.close()


def test_receiver_started_before_its_senders(rig):
    src, dst = caches()
    t0 = time.monotonic()
    recv = KVReceiver(dst, timeout=10, engine=rig[0], arena=rig[2])
    assert time.monotonic() - t0 < 2, "the constructor must not wait for senders"
    recv.expect(1, torch.tensor([2, 3]), source="p", num_tokens=2 * PS)
    time.sleep(0.1)
    assert recv.poll(1) is KVStatus.Bootstrapping  # the source's sizes are not known yet
    senders = [KVSender(src, instance="p", rank=ParallelRank(cp=r), sizes=ParallelSizes(cp=2),
                        engine=rig[0], arena=rig[1]) for r in range(2)]
    want = expected(src, dst, torch.tensor([0, 1]), torch.tensor([2, 3]), 2 * PS, snapshot(dst))
    for s in senders:
        s.send(1, torch.tensor([0, 1]), to=recv.address, num_tokens=2 * PS)
    assert [recv.wait(1)] + [s.wait(1) for s in senders] == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    for s in senders:
        s.close()
    recv.close()


def test_direct_notes_are_judged_against_the_senders_own_geometry(rig):
    """A direct note moves whole pages, judged with the sender's page size and heads from its
    Hello: whole pages, not per-token bytes. Found by the tiny demo (MLA, direct) under
    load, when registrations were re-read only now and then."""
    src, dst = caches()
    g = Group(src, dst, rig, direct=True)
    for s in g.senders:
        s.close()
    g.senders = [KVSender(src, instance=g.instance, rank=ParallelRank(cp=r),
                          sizes=ParallelSizes(cp=2), engine=rig[0], arena=rig[1],
                          mode="direct") for r in range(2)]
    s_ids, d_ids = torch.tensor([0, 1, 5]), torch.tensor([2, 3, 9])
    n = 3 * PS - 1  # a partial last page: whole pages move more bytes than its tokens
    # direct moves whole pages (the baseline's semantics): the last page's tail comes along
    want = expected(src, dst, s_ids, d_ids, 3 * PS, snapshot(dst))
    g.expect(1, d_ids, n)
    g.send(1, s_ids, n)
    assert g.recv.wait(1) is KVStatus.Success, g.recv.reason(1)
    assert [s.wait(1) for s in g.senders] == [KVStatus.Success] * 2
    assert_cache_equals(dst, want)
    g.close()


def test_failed_constructor_leaves_nothing_behind(rig):
    src, dst = caches()
    engine = rig[0]
    recv = KVReceiver(dst, engine=engine, arena=rig[2])
    port = int(recv.address.rsplit(":", 1)[1])
    registered = dict(engine._registered)
    with pytest.raises(OSError):  # owns a new arena, registered, then cannot listen
        KVReceiver(dst, port=port, engine=engine, arena_bytes=1 << 20)
    assert dict(engine._registered) == registered
    with pytest.raises(ValueError, match="kind: expected 'mha' or 'mla'"):
        KVSender(src, kind="gqa", engine=engine, arena_bytes=1 << 20)
    assert dict(engine._registered) == registered
    with KVSender(src, rank=ParallelRank(cp=1), sizes=ParallelSizes(cp=2), engine=engine,
                  arena=rig[1]) as s:
        assert s.poll(0) is KVStatus.Bootstrapping
    recv.close()


def test_bad_send_and_expect_arguments_queue_nothing(rig):
    src, dst = caches()
    g = Group(src, dst, rig)
    s, to = g.senders[0], g.recv.address
    cases = [
        (TypeError, "chunk: expected a", dict(chunk=[0, 1.5])),
        (TypeError, "last: expected bool", dict(last=1)),
        (TypeError, "metadata: expected bytes", dict(metadata="x")),
        (ValueError, "ready: a CUDA stream or event orders CUDA pools only",
         dict(ready=object())),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            s.send(1, torch.tensor([0, 1]), to=to, **kw)
    with pytest.raises(TypeError, match="request_id: expected an int or a str, got bool"):
        s.send(True, torch.tensor([0, 1]), to=to)
    with pytest.raises(ValueError, match="ready: a CUDA stream"):
        g.recv.expect(1, torch.tensor([0, 1]), source=g.instance, ready=object())
    with pytest.raises(ValueError, match="request_id"):
        g.recv.expect(-1, torch.tensor([0, 1]), source=g.instance)
    with pytest.raises(TypeError, match="source: expected the prefill instance's name"):
        g.recv.expect(1, torch.tensor([0, 1]), source=None)
    assert s._jobs == [] and g.recv._requests == {}
    assert s.poll(1) is KVStatus.Bootstrapping
    g.close()


def test_checksum_catches_bytes_changed_in_the_slot(rig):
    """With checksum=True, bytes in the slot that are not those the sender checksummed (a
    late or rogue writer) fail the request before that segment is unpacked; a packed note
    with no checksum is refused too."""
    src, dst = caches()
    g = Group(src, dst, rig, checksum=True)
    deliver(g, 1, torch.tensor([0, 1]), torch.tensor([2, 3]), 2 * PS)
    g.close()
    dst, recv = rogue_pair(rig, checksum=True)
    liar = Rogue(recv.address, dst, session=rig[0].session_id)
    assert liar.welcome.integrity == "crc32c"
    before = snapshot(dst)
    for rid, crc in ((2, "wrong"), (3, None)):
        forge_segment(rig, recv, liar, rid,
                      lambda payload, crc=crc: None if crc is None else checksum(payload) ^ 1)
        assert recv.wait(rid) is KVStatus.Failed
        want = "checksum mismatch" if crc else "no checksum"
        assert want in recv.reason(rid), recv.reason(rid)
        assert liar.recv().status == KVStatus.Failed
    assert_cache_equals(dst, before)  # refused before its unpack: even its pages untouched
    liar.close()
    recv.close()


@pytest.mark.parametrize("secret", ["s3cret"])
def test_secret_authenticates_every_message(secret, rig):
    """With a secret a request goes through; a peer without it (or with another) is refused
    before anything it says is acted on, and the requests of others are unaffected."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=5, engine=rig[0], arena=rig[2], secret=secret)
    sender = KVSender(src, instance="p", engine=rig[0], arena=rig[1], secret=secret)
    want = expected(src, dst, torch.tensor([0]), torch.tensor([1]), PS, snapshot(dst))
    recv.expect(1, torch.tensor([1]), source="p", num_tokens=PS)
    sender.send(1, torch.tensor([0]), to=recv.address, num_tokens=PS)
    assert [recv.wait(1), sender.wait(1)] == [KVStatus.Success] * 2
    assert_cache_equals(dst, want)
    before = snapshot(dst)
    recv.expect(2, torch.tensor([2]), source="p", num_tokens=PS)
    for forged in (None, "guess"):  # no secret, a wrong one: the Hello fails its check
        liar = Rogue(recv.address, dst, instance="p", secret=forged, hello=False)
        liar.send(liar.hello)
        with pytest.raises((ConnectionError, OSError, ProtocolError)):
            liar.recv()
        liar.close()
    liar = Rogue(recv.address, dst, instance="p", secret=secret)  # the secret, bad intent:
    assert liar.welcome is not None  # at least it is authenticated (see the fencing tests)
    liar.close()
    sender.send(2, torch.tensor([0]), to=recv.address, num_tokens=PS)
    assert [recv.wait(2), sender.wait(2)] == [KVStatus.Success] * 2, recv.reason(2)
    want = expected(src, dst, torch.tensor([0]), torch.tensor([2]), PS, before)
    assert_cache_equals(dst, want)
    sender.close()
    recv.close()


def test_receiver_listens_on_its_host_only(rig):
    _, dst = caches()
    recv = KVReceiver(dst, host="127.0.0.1", engine=rig[0], arena=rig[2])
    port = recv.address.rsplit(":", 1)[1]
    try:
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=10).stdout
    except FileNotFoundError:
        recv.close()
        pytest.skip("needs `ss` (iproute2) to list listening sockets")
    listening = [line.split()[3] for line in out.splitlines()
                 if line.split()[3].endswith(f":{port}")]
    recv.close()
    assert listening == [f"127.0.0.1:{port}"], listening


def test_digest_catches_bytes_changed_in_the_slot(rig):
    """checksum="digest": the kernels' digest of every segment travels in its note and is
    recomputed by the unpack as the bytes pass; a segment whose bytes are not the ones the
    sender packed fails the request before Success (its own pages: undefined, rule 3)."""
    src, dst = caches()
    g = Group(src, dst, rig, checksum="digest")
    assert g.recv.welcome.integrity == "digest"
    deliver(g, 1, torch.tensor([0, 1]), torch.tensor([2, 3]), 2 * PS)
    g.close()
    dst, recv = rogue_pair(rig, checksum="digest")
    liar = Rogue(recv.address, dst, session=rig[0].session_id)
    before = snapshot(dst)
    for rid, lie in ((2, 1), (3, None)):
        forge_segment(rig, recv, liar, rid, lambda payload, lie=lie: None if lie is None
                      else (int(packed_digest(payload)[0]) + lie) & 0xFFFFFFFFFFFFFFFF)
        assert recv.wait(rid) is KVStatus.Failed
        want = "digest mismatch" if lie else "no checksum"
        assert want in recv.reason(rid), recv.reason(rid)
        assert liar.recv().status == KVStatus.Failed
        assert_untouched_outside(dst, before, [4 + rid, 10 + rid])
    liar.close()
    recv.close()


def test_integrity_default_follows_the_device(rig):
    """"auto" (the default): the fused digest on CUDA pools, nothing on CPU pools (measured:
    the torch path pays it as extra passes); explicit choices are kept; others refused."""
    _, dst = caches()
    for given, want in (("auto", ""), (True, "crc32c"), ("digest", "digest"), (False, "")):
        with KVReceiver(dst, checksum=given, engine=rig[0], arena=rig[2]) as recv:
            assert recv.welcome.integrity == want
    with pytest.raises(ValueError, match="checksum: expected one of"):
        KVReceiver(dst, checksum="md5", engine=rig[0], arena=rig[2])
