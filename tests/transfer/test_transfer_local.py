"""KVSender/KVReceiver in one process: real Mooncake engines on TCP loopback, real sockets."""

import time

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
from mp import wait_for
from txtest import Group, Rogue, wait_all

from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank, ParallelSizes, agree
from cpkv.transfer.protocol import Announce, End, Note
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
    g = Group(src, dst, rig, policy=policy)
    recv, senders = g.recv, g.senders
    reqs = {7: (torch.tensor([3, 8, 1]), torch.tensor([0, 9, 4]), 11),
            8: (torch.tensor([2, 5]), torch.tensor([13, 1]), 8),
            9: (torch.tensor([11, 0, 4, 6]), torch.tensor([2, 3, 12, 7]), 13)}
    want = snapshot(dst)
    for rid, (s_ids, d_ids, n) in reqs.items():
        want = expected(src, dst, s_ids, d_ids, n, want)
        g.expect(rid, d_ids, n)
    for rid, (s_ids, _, n) in reqs.items():  # all queued before any completes
        g.send(rid, s_ids, n)
    pairs = [(recv, r) for r in reqs] + [(s, r) for s in senders for r in reqs]
    assert wait_all(pairs) == [KVStatus.Success] * len(pairs)
    assert_cache_equals(dst, want)
    assert recv.arena.live_slots == [] and all(s.arena.live_slots == [] for s in senders)
    g.close()


def test_pipelined_layer_groups_bit_exact(rig, monkeypatch):
    """Force one-layer groups: pack group g+1 while group g is on the wire."""
    import cpkv.transfer.sender as sender_mod
    monkeypatch.setattr(sender_mod, "PIPELINE_CHUNK_BYTES", 1)
    src = make_cache(mha(), num_layers=5, num_pages=12, page_size=4, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=5, num_pages=12, page_size=4, seed=2))
    g = Group(src, dst, rig)
    s_ids, d_ids = torch.randperm(12)[:9], torch.randperm(12)[:9]
    want = oracle_unpack(src, s_ids, dst, d_ids, 34, range(5), range(2), range(5), range(2))
    g.expect(2, d_ids, 34)
    g.send(2, s_ids, 34)
    assert g.wait(2) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    g.close()


