"""KVSender/KVReceiver in one process: real Mooncake engines on TCP loopback, a real TCPStore."""

import uuid

import pytest
import torch
from kvtest import (
    assert_cache_equals,
    assert_untouched_outside,
    fill_sentinel,
    make_cache,
    mha,
    mla,
    oracle_unpack,
    snapshot,
)
from txtest import close_all, group, wait_all

from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank, agree
from cpkv.transfer.control import geometry
from cpkv.transfer.status import StatusCell

KINDS = {"mha": mha, "mla": mla}


def caches(kind="mha", ps=4, src_pages=12, dst_pages=14, **kw):
    src = make_cache(KINDS[kind](**kw), num_layers=2, num_pages=src_pages, page_size=ps, seed=1)
    dst = fill_sentinel(make_cache(KINDS[kind](**kw), num_layers=2, num_pages=dst_pages,
                                   page_size=ps, seed=2))
    return src, dst


def expected(src, dst, src_ids, dst_ids, n, want=None):
    return oracle_unpack(src, src_ids, dst, dst_ids, n, range(2), range(src.num_heads),
                         range(2), range(dst.num_heads), want=want)


@pytest.mark.parametrize("policy", ["all", "rank0", "rotate"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_policies_bit_exact_with_several_requests_in_flight(kind, policy, rig):
    src, dst = caches(kind)
    ns, senders, recv = group(src, dst, rig, policy=policy)
    reqs = {7: (torch.tensor([3, 8, 1]), torch.tensor([0, 9, 4]), 11),
            8: (torch.tensor([2, 5]), torch.tensor([13, 1]), 8),
            9: (torch.tensor([11, 0, 4, 6]), torch.tensor([2, 3, 12, 7]), 13)}
    want = snapshot(dst)
    for rid, (s_ids, d_ids, n) in reqs.items():
        want = expected(src, dst, s_ids, d_ids, n, want)
        recv.expect(rid, d_ids, num_tokens=n)
    for rid, (s_ids, _, n) in reqs.items():  # all queued before any completes
        for s in senders:
            s.send(rid, s_ids, num_tokens=n)
    pairs = [(recv, r) for r in reqs] + [(s, r) for s in senders for r in reqs]
    assert wait_all(pairs) == [KVStatus.Success] * len(pairs)
    assert_cache_equals(dst, want)
    assert recv.arena.live_slots == [] and all(s.arena.live_slots == [] for s in senders)
    close_all(senders, recv)


def test_pipelined_layer_groups_bit_exact(rig, monkeypatch):
    """Force one-layer groups: pack group g+1 while group g is on the wire."""
    import cpkv.transfer.sender as sender_mod
    monkeypatch.setattr(sender_mod, "PIPELINE_CHUNK_BYTES", 1)
    src = make_cache(mha(), num_layers=5, num_pages=12, page_size=4, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=5, num_pages=12, page_size=4, seed=2))
    ns, senders, recv = group(src, dst, rig)
    s_ids, d_ids = torch.randperm(12)[:9], torch.randperm(12)[:9]
    want = oracle_unpack(src, s_ids, dst, d_ids, 34, range(5), range(2), range(5), range(2))
    recv.expect(2, d_ids, num_tokens=34)
    for s in senders:
        s.send(2, s_ids, num_tokens=34)
    assert wait_all([(recv, 2)] + [(s, 2) for s in senders]) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    close_all(senders, recv)


@pytest.mark.parametrize("ps", [1, 16])
def test_chunked_prefill_with_an_empty_last_share(ps, rig):
    """10 pages, 2 ranks (shares [0,5) and [5,10)); last chunk [3,5) is empty for rank 1."""
    src, dst = caches(ps=ps, src_pages=12, dst_pages=12)
    ns, senders, recv = group(src, dst, rig)
    s_ids, d_ids = torch.randperm(12)[:10], torch.randperm(12)[:10]
    n = 10 * ps - (ps // 2)  # partial last page
    want = expected(src, dst, s_ids, d_ids, n)
    recv.expect(1, d_ids, num_tokens=n)
    chunks = [(0, 3), (5, 10), (3, 5)]  # out of order on purpose; last is decided per chunk
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        for s in senders:
            s.send(1, s_ids, num_tokens=n, chunk=chunk, last=last,
                   metadata=b"\x01\x02" if last else None)
        if not last:  # chunks unpack as they land (rule 3): not Success before the last
            assert recv.poll(1) in (KVStatus.WaitingForInput, KVStatus.Transferring)
    assert wait_all([(recv, 1)] + [(s, 1) for s in senders]) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    assert recv.metadata(1) == b"\x01\x02"
    close_all(senders, recv)


def test_hundred_requests_leave_every_arena_empty(rig):
    src, dst = caches(ps=16, src_pages=8, dst_pages=8)
    ns, senders, recv = group(src, dst, rig)
    for rid in range(100):
        ids = torch.randperm(8)[:3]
        recv.expect(rid, ids, num_tokens=40)
        for s in senders:
            s.send(rid, torch.randperm(8)[:3], num_tokens=40)
        assert wait_all([(recv, rid)] + [(s, rid) for s in senders]) == [KVStatus.Success] * 3
        recv.forget(rid)
        for s in senders:
            s.forget(rid)
    assert recv.arena.live_slots == [] and all(s.arena.live_slots == [] for s in senders)
    close_all(senders, recv)


def test_geometry_mismatch_fails_before_any_byte_moves(rig):
    src, _ = caches(head_dim=96)
    _, dst = caches(head_dim=64)
    ns, senders, recv = group(src, dst, rig, timeout=5)
    before = snapshot(dst)
    assert "geometry mismatch with sender" in recv.setup_error
    assert "components" in recv.setup_error
    recv.expect(1, torch.tensor([0, 1]), num_tokens=8)
    for s in senders:
        s.send(1, torch.tensor([0, 1]), num_tokens=8)
    assert wait_all([(recv, 1)] + [(s, 1) for s in senders]) == [KVStatus.Failed] * 3
    assert all("geometry mismatch" in s.reason(1) for s in senders)
    assert_cache_equals(dst, before)
    close_all(senders, recv)


def use_prefix(client, recv, rid):
    """The key prefix of request ``rid``'s current use (what a sender learns from `dest`)."""
    dest = client.get(client.key(recv.incarnation, "dest", rid))
    return client.key(recv.incarnation, "use", dest["use"])


def rogue(rig):
    """A bare control-plane client in a fresh namespace (to play a misbehaving peer)."""
    return rig[3].scoped(uuid.uuid4().hex)


@pytest.mark.parametrize("case,message", [
    ("oversize", "packed move 12288 bytes, the notification says 1000000"),
    ("duplicate", "tokens [0, 4) were already received"),
    ("outside", "lie outside request 3"),
    ("short", "every sender finished but only 4 of 8 tokens of route tp0.pp0 arrived"),
])
def test_bad_notifications_are_refused_and_the_pool_untouched(case, message, rig):
    """A sender that lies: the receiver refuses, fails the request, releases the slot; no
    page outside the request is written."""
    _, dst = caches()
    client = rogue(rig)
    client.put(client.key("reg", ParallelRank(cp=0).key), {"inc": "rogue", "session": "x",
                                                           "geometry": geometry(dst)})
    recv = KVReceiver(dst, client,
                      cp_size=1, timeout=5,
                      engine=rig[0], arena=rig[2])
    before = snapshot(dst)
    recv.expect(3, torch.tensor([4, 5]), num_tokens=8)
    bpt = dst.packed_nbytes(1)
    notes = {
        "oversize": [dict(pages=[0, 2], tokens=[0, 8], nbytes=1000000, last=True)],
        "duplicate": [dict(pages=[0, 1], tokens=[0, 4], nbytes=4 * bpt, last=False),
                      dict(pages=[0, 1], tokens=[0, 4], nbytes=4 * bpt, last=True)],
        "outside": [dict(pages=[1, 3], tokens=[4, 12], nbytes=8 * bpt, last=True)],
        "short": [dict(pages=[0, 1], tokens=[0, 4], nbytes=4 * bpt, last=True)],
    }[case]
    use = use_prefix(client, recv, 3)
    for k, note in enumerate(notes):
        client.append(f"{use}/note/{ParallelRank().key}", {**note, "metadata": None}, k)
    assert recv.wait(3) == KVStatus.Failed
    assert message in recv.reason(3), recv.reason(3)
    assert client.get(f"{use}/verdict")["status"] == KVStatus.Failed
    # the slot stays quarantined until the rogue says it writes no more (or the grace period)
    client.append(f"{use}/note/{ParallelRank().key}", {"end": "ack"}, len(notes))
    assert recv.settle(5)
    assert recv.arena.live_slots == []
    assert_untouched_outside(dst, before, [4, 5])
    recv.close()


def test_duplicate_sender_id_is_refused(rig):
    src, dst = caches()
    client = rogue(rig)
    a = KVSender(src, client, rank=ParallelRank(cp=0), cp_size=2, engine=rig[0],
                 arena=rig[1])
    with pytest.raises(ValueError, match=r"duplicate sender id: ParallelRank\(dp0.cp0.tp0.pp0\)"):
        KVSender(src, client, rank=ParallelRank(cp=0), cp_size=2, engine=rig[0],
                 arena=rig[1])
    a.close()


def test_receiver_times_out_when_a_sender_never_reports(rig):
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig, timeout=1.5)
    before = snapshot(dst)
    recv.expect(4, torch.tensor([1, 2]), num_tokens=8)
    senders[0].send(4, torch.tensor([5, 6]), num_tokens=8)  # rank 1 stays silent
    assert wait_all([(recv, 4)]) == [KVStatus.Failed]
    assert "timed out after 1.5 s waiting for senders ['dp0.cp1.tp0.pp0']" in recv.reason(4)
    assert len(recv.arena.live_slots) == 1  # quarantined: rank 1 might still write
    assert recv.settle(10)  # rank 1 never acknowledges: released after the grace period
    assert recv.arena.live_slots == []
    assert_untouched_outside(dst, before, [1, 2])
    wait_all([(senders[0], 4)])
    close_all(senders, recv)


def test_status_cell_only_moves_up_and_failed_wins():
    c = StatusCell()
    assert c.update(KVStatus.Transferring) is KVStatus.Transferring
    assert c.update(KVStatus.WaitingForInput) is KVStatus.Transferring
    c.fail("boom")
    assert c.update(KVStatus.Success) is KVStatus.Failed and c.reason == "boom"


def test_agree_without_groups_is_identity():
    assert agree([KVStatus.Success, KVStatus.Failed], groups=[]) == [KVStatus.Success,
                                                                      KVStatus.Failed]


def test_send_rejects_bad_arguments(rig):
    src, dst = caches()
    s = KVSender(src, rogue(rig), rank=ParallelRank(cp=0), cp_size=1, engine=rig[0],
                 arena=rig[1])
    with pytest.raises(ValueError, match="request_id: expected a non-negative int, got -1"):
        s.send(-1, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"chunk: expected 0 <= start <= stop <= 2, got \[1, 3\)"):
        s.send(1, torch.tensor([0, 1]), chunk=(1, 3))
    with pytest.raises(ValueError, match="num_tokens <= 8"):
        s.send(1, torch.tensor([0, 1]), num_tokens=9)
    with pytest.raises(ValueError, match=r"rank.cp: expected a value in \[0, 2\), got 2"):
        KVSender(src, rogue(rig), rank=ParallelRank(cp=2), cp_size=2, engine=rig[0],
                 arena=rig[1])
    s.close()


def test_requests_in_flight_may_not_share_decode_pages(rig):
    src, dst = caches()
    ns, senders, recv = group(src, dst, rig)
    recv.expect(1, torch.tensor([3, 4, 5]), num_tokens=12)
    with pytest.raises(ValueError, match=r"still receiving request\(s\) \[1\]"):
        recv.expect(2, torch.tensor([7, 5]), num_tokens=8)
    recv.expect(3, torch.tensor([7, 8]), num_tokens=8)  # disjoint: fine
    for s in senders:
        s.send(1, torch.tensor([0, 1, 2]), num_tokens=12)
    assert wait_all([(recv, 1)]) == [KVStatus.Success]
    recv.expect(2, torch.tensor([5, 6]), num_tokens=8)  # request 1 finished: its pages are free
    close_all(senders, recv)
