"""Never Success with wrong bytes (issue 9): fencing, request lifecycle, robust polling,
rejoin, trust and inputs. One process: real Mooncake engines on TCP loopback, a real TCPStore.

Each defect test drives the public API only (poll/forget/expect), so it ran against the code
before the fix and failed there."""

import gc
import subprocess
import threading
import time
import uuid

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack, snapshot
from txtest import close_all, group, wait_all

from cpkv.staging import StagingArena
from cpkv.transfer import ControlPlane, KVReceiver, KVSender, KVStatus, ParallelRank
from cpkv.transfer.control import geometry

PS = 4


def caches(src_pages=16, dst_pages=24):
    src = make_cache(mha(), num_layers=2, num_pages=src_pages, page_size=PS, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=2, num_pages=dst_pages, page_size=PS,
                                   seed=2))
    return src, dst


def expected(src, dst, s_ids, d_ids, n, want=None):
    return oracle_unpack(src, s_ids, dst, d_ids, n, range(2), range(src.num_heads), range(2),
                         range(dst.num_heads), want=want)


def deliver(src, dst, recv, senders, rid, s_ids, d_ids, n):
    """Every sender sends ``rid``; all end Success and the pool holds exactly its bytes."""
    want = expected(src, dst, s_ids, d_ids, n, snapshot(dst))
    for s in senders:
        s.send(rid, s_ids, num_tokens=n)
    assert wait_all([(recv, rid)] + [(s, rid) for s in senders]) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)


class StallOnce:
    """The shared engine, except that the first write submitted through it sleeps first: a
    GC pause or preempted process between the sender's last check and its write."""

    def __init__(self, engine, seconds):
        self._engine, self._seconds, self.stalled = engine, seconds, threading.Event()

    def submit(self, *args, **kwargs):
        if not self.stalled.is_set():
            self.stalled.set()
            time.sleep(self._seconds)
        return self._engine.submit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_late_writer_cannot_corrupt_the_next_request(rig):
    """Request A fails because CP rank 1 stalls past the receiver's timeout; B arrives at
    once; rank 1 wakes and writes A's share. B must be Success with exactly its bytes (or
    Failed), never Success with A's bytes."""
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig, timeout=10)
    recv.timeout = 1.0  # A's deadline: rank 1 stalls 2.5 s
    senders[1].engine = StallOnce(senders[1].engine, 2.5)
    a_src, a_dst, a_n = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), 4 * PS
    b_src = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15])
    b_dst, b_n = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15]), 8 * PS
    recv.expect(1, a_dst, num_tokens=a_n)
    for s in senders:
        s.send(1, a_src, num_tokens=a_n)
    assert wait_all([(recv, 1)]) == [KVStatus.Failed]
    assert senders[1].engine.stalled.is_set()
    recv.timeout = 10.0  # B has time to wait for rank 1
    want = expected(src, dst, b_src, b_dst, b_n, snapshot(dst))
    recv.expect(2, b_dst, num_tokens=b_n)
    for s in senders:
        s.send(2, b_src, num_tokens=b_n)
    status = wait_all([(recv, 2)])[0]
    assert status is KVStatus.Success, recv.reason(2)  # here it can be: A's slot is fenced
    assert_cache_equals(dst, want, "request B after A's late write")
    wait_all([(s, 2) for s in senders])
    close_all(senders, recv)


def test_forgotten_request_id_reused_never_sees_stale_notifications(rig):
    """forget on both sides, then the same id again: the first poll must not be Success."""
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    s_ids, d_ids, n = torch.tensor([1, 2]), torch.tensor([3, 4]), 2 * PS
    recv.expect(5, d_ids, num_tokens=n)
    for s in senders:
        s.send(5, s_ids, num_tokens=n)
    assert wait_all([(recv, 5)] + [(s, 5) for s in senders]) == [KVStatus.Success] * 3
    for obj in (recv, *senders):
        obj.forget(5)
    before = snapshot(dst)
    recv.expect(5, torch.tensor([6, 7]), num_tokens=n)
    time.sleep(0.2)
    assert recv.poll(5) is KVStatus.WaitingForInput
    assert_cache_equals(dst, before, "pool before the reused id's senders sent")
    deliver(src, dst, recv, senders, 5, torch.tensor([9, 10]), torch.tensor([6, 7]), n)
    close_all(senders, recv)


