"""Fences fail closed (issue 18): no interleaving of stall, timeout, grace and reuse puts an
old use's bytes under a new use's Success; destinations are fresh for the session and use they
arrive on; a failed request ends its senders at once; misbehaving peers disturb no one else.
One process: real Mooncake engines on TCP loopback, real sockets; checksums off (the default),
so only the fences stand between a late writer and the next request's bytes."""

import time

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack, snapshot
from mp import wait_for
from txtest import Group, Proxy, Rogue, StallOnce, stall_first_call, wait_all

from cpkv import PackedFormat
from cpkv.cp import interleave_split, page_share, zigzag_split
from cpkv.staging import StagingArena
from cpkv.transfer import (
    KVReceiver,
    KVSender,
    KVStatus,
    ParallelRank,
    ParallelSizes,
    contiguous_runs,
)
from cpkv.transfer import sender as sender_module
from cpkv.transfer.protocol import Announce, End, Note

PS = 4


def caches(src_pages=16, dst_pages=24, head_dim=64):
    src = make_cache(mha(head_dim=head_dim), num_layers=2, num_pages=src_pages, page_size=PS,
                     seed=1)
    dst = fill_sentinel(make_cache(mha(head_dim=head_dim), num_layers=2, num_pages=dst_pages,
                                   page_size=PS, seed=2))
    return src, dst


def expected(src, dst, s_ids, d_ids, n, want=None):
    return oracle_unpack(src, s_ids, dst, d_ids, n, range(2), range(src.num_heads), range(2),
                         range(dst.num_heads), want=want)


def stall_fence_once(monkeypatch, sender, seconds):
    """The sender's process freezes just before its pre-write check (a GC pause, a
    preempted process): nothing of it runs, its I/O thread included (the check runs under
    the agent's lock, which the freeze holds), so it wakes with what it knew before."""
    frozen, stalled = stall_first_call(sender._live, seconds)
    monkeypatch.setattr(sender, "_live", frozen)
    return stalled


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before-check", "between-check-and-write"])
def test_a_writer_late_past_the_grace_never_reaches_the_next_request(where, rig, monkeypatch):
    """CP rank 1 stalls 4 s; request A times out at 1 s and its grace ends at 1.5 s; B, of
    A's size, is expected at once and completes. A's slot stays fenced (counted past the
    grace) until rank 1 has woken, written A's share into it and said it stopped: B got
    another slot, reports Success with exactly its bytes, and A's slot then comes back."""
    src, dst = caches()
    g = Group(src, dst, rig, timeout=10, grace=0.5)
    g.recv.timeout = 1.0
    late = g.senders[1]
    if where == "before-check":
        stalled = stall_fence_once(monkeypatch, late, 4.0)
    else:
        late.engine = StallOnce(late.engine, 4.0)
        stalled = late.engine.stalled
    ids = torch.tensor([0, 1, 2, 3])
    g.expect(1, ids, 4 * PS)
    g.send(1, ids, 4 * PS)
    assert wait_all([(g.recv, 1)]) == [KVStatus.Failed]
    assert stalled.is_set() and "timed out" in g.recv.reason(1)
    (a_slot,) = g.recv.arena.live_slots  # fenced: rank 1 holds A's destination
    time.sleep(0.6)  # past the grace
    g.recv.timeout = 10.0
    b_src, b_dst = torch.tensor([8, 9, 10, 11]), torch.tensor([8, 9, 10, 11])
    want = expected(src, dst, b_src, b_dst, 4 * PS, snapshot(dst))
    g.expect(2, b_dst, 4 * PS)
    g.send(2, b_src, 4 * PS, senders=g.senders[:1])  # rank 1 is frozen: rank 0 goes ahead
    wait_for(lambda: len(g.recv.arena.live_slots) == 2, what="B's slot")
    assert a_slot in g.recv.arena.live_slots and g.recv.stats()["quarantined_past_grace"] == 1
    g.send(2, b_src, 4 * PS, senders=g.senders[1:])  # queued behind A's late write
    assert wait_all([(g.recv, 2)], timeout=20) == [KVStatus.Success], g.recv.reason(2)
    assert_cache_equals(dst, want, "request B after A's late write")
    assert wait_all([(s, 2) for s in g.senders]) == [KVStatus.Success] * 2
    assert g.recv.settle(10) and g.recv.arena.live_slots == []
    assert g.recv.stats()["fenced"] == 0
    g.close()