@pytest.mark.parametrize("ps", [1, 16])
def test_chunked_prefill_with_an_empty_last_share(ps, rig):
    """10 pages, 2 ranks (shares [0,5) and [5,10)); last chunk [3,5) is empty for rank 1."""
    src, dst = caches(ps=ps, src_pages=12, dst_pages=12)
    g = Group(src, dst, rig)
    recv = g.recv
    s_ids, d_ids = torch.randperm(12)[:10], torch.randperm(12)[:10]
    n = 10 * ps - (ps // 2)  # partial last page
    want = expected(src, dst, s_ids, d_ids, n)
    g.expect(1, d_ids, n)
    chunks = [(0, 3), (5, 10), (3, 5)]  # out of order on purpose; last is decided per chunk
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        g.send(1, s_ids, n, chunk=chunk, last=last, metadata=b"\x01\x02" if last else None)
        if not last:  # chunks unpack as they land (rule 3): not Success before the last
            assert recv.poll(1) in (KVStatus.Bootstrapping, KVStatus.WaitingForInput,
                                    KVStatus.Transferring)
    assert g.wait(1) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    assert recv.metadata(1) == b"\x01\x02"
    g.close()


def test_hundred_requests_leave_every_arena_empty(rig):
    src, dst = caches(ps=16, src_pages=8, dst_pages=8)
    g = Group(src, dst, rig)
    for rid in range(100):
        g.expect(rid, torch.randperm(8)[:3], 40)
        g.send(rid, torch.randperm(8)[:3], 40)
        assert g.wait(rid) == [KVStatus.Success] * 3
        for obj in (g.recv, *g.senders):
            obj.forget(rid)
    assert g.recv.arena.live_slots == [] and all(s.arena.live_slots == [] for s in g.senders)
    g.close()


def test_metadata_of_the_lowest_sender_key_wins(rig):
    """Two CP senders attach different blobs; the documented winner is the lowest sender id
    (cp0), even when cp1's last segment arrives first."""
    src, dst = caches()
    g = Group(src, dst, rig, cp=2)
    g.expect(6, torch.tensor([2, 3]), 8)
    g.send(6, torch.tensor([4, 5]), 8, senders=g.senders[1:], metadata=b"from-cp1")
    wait_for(lambda: g.recv.poll(6) is KVStatus.Transferring, 20, "cp1's last segment read")
    g.send(6, torch.tensor([4, 5]), 8, senders=g.senders[:1], metadata=b"from-cp0")
    assert wait_all([(g.recv, 6), (g.senders[0], 6)], timeout=20) == [KVStatus.Success] * 2
    assert g.recv.metadata(6) == b"from-cp0"
    g.close()


def test_geometry_mismatch_fails_before_any_byte_moves(rig):
    src, _ = caches(head_dim=96)
    _, dst = caches(head_dim=64)
    g = Group(src, dst, rig, timeout=5)
    before = snapshot(dst)
    g.expect(1, torch.tensor([0, 1]), 8)
    g.send(1, torch.tensor([0, 1]), 8)
    assert g.wait(1) == [KVStatus.Failed] * 3
    assert all("refused this sender" in s.reason(1) and "head_dim" in s.reason(1)
               for s in g.senders), [s.reason(1) for s in g.senders]
    assert "was refused" in g.recv.reason(1) and "head_dim" in g.recv.reason(1)  # at once
    assert_cache_equals(dst, before)
    g.close()


def rogue_receiver(rig, dst, timeout=5, **kw):
    return KVReceiver(dst, timeout=timeout, engine=rig[0], arena=rig[2], **kw)


# A sender that lies, played by hand: the request's tokens, its notes (pages, tokens, bytes
# more than the tokens move, last) and what the refusal must name.
LIES = {
    "oversize": (8, [((0, 2), (0, 8), 1 << 20, True)],
                 "packed move 12288 bytes, the notification says 1060864"),
    "fewer-bytes": (8, [((0, 2), (0, 8), -1, True)],
                    "packed move 12288 bytes, the notification says 12287"),
    "duplicate": (8, [((0, 1), (0, 4), 0, False), ((0, 1), (0, 4), 0, True)],
                  "tokens [0, 4) were already received"),
    # [0, 8) then [4, 8) as last of 12 tokens: 12 tokens counted, [8, 12) never arrived
    "overlap-plus-gap": (12, [((0, 2), (0, 8), 0, False), ((1, 2), (4, 8), 0, True)],
                         "tokens [4, 8) were already received (layers [0, 2) overlap rows "
                         "[0, 8) layers [0, 2))"),
    "outside": (8, [((1, 3), (4, 12), 0, True)], "lie outside request 3"),
    "tokens-past-pages": (8, [((0, 1), (0, 8), 0, True)],
                          "pages [0, 1) / tokens [0, 8) lie outside request 3"),
    "short": (8, [((0, 1), (0, 4), 0, True)],
              "every sender finished but only 4 of 8 tokens of route tp0.pp0 arrived"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_bad_notifications_are_refused_and_the_pool_untouched(case, rig):
    """A sender that lies: the receiver refuses by name (rx-nbytes, rx-token-range,
    rx-overlap-exact, rx-route-count), fails the request, releases the slot once the liar says
    it writes no more; no page outside the request is written."""
    num_tokens, notes, message = LIES[case]
    _, dst = caches()
    recv = rogue_receiver(rig, dst)
    liar = Rogue(recv.address, dst)
    before = snapshot(dst)
    ids = torch.tensor([4, 5, 6][:-(-num_tokens // dst.page_size)])
    recv.expect(3, ids, source="rogue", num_tokens=num_tokens)
    liar.send(Announce(3, num_tokens, len(ids)))
    dest = liar.recv()
    bpt = dst.packed_nbytes(1)
    for pages, (t0, t1), more, last in notes:
        liar.send(Note(3, dest.use, pages, (t0, t1), (0, 2), (t1 - t0) * bpt + more, "packed",
                       last, None, None))
    assert recv.wait(3) == KVStatus.Failed
    assert message in recv.reason(3), recv.reason(3)
    verdict = liar.recv()
    assert verdict.status == KVStatus.Failed and verdict.use == dest.use
    # the slot stays fenced until the liar says it writes no more
    if not notes[-1][3]:
        assert not recv.settle(0.3) and len(recv.arena.live_slots) == 1
    liar.send(End(3, dest.use, False, None))
    assert recv.settle(5)
    assert recv.arena.live_slots == []
    assert_untouched_outside(dst, before, ids)
    liar.close()
    recv.close()


def test_duplicate_sender_id_is_refused(rig):
    src, dst = caches()
    recv = rogue_receiver(rig, dst)
    kw = dict(instance="p", rank=ParallelRank(cp=0), sizes=ParallelSizes(cp=2),
              engine=rig[0], arena=rig[1], timeout=5)
    a, b = KVSender(src, **kw), KVSender(src, **kw)
    recv.expect(1, torch.tensor([1]), source="p", num_tokens=4)
    a.send(1, torch.tensor([1]), to=recv.address, num_tokens=4)
    wait_for(lambda: recv.stats()["senders"] == 1, what="a connected")
    b.send(1, torch.tensor([1]), to=recv.address, num_tokens=4)
    assert b.wait(1) == KVStatus.Failed
    assert "duplicate sender: p/dp0.cp0.tp0.pp0 is connected already" in b.reason(1)
    for s in (a, b):
        s.close()
    recv.close()


@pytest.mark.slow
def test_receiver_times_out_when_a_sender_never_reports(rig):
    """Rank 1 never sends: the request times out naming it. Rank 1 never held the
    destination, so nothing fences the slot: it is free at once."""
    src, dst = caches()
    g = Group(src, dst, rig, timeout=1.5)
    before = snapshot(dst)
    g.expect(4, torch.tensor([1, 2]), 8)
    g.send(4, torch.tensor([5, 6]), 8, senders=g.senders[:1])  # rank 1 stays silent
    assert wait_all([(g.recv, 4)]) == [KVStatus.Failed]
    assert "timed out after 1.5 s waiting for senders [" \
           f"'{g.instance}/dp0.cp1.tp0.pp0']" in g.recv.reason(4), g.recv.reason(4)
    assert g.recv.arena.live_slots == []
    assert_untouched_outside(dst, before, [1, 2])
    wait_all([(g.senders[0], 4)])
    g.close()


@pytest.mark.slow
def test_sender_gives_up_on_a_destination_within_its_own_timeout(rig):
    """A request the receiver never expects: Failed within the sender's 1 s (plus slack)."""
    src, dst = caches()
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


@pytest.mark.slow
def test_a_silent_holder_keeps_the_slot_fenced_past_the_grace(rig):
    """A sender that was given the destination and says nothing more might still write: its
    slot is never reused (counted once past the grace), until it says it stopped."""
    _, dst = caches()
    recv = rogue_receiver(rig, dst, timeout=1.0, grace=0.5)
    liar = Rogue(recv.address, dst)
    recv.expect(5, torch.tensor([1, 2]), source="rogue", num_tokens=8)
    liar.send(Announce(5, 8, 2))
    dest = liar.recv()
    assert recv.wait(5) == KVStatus.Failed and "timed out" in recv.reason(5)
    assert liar.recv().status == KVStatus.Failed
    assert not recv.settle(1.0)
    assert recv.stats()["quarantined_past_grace"] == 1 and len(recv.arena.live_slots) == 1
    liar.send(End(5, dest.use, False, None))
    assert recv.settle(5) and recv.arena.live_slots == []
    liar.close()
    recv.close()


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
    s = KVSender(src, engine=rig[0], arena=rig[1])
    to = "127.0.0.1:1"
    with pytest.raises(ValueError, match="request_id: expected a non-negative int below 2"):
        s.send(-1, torch.tensor([0]), to=to)
    with pytest.raises(TypeError, match="request_id: expected an int or a str, got float"):
        s.send(1.0, torch.tensor([0]), to=to)
    with pytest.raises(ValueError, match=r"chunk: expected 0 <= start <= stop <= 2, got \[1, 3\)"):
        s.send(1, torch.tensor([0, 1]), to=to, chunk=(1, 3))
    with pytest.raises(ValueError, match="num_tokens <= 8"):
        s.send(1, torch.tensor([0, 1]), to=to, num_tokens=9)
    with pytest.raises(ValueError, match="address: expected 'host:port', got 'nowhere'"):
        s.send(1, torch.tensor([0, 1]), to="nowhere")
    with pytest.raises(TypeError, match="to: expected a receiver address"):
        s.send(1, torch.tensor([0, 1]), to=[])
    with pytest.raises(ValueError, match="cp: expected 0 <= rank < size, got rank 2, size 2"):
        KVSender(src, rank=ParallelRank(cp=2), sizes=ParallelSizes(cp=2), engine=rig[0],
                 arena=rig[1])
    assert s.stats()["connections"] == 0  # nothing was queued, nobody was dialled
    s.close()


def test_requests_in_flight_may_not_share_decode_pages(rig):
    src, dst = caches()
    g = Group(src, dst, rig)
    g.expect(1, torch.tensor([3, 4, 5]), 12)
    with pytest.raises(ValueError, match=r"still receiving request\(s\) \[1\]"):
        g.expect(2, torch.tensor([7, 5]), 8)
    g.expect(3, torch.tensor([7, 8]), 8)  # disjoint: fine
    g.send(1, torch.tensor([0, 1, 2]), 12)
    assert wait_all([(g.recv, 1)]) == [KVStatus.Success]
    g.expect(2, torch.tensor([5, 6]), 8)  # request 1 finished: its pages are free
    g.close()


@pytest.mark.parametrize("src_ps,dst_ps", [(16, 32), (32, 16), (4, 1), (3, 5)])
def test_page_sizes_may_differ_between_the_sides(src_ps, dst_ps, rig):
    """Packed transfers move tokens, not pages: a CP 2 prefill group with pages of
    ``src_ps`` fills a decode pool with pages of ``dst_ps`` (shares start mid-page there),
    bit-exact; direct mode, which moves pages, refuses the pair by name."""
    n = 5 * src_ps - 1
    src = make_cache(mha(), num_layers=2, num_pages=8, page_size=src_ps, seed=1)
    dst_pages = -(-n // dst_ps)
    dst = fill_sentinel(make_cache(mha(), num_layers=2, num_pages=dst_pages + 3,
                                   page_size=dst_ps, seed=2))
    s_ids = torch.randperm(8)[:5]
    d_ids = torch.randperm(dst_pages + 3)[:dst_pages]
    want = oracle_unpack(src, s_ids, dst, d_ids, n, range(2), range(2), range(2), range(2))
    g = Group(src, dst, rig)
    g.expect(1, d_ids, n)
    g.send(1, s_ids, n)
    assert g.wait(1) == [KVStatus.Success] * 3, g.recv.reason(1)
    assert_cache_equals(dst, want)
    g.close()
    direct = Group(src, dst, rig, cp=1, direct=True, sender_kw={"mode": "direct"})
    direct.expect(2, d_ids, n)
    direct.send(2, s_ids, n)
    assert direct.wait(2) == [KVStatus.Failed] * 2
    assert "does not accept direct writes" in direct.senders[0].reason(2)
    direct.close()