def test_an_old_failure_does_not_fail_the_reused_id(rig):
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    recv.expect(6, torch.tensor([1, 2]), num_tokens=2 * PS)
    senders[0].send(6, torch.tensor([1, 2]), num_tokens=2 * PS)
    senders[1].send(6, torch.tensor([1, 2]), num_tokens=2 * PS - 1)  # disagrees: fails
    assert wait_all([(recv, 6)]) == [KVStatus.Failed]
    wait_all([(s, 6) for s in senders])
    for obj in (recv, *senders):
        obj.forget(6)
    recv.expect(6, torch.tensor([3, 4]), num_tokens=2 * PS)
    time.sleep(0.2)
    assert recv.poll(6) is KVStatus.WaitingForInput, recv.reason(6)
    for s in senders:
        s.send(6, torch.tensor([1, 2]), num_tokens=2 * PS)
    assert wait_all([(recv, 6)] + [(s, 6) for s in senders]) == [KVStatus.Success] * 3
    close_all(senders, recv)


def test_receiver_restarted_in_the_same_namespace(rig):
    """A new receiver incarnation: no stale Success, and the senders follow it."""
    engine, send_arena, recv_arena, server = rig
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    recv.expect(7, torch.tensor([1]), num_tokens=PS)
    for s in senders:
        s.send(7, torch.tensor([2]), num_tokens=PS)
    assert wait_all([(recv, 7)] + [(s, 7) for s in senders]) == [KVStatus.Success] * 3
    recv.close()
    for s in senders:
        s.forget(7)
    with StagingArena(1 << 20) as arena2:  # a new arena: a new destination address
        engine.register_arena(arena2)
        recv2 = KVReceiver(dst, server.scoped(ns), cp_size=2, timeout=10, engine=engine,
                           arena=arena2)
        before = snapshot(dst)
        recv2.expect(7, torch.tensor([5]), num_tokens=PS)
        time.sleep(0.2)
        assert recv2.poll(7) is KVStatus.WaitingForInput
        assert_cache_equals(dst, before)
        deliver(src, dst, recv2, senders, 7, torch.tensor([3]), torch.tensor([5]), PS)
        close_all(senders, recv2)


def test_store_keys_return_to_baseline(rig):
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    control = rig[3]
    baseline = control.store.num_keys()
    for rid in range(30):
        n = 2 * PS - 1
        recv.expect(rid, torch.tensor([rid % 20, 20 + rid % 4]), num_tokens=n)
        for r, s in enumerate(senders):  # rank 1 disagrees on every 3rd request: it fails
            s.send(rid, torch.tensor([rid % 16, 15 - rid % 16]),
                   num_tokens=n - (r == 1 and rid % 3 == 0))
        want = KVStatus.Failed if rid % 3 == 0 else KVStatus.Success
        assert wait_all([(recv, rid)] + [(s, rid) for s in senders]) == [want] * 3
        for obj in (recv, *senders):
            obj.forget(rid)
    assert recv.settle(10)
    assert control.store.num_keys() == baseline
    assert recv.arena.live_slots == []
    close_all(senders, recv)


def test_sender_ends_in_the_receivers_status(rig):
    """Rank 0 finished its share; rank 1 fails; the receiver fails the request: rank 0 must
    not stay Success."""
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    recv.expect(8, torch.tensor([1, 2]), num_tokens=2 * PS)
    senders[0].send(8, torch.tensor([1, 2]), num_tokens=2 * PS)
    deadline = time.monotonic() + 10
    while senders[0].poll(8) is not KVStatus.Transferring and time.monotonic() < deadline:
        time.sleep(0.005)
    senders[1].send(8, torch.tensor([1, 2]), num_tokens=2 * PS - 1)
    assert wait_all([(recv, 8)]) == [KVStatus.Failed]
    assert wait_all([(senders[0], 8)]) == [KVStatus.Failed]
    assert "receiver failed the request" in senders[0].reason(8)
    close_all(senders, recv)