def test_a_replayed_destination_under_a_secret_is_refused(rig):
    """An on-path attacker replays request 1's authenticated destination after the id was
    expected again (a new use, on other pages): it fails its check on the connection it is
    injected into, which is dropped; the use whose destination was pushed on that connection
    fails with the reason at once, and the next use gets its own destination and its own
    bytes, never the replayed one's slot."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=10, engine=rig[0], arena=rig[2], secret="s3cret")
    proxy = Proxy(recv.address)
    sender = KVSender(src, instance="p", timeout=10, engine=rig[0], arena=rig[1],
                      secret="s3cret")
    want = expected(src, dst, torch.tensor([0]), torch.tensor([1]), PS, snapshot(dst))
    recv.expect(1, torch.tensor([1]), source="p", num_tokens=PS)
    sender.send(1, torch.tensor([0]), to=proxy.address, num_tokens=PS)
    assert [recv.wait(1), sender.wait(1)] == [KVStatus.Success] * 2
    assert_cache_equals(dst, want)
    recorded = proxy.sessions[0]["to_sender"]  # nonce, welcome, destination, verdict
    for obj in (recv, sender):
        obj.forget(1)
    before = snapshot(dst)
    recv.expect(1, torch.tensor([2]), source="p", num_tokens=PS)  # the id again: a new use
    wait_for(lambda: len(proxy.sessions[0]["to_sender"]) == 5, what="its destination pushed")
    proxy.inject("to_sender", recorded[2])  # the old destination, replayed
    assert recv.wait(1) is KVStatus.Failed
    assert "disconnected" in recv.reason(1), recv.reason(1)
    assert_cache_equals(dst, before, "the pool after the replay")
    recv.forget(1)
    want = expected(src, dst, torch.tensor([3]), torch.tensor([2]), PS, before)
    recv.expect(1, torch.tensor([2]), source="p", num_tokens=PS)
    sender.send(1, torch.tensor([3]), to=proxy.address, num_tokens=PS)
    assert [recv.wait(1), sender.wait(1)] == [KVStatus.Success] * 2, (recv.reason(1),
                                                                    sender.reason(1))
    assert_cache_equals(dst, want, "the next use")
    proxy.inject("to_receiver", proxy.sessions[1]["to_receiver"][2])  # a frame, replayed
    wait_for(lambda: recv.stats()["connections"] == 0, what="the replayed frame refused")
    sender.close()
    recv.close()
    proxy.close()


def test_a_replay_mid_request_fails_it_with_the_reason_at_once(rig):
    """A note replayed at another position of its connection (slip: the position was not
    authenticated) fails the request on both sides, promptly, by name."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=30, engine=rig[0], arena=rig[2], secret="s3cret")
    proxy = Proxy(recv.address)
    senders = [KVSender(src, instance="p", rank=ParallelRank(cp=r), sizes=ParallelSizes(cp=2),
                        engine=rig[0], arena=rig[1], secret="s3cret", timeout=30)
               for r in range(2)]
    recv.expect(1, torch.tensor([1, 2]), source="p", num_tokens=2 * PS)
    senders[0].send(1, torch.tensor([0, 1]), to=proxy.address, num_tokens=2 * PS)
    wait_for(lambda: len(proxy.sessions) == 1 and len(proxy.sessions[0]["to_receiver"]) >= 4,
             what="rank 0's note")
    t0 = time.monotonic()
    proxy.inject("to_receiver", proxy.sessions[0]["to_receiver"][3])
    assert wait_all([(recv, 1), (senders[0], 1)]) == [KVStatus.Failed] * 2
    assert time.monotonic() - t0 < 10
    assert "message authentication failed" in recv.reason(1), recv.reason(1)
    for s in senders:
        s.close()
    recv.close()
    proxy.close()


def test_an_id_sent_again_without_forget_is_refused(rig):
    """After its last call a request id is done on the sender: sending it again (without
    forget) raises at once instead of reporting the earlier use's Success."""
    src, dst = caches()
    g = Group(src, dst, rig, cp=1)
    g.expect(4, torch.tensor([1]), PS)
    g.send(4, torch.tensor([0]), PS)
    assert g.wait(4) == [KVStatus.Success] * 2
    g.recv.forget(4)
    g.expect(4, torch.tensor([2]), PS)
    with pytest.raises(ValueError, match="request 4 already made its last call here "
                                         r"\(Success\); forget it"):
        g.send(4, torch.tensor([0]), PS)
    g.senders[0].forget(4)
    g.send(4, torch.tensor([0]), PS)
    assert g.wait(4) == [KVStatus.Success] * 2
    g.close()


def test_a_failed_expect_ends_its_senders_at_once(rig):
    """A slot larger than the receiver's arena fails the request when expected; its senders
    (30 s timeout) end in that verdict at once, before or after they announce it."""
    src, dst = caches()
    with StagingArena(8192) as tiny:
        rig[0].register_arena(tiny)
        recv = KVReceiver(dst, timeout=30, engine=rig[0], arena=tiny)
        sender = KVSender(src, instance="p", timeout=30, engine=rig[0], arena=rig[1])
        for early in (True, False):
            rid = int(early)
            if early:
                sender.send(rid, torch.tensor([0, 1, 2]), to=recv.address, num_tokens=3 * PS)
                wait_for(lambda: recv.stats()["senders"] == 1, what="the announcement")
            t0 = time.monotonic()
            recv.expect(rid, torch.tensor([4, 5, 6]), source="p", num_tokens=3 * PS)
            if not early:
                sender.send(rid, torch.tensor([0, 1, 2]), to=recv.address, num_tokens=3 * PS)
            assert wait_all([(recv, rid), (sender, rid)]) == [KVStatus.Failed] * 2
            assert time.monotonic() - t0 < 5
            assert "cannot fit this receiver's staging arena" in recv.reason(rid)
            assert "cannot fit" in sender.reason(rid), sender.reason(rid)
        sender.close()
        recv.close()


def test_a_full_arena_queues_the_request_until_space_frees(rig):
    """Backpressure: a second request that does not fit beside the first waits for its
    space (within its timeout) instead of failing, then completes."""
    src, dst = caches()
    one = dst.packed_nbytes(3 * PS)
    with StagingArena(one + 4096) as small:
        rig[0].register_arena(small)
        g = Group(src, dst, (rig[0], rig[1], small), cp=1)
        g.expect(1, torch.tensor([1, 2, 3]), 3 * PS)
        g.expect(2, torch.tensor([4, 5, 6]), 3 * PS)
        want = expected(src, dst, torch.tensor([7, 8, 9]), torch.tensor([4, 5, 6]), 3 * PS,
                        expected(src, dst, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]),
                                 3 * PS, snapshot(dst)))
        g.send(2, torch.tensor([7, 8, 9]), 3 * PS)
        wait_for(lambda: g.recv.stats()["waiting_for_space"] == 1, what="request 2 queued")
        time.sleep(0.2)
        assert g.recv.poll(2) is KVStatus.Bootstrapping  # no destination before space
        g.send(1, torch.tensor([0, 1, 2]), 3 * PS)
        assert g.wait(1) == g.wait(2) == [KVStatus.Success] * 2
        assert_cache_equals(dst, want)
        g.close()