def rogue_receiver(rig, **kw):
    """A receiver whose only sender is played by the test through the control plane."""
    _, dst = caches()
    client = rig[3].scoped(uuid.uuid4().hex)
    client.put(client.key("reg", ParallelRank().key), {"inc": "rogue", "session": "x",
                                                       "geometry": geometry(dst)})
    recv = KVReceiver(dst, client, cp_size=1, timeout=5, engine=rig[0], arena=rig[2], **kw)
    return client, dst, recv


def note_key(client, recv, rid):
    dest = client.get(client.key(recv.incarnation, "dest", rid))
    return client.key(recv.incarnation, "use", dest["use"], "note", ParallelRank().key)


@pytest.mark.parametrize("raw,message", [
    ("{not json\n", "unreadable value"),
    ("[" * 100000 + "\n", "unreadable value"),
    ('{"pages": "x", "tokens": [0, 4], "nbytes": 1, "last": true}\n', "pages must be two ints"),
    ('{"pages": [0, 1], "tokens": [0, 4], "nbytes": 1.5, "last": true}\n', "non-integer"),
    ('[1, 2]\n', "expected a notification dict"),
    ('{"pages": [0, 1], "tokens": [0, 4], "nbytes": 0, "last": "yes"}\n', "malformed last"),
])
def test_poll_never_raises_on_malformed_notifications(raw, message, rig):
    client, dst, recv = rogue_receiver(rig)
    before = snapshot(dst)
    recv.expect(3, torch.tensor([4, 5]), num_tokens=8)
    client.store.append(note_key(client, recv, 3), raw)
    assert wait_all([(recv, 3)], timeout=10) == [KVStatus.Failed]
    assert message in recv.reason(3), recv.reason(3)
    assert_cache_equals(dst, before)
    recv.close()


def test_poll_survives_the_store_going_away(rig):
    server = ControlPlane(serve=True, timeout=2)
    client = ControlPlane(port=server.port, timeout=2, namespace=uuid.uuid4().hex)
    _, dst = caches()
    recv = KVReceiver(dst, client, cp_size=1, timeout=1, engine=rig[0], arena=rig[2])
    recv.expect(1, torch.tensor([0]), num_tokens=PS)
    del server
    gc.collect()
    assert wait_all([(recv, 1)], timeout=20) == [KVStatus.Failed]
    assert recv.reason(1)
    recv.close()
    assert rig[2].live_slots == []


def test_restarted_or_closed_sender_can_register_again(rig):
    src, dst = caches()
    client = rig[3].scoped(uuid.uuid4().hex)
    a = KVSender(src, client, rank=ParallelRank(cp=0), engine=rig[0], arena=rig[1])
    a.close()
    b = KVSender(src, client, rank=ParallelRank(cp=0), engine=rig[0], arena=rig[1])
    b.close()
    # a crashed sender: its claim stays, its heartbeat stops; a new one takes over after a lease
    client.store.compare_set(client.key("reg", ParallelRank(cp=0).key, "owner"), "", "ghost")
    t0 = time.monotonic()
    c = KVSender(src, client, rank=ParallelRank(cp=0), engine=rig[0], arena=rig[1], lease=0.3)
    assert time.monotonic() - t0 < 5
    c.close()


def test_receiver_started_before_its_senders_becomes_ready(rig):
    src, dst = caches()
    client = rig[3].scoped(uuid.uuid4().hex)
    t0 = time.monotonic()
    recv = KVReceiver(dst, client, cp_size=2, timeout=10, engine=rig[0], arena=rig[2])
    assert time.monotonic() - t0 < 2, "the constructor must not wait for senders"
    assert not recv.ready and recv.setup_error is None
    recv.expect(1, torch.tensor([2, 3]), num_tokens=2 * PS)
    senders = [KVSender(src, client, rank=ParallelRank(cp=r), cp_size=2, engine=rig[0],
                        arena=rig[1]) for r in range(2)]
    assert recv.wait_ready(10)
    want = expected(src, dst, torch.tensor([0, 1]), torch.tensor([2, 3]), 2 * PS, snapshot(dst))
    for s in senders:
        s.send(1, torch.tensor([0, 1]), num_tokens=2 * PS)
    assert [recv.wait(1)] + [s.wait(1) for s in senders] == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    close_all(senders, recv)


def test_notes_are_judged_against_the_senders_registration(rig, monkeypatch):
    """A direct note from a sender whose registration the receiver has not read yet (they are
    re-read only now and then) is checked against that registration, read on the spot: whole
    pages, not per-token bytes. Found by the tiny demo (MLA, direct) under load."""
    import cpkv.transfer.receiver as receiver_mod

    monkeypatch.setattr(receiver_mod, "REGISTRATION_INTERVAL", 1e9)  # never re-read by time
    src, dst = caches()
    client = rig[3].scoped(uuid.uuid4().hex)
    recv = KVReceiver(dst, client, cp_size=2, timeout=10, engine=rig[0], arena=rig[2],
                      direct=True)
    senders = [KVSender(src, client, rank=ParallelRank(cp=r), cp_size=2, engine=rig[0],
                        arena=rig[1], mode="direct") for r in range(2)]
    s_ids, d_ids = torch.tensor([0, 1, 5]), torch.tensor([2, 3, 9])
    n = 3 * PS - 1  # a partial last page: whole pages move more bytes than its tokens
    recv.expect(1, d_ids, num_tokens=n)
    # direct moves whole pages (the baseline's semantics): the last page's tail comes along
    want = expected(src, dst, s_ids, d_ids, 3 * PS, snapshot(dst))
    for s in senders:
        s.send(1, s_ids, num_tokens=n)
    assert recv.wait(1) is KVStatus.Success, recv.reason(1)
    assert [s.wait(1) for s in senders] == [KVStatus.Success] * 2
    assert_cache_equals(dst, want)
    close_all(senders, recv)


def test_failed_constructor_leaves_nothing_behind(rig):
    src, _ = caches()
    engine = rig[0]
    client = rig[3].scoped(uuid.uuid4().hex)
    a = KVSender(src, client, rank=ParallelRank(cp=0), engine=engine, arena=rig[1])
    registered = dict(engine._registered)
    with pytest.raises(ValueError, match="duplicate sender id"):
        KVSender(src, client, rank=ParallelRank(cp=0), engine=engine, arena_bytes=1 << 20,
                 lease=0.2)  # owns a new arena, registered, then refused
    assert dict(engine._registered) == registered
    with KVSender(src, client, rank=ParallelRank(cp=1), cp_size=2, engine=engine,
                  arena=rig[1]) as s:
        assert s.poll(0) is KVStatus.Bootstrapping
    a.close()