def test_peers_without_the_secret_disturb_no_one(rig):
    """Under a secret, forged or garbled connections are dropped on their own: every later
    request of the real sender still succeeds, and the receiver needs no restart."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=5, engine=rig[0], arena=rig[2], secret="s3cret")
    sender = KVSender(src, instance="p", engine=rig[0], arena=rig[1], secret="s3cret")
    for rid in range(3):
        forger = Rogue(recv.address, dst, instance="p", secret="guess", hello=False)
        forger.send(forger.hello)  # the same id as the real sender, a forged MAC
        forger.raw(b"\x00" * 64)
        recv.expect(rid, torch.tensor([rid]), source="p", num_tokens=PS)
        sender.send(rid, torch.tensor([rid]), to=recv.address, num_tokens=PS)
        assert [recv.wait(rid), sender.wait(rid)] == [KVStatus.Success] * 2, recv.reason(rid)
        forger.close()
    wait_for(lambda: recv.stats()["connections"] == 1, what="the forgers dropped")
    sender.close()
    recv.close()


@pytest.mark.slow
def test_direct_pages_stay_fenced_while_a_holder_may_write(rig):
    """Direct mode: a failed request's pages are not handed to another request while a
    sender that holds the destination may still write them (slip: freed at once)."""
    src, dst = caches()
    g = Group(src, dst, rig, cp=1, direct=True, grace=0.3,
              sender_kw={"mode": "direct"})
    g.senders[0].engine = StallOnce(g.senders[0].engine, 2.5)
    g.recv.timeout = 0.5
    g.expect(1, torch.tensor([3, 4]), 2 * PS)
    g.send(1, torch.tensor([0, 1]), 2 * PS)
    assert wait_all([(g.recv, 1)]) == [KVStatus.Failed]
    time.sleep(0.5)  # past the grace: the sender is still stalled before its write
    with pytest.raises(ValueError, match="still receiving"):
        g.recv.expect(2, torch.tensor([4, 5]), source=g.instance, num_tokens=2 * PS)
    assert g.senders[0].wait(1) is KVStatus.Failed
    assert g.recv.settle(5)
    g.recv.expect(2, torch.tensor([4, 5]), source=g.instance, num_tokens=2 * PS)  # free now
    g.close()


def test_a_new_incarnation_of_a_sender_id_is_judged_afresh(rig):
    """A sender id that reconnects as a new incarnation is checked against its own Hello
    (slip: a re-registration kept the old judgement): one that no longer fits is refused."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=5, engine=rig[0], arena=rig[2])
    with KVSender(src, instance="p", engine=rig[0], arena=rig[1]) as good:
        recv.expect(1, torch.tensor([1]), source="p", num_tokens=PS)
        good.send(1, torch.tensor([0]), to=recv.address, num_tokens=PS)
        assert [recv.wait(1), good.wait(1)] == [KVStatus.Success] * 2
    wait_for(lambda: recv.stats()["senders"] == 0, what="the first incarnation gone")
    other, _ = caches(head_dim=32)
    with KVSender(other, instance="p", engine=rig[0], arena=rig[1], timeout=5) as bad:
        recv.expect(2, torch.tensor([2]), source="p", num_tokens=PS)
        bad.send(2, torch.tensor([0]), to=recv.address, num_tokens=PS)
        assert bad.wait(2) is KVStatus.Failed
        assert "refused this sender" in bad.reason(2) and "head_dim" in bad.reason(2)
    recv.close()


@pytest.mark.slow
def test_late_writers_leave_nothing_behind(rig):
    """After late writers (stalled holders that wake, write and end), the receiver holds no
    fenced slot, remembered announcement or connection state beyond the live senders."""
    src, dst = caches()
    g = Group(src, dst, rig, cp=1, grace=0.2)
    g.recv.timeout = 0.3
    for rid in range(3):
        g.senders[0].engine = StallOnce(rig[0], 0.8)
        g.expect(rid, torch.tensor([rid]), PS)
        g.send(rid, torch.tensor([rid]), PS)
        assert g.wait(rid) == [KVStatus.Failed] * 2
        for obj in (g.recv, g.senders[0]):
            obj.forget(rid)
    assert g.recv.settle(10)
    stats = g.recv.stats()
    assert (stats["requests"], stats["fenced"], stats["announced"], stats["staging_bytes"],
            stats["senders"]) == (0, 0, 0, 0, 1), stats
    g.close()