def test_bad_send_and_expect_arguments_queue_nothing(rig):
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    s = senders[0]
    cases = [
        (TypeError, "chunk: expected a", dict(chunk=[0, 1.5])),
        (TypeError, "last: expected bool", dict(last=1)),
        (TypeError, "metadata: expected bytes", dict(metadata="x")),
        (ValueError, "ready: a CUDA stream or event orders CUDA pools only",
         dict(ready=object())),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            s.send(1, torch.tensor([0, 1]), **kw)
    with pytest.raises(ValueError, match="request_id: expected a non-negative int, got True"):
        s.send(True, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ready: a CUDA stream"):
        recv.expect(1, torch.tensor([0, 1]), ready=object())
    with pytest.raises(ValueError, match="request_id"):
        recv.expect(-1, torch.tensor([0, 1]))
    assert s._jobs.empty() and recv._requests == {}
    assert s.poll(1) is KVStatus.Bootstrapping
    close_all(senders, recv)


def test_checksum_catches_bytes_changed_in_the_slot(rig):
    """With checksum=True a byte changed after it landed (a late or rogue writer) fails the
    request before anything is unpacked."""
    engine, send_arena, recv_arena, server = rig
    src, dst = caches()
    ns = uuid.uuid4().hex
    recv = KVReceiver(dst, server.scoped(ns), cp_size=2, timeout=10, engine=engine,
                      arena=recv_arena, checksum=True)
    senders = [KVSender(src, server.scoped(ns), rank=ParallelRank(cp=r), cp_size=2,
                        engine=engine, arena=send_arena) for r in range(2)]
    want = expected(src, dst, torch.tensor([0, 1]), torch.tensor([2, 3]), 2 * PS, snapshot(dst))
    recv.expect(1, torch.tensor([2, 3]), num_tokens=2 * PS)
    for s in senders:
        s.send(1, torch.tensor([0, 1]), num_tokens=2 * PS)
    assert [recv.wait(1)] + [s.wait(1) for s in senders] == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    before = snapshot(dst)
    recv.expect(2, torch.tensor([4, 5]), num_tokens=2 * PS)
    senders[0].send(2, torch.tensor([0, 1]), num_tokens=2 * PS)
    deadline = time.monotonic() + 10
    while recv.poll(2) is not KVStatus.Transferring and time.monotonic() < deadline:
        time.sleep(0.005)
    recv._requests[2].slot.tensor[5] ^= 0xFF  # rank 0's share, after it landed
    senders[1].send(2, torch.tensor([0, 1]), num_tokens=2 * PS)
    assert recv.wait(2) is KVStatus.Failed
    assert "checksum mismatch" in recv.reason(2)
    assert_cache_equals(dst, before)
    close_all(senders, recv)


@pytest.mark.parametrize("secret", ["s3cret"])
def test_secret_authenticates_every_message(secret, rig):
    engine, send_arena, recv_arena, server = rig
    src, dst = caches()
    ns = uuid.uuid4().hex
    authed = ControlPlane(port=server.port, namespace=ns, secret=secret)
    recv = KVReceiver(dst, authed, cp_size=1, timeout=5, engine=engine, arena=recv_arena)
    sender = KVSender(src, authed, engine=engine, arena=send_arena)
    want = expected(src, dst, torch.tensor([0]), torch.tensor([1]), PS, snapshot(dst))
    recv.expect(1, torch.tensor([1]), num_tokens=PS)
    sender.send(1, torch.tensor([0]), num_tokens=PS)
    assert [recv.wait(1), sender.wait(1)] == [KVStatus.Success] * 2
    assert_cache_equals(dst, want)
    before = snapshot(dst)
    # a forger without the secret, and a valid line replayed under another request's key
    recv.expect(2, torch.tensor([2]), num_tokens=PS)
    recv.expect(3, torch.tensor([3]), num_tokens=PS)
    plain = server.scoped(ns)
    k2, k3 = note_key(authed, recv, 2), note_key(authed, recv, 3)
    bpt = dst.packed_nbytes(1)
    plain.append(k2, {"pages": [0, 1], "tokens": [0, PS], "nbytes": PS * bpt, "last": True}, 0)
    authed.append(f"{k3}x", {"pages": [0, 1], "tokens": [0, PS], "nbytes": PS * bpt,
                             "last": True}, 0)
    plain.store.append(k3, plain.store.get(f"{k3}x").decode())
    for rid in (2, 3):
        assert recv.wait(rid) is KVStatus.Failed
        assert "message authentication failed" in recv.reason(rid), recv.reason(rid)
    assert_cache_equals(dst, before)
    plain.delete(f"{k3}x")
    sender.close()
    recv.close()


def test_served_control_plane_listens_on_its_host_only():
    server = ControlPlane("127.0.0.1", serve=True)
    try:
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=10).stdout
    except FileNotFoundError:
        pytest.skip("needs `ss` (iproute2) to list listening sockets")
    listening = [line.split()[3] for line in out.splitlines() if line.split()[3].endswith(
        f":{server.port}")]
    assert listening == [f"127.0.0.1:{server.port}"], listening