def test_a_rogue_that_writes_no_more_after_end_releases_at_once(rig):
    """End is a sender's positive word that it stopped: a failed request's slot comes back
    the moment every holder said it (no waiting out the grace)."""
    _, dst = caches()
    recv = KVReceiver(dst, timeout=0.5, grace=30, engine=rig[0], arena=rig[2])
    liar = Rogue(recv.address, dst)
    recv.expect(1, torch.tensor([1, 2]), source="rogue", num_tokens=2 * PS)
    liar.send(Announce(1, 2 * PS, 2))
    dest = liar.recv()
    liar.send(Note(1, dest.use, (0, 1), (0, PS), (0, 2), dst.packed_nbytes(PS), "packed",
                   False, None, None))
    assert recv.wait(1) is KVStatus.Failed
    assert len(recv.arena.live_slots) == 1
    liar.send(End(1, dest.use, True, "giving up"))
    assert recv.settle(2) and recv.arena.live_slots == []
    liar.close()
    recv.close()


@pytest.mark.parametrize("call,error,message", [
    (lambda: contiguous_runs([0, -1], [1, 2]),
     ValueError, "src_ids: expected non-negative int page ids, got -1"),
    (lambda: contiguous_runs([0, 1], [1.0, 2]),
     ValueError, "dst_ids: expected non-negative int page ids, got 1.0"),
    (lambda: page_share(4, 2, True),
     ValueError, "cp_rank: expected an int in [0, 2), got True"),
    (lambda: PackedFormat.from_dict(
        {"version": 1, "num_tokens": 10**30, "num_layers": 1,
         "components": [["k", 1, 64, "bfloat16"]]}),
     ValueError, "num_tokens expected an int <= 2147483647, got 1000000000000000000"),
    (lambda: zigzag_split(2**40, 2),
     ValueError, "seq_lens: expected at most 2147483647 tokens in a batch"),
    (lambda: interleave_split([2**39, 2**39], 2),
     ValueError, "seq_lens: expected at most 2147483647 tokens in a batch"),
], ids=["runs-negative", "runs-float", "share-bool-rank", "format-huge", "zigzag-huge",
        "interleave-huge"])
def test_inputs_are_checked_by_name(call, error, message):
    with pytest.raises(error) as e:
        call()
    assert message in str(e.value), str(e.value)


def test_invalid_utf8_under_a_secret_is_an_authentication_failure(rig):
    """Bytes that are not even text, on an authenticated connection, fail the MAC check
    first: the request fails with the authentication reason (not a decoding TypeError)."""
    _, dst = caches()
    recv = KVReceiver(dst, timeout=5, grace=0.3, engine=rig[0], arena=rig[2], secret="s3cret")
    liar = Rogue(recv.address, dst, secret="s3cret")
    recv.expect(1, torch.tensor([1]), source="rogue", num_tokens=PS)
    liar.send(Announce(1, PS, 1))
    liar.recv()
    liar.raw(b"\xff\xfe" * 40)
    assert recv.wait(1) is KVStatus.Failed
    assert "message authentication failed" in recv.reason(1), recv.reason(1)
    liar.close()
    recv.close()


def test_a_request_the_runner_rejects_ends_its_senders_at_once(rig):
    """`reject`: the decode runner could not take the request; the sender (30 s timeout),
    before or after it announced, hears the reason at once."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=30, engine=rig[0], arena=rig[2])
    sender = KVSender(src, instance="p", timeout=30, engine=rig[0], arena=rig[1])
    sender.send(1, torch.tensor([0]), to=recv.address, num_tokens=PS)
    wait_for(lambda: recv.stats()["announced"] == 1, what="the announcement")
    t0 = time.monotonic()
    recv.reject(1, "no pages for it")
    recv.reject(2, "no pages for it either")
    sender.send(2, torch.tensor([0]), to=recv.address, num_tokens=PS)
    assert wait_all([(sender, 1), (sender, 2)]) == [KVStatus.Failed] * 2
    assert time.monotonic() - t0 < 5
    assert "no pages for it" in sender.reason(1) and "either" in sender.reason(2)
    sender.close()
    recv.close()


def test_a_refused_sender_ends_the_requests_it_was_to_feed(rig):
    """A sender of the request's source instance that does not fit is refused, and the
    request expecting it fails at once with that reason (not after its 30 s timeout)."""
    _, dst = caches()
    other, _ = caches(head_dim=32)
    recv = KVReceiver(dst, timeout=30, engine=rig[0], arena=rig[2])
    recv.expect(1, torch.tensor([1]), source="p", num_tokens=PS)
    with KVSender(other, instance="p", engine=rig[0], arena=rig[1], timeout=30) as bad:
        bad.send(1, torch.tensor([0]), to=recv.address, num_tokens=PS)
        assert wait_all([(recv, 1), (bad, 1)], timeout=10) == [KVStatus.Failed] * 2
    assert "was refused" in recv.reason(1) and "head_dim" in recv.reason(1)
    recv.close()


def test_cached_prefix_pages_are_shared_by_requests_in_flight(rig):
    """Pages wholly inside a request's prefix are never written: two requests in flight may
    share them (a common cached prefix), and both land."""
    src, dst = caches()
    g = Group(src, dst, rig, cp=1)
    for rid, tail in enumerate((1, 3)):
        g.expect(rid, torch.tensor([0, tail]), 2 * PS, prefix=PS)
    want = snapshot(dst)
    for rid, (tail, s_tail) in enumerate(((1, 2), (3, 4))):
        want = expected(src, dst, torch.tensor([s_tail]), torch.tensor([tail]), PS, want)
        g.send(rid, torch.tensor([9, s_tail]), 2 * PS)
    assert g.wait(0) == g.wait(1) == [KVStatus.Success] * 2
    assert_cache_equals(dst, want)
    with pytest.raises(ValueError, match="still receiving"):  # a written page is not shared
        g.expect(5, torch.tensor([2, 6]), 2 * PS, prefix=PS) or g.expect(
            6, torch.tensor([7, 6]), 2 * PS, prefix=PS)
    g.close()


def test_a_sender_late_for_a_failed_and_forgotten_request_hears_at_once(rig):
    """The receiver failed a request and the runner forgot it; a sender that announces it
    only now hears the verdict at once, not after its own timeout."""
    src, dst = caches()
    recv = KVReceiver(dst, timeout=0.5, engine=rig[0], arena=rig[2])
    sender = KVSender(src, instance="p", timeout=30, engine=rig[0], arena=rig[1])
    recv.expect(1, torch.tensor([0]), source="p", num_tokens=PS)
    assert recv.wait(1) is KVStatus.Failed
    recv.forget(1)
    t0 = time.monotonic()
    sender.send(1, torch.tensor([1]), to=recv.address, num_tokens=PS)
    assert sender.wait(1) is KVStatus.Failed and time.monotonic() - t0 < 5
    assert "timed out" in sender.reason(1), sender.reason(1)
    sender.close()
    recv.close()


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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packed", "direct"])
def test_no_write_after_the_receiver_ended_the_use(mode, rig, monkeypatch):
    """The sender stalls (a GC pause) while preparing its only chunk, past the receiver's 1 s
    timeout: when it resumes it must see the verdict and write nothing (the fence before each
    write), not put a dead request's bytes on the wire. (Its status is Failed as soon as it
    polls the verdict; the stalled worker is done only once `close` has joined it.)"""
    src, dst = caches()
    name = "pack_pages" if mode == "packed" else "direct_segments"
    stall_once, stalled = stall_first_call(getattr(sender_module, name), 3.0)
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
