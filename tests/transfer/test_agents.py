"""One agent per rank, any number of peers (issue 19): prefill instances with different sizes
feed decode receivers request by request, routed at random; equal coordinates in two instances
never collide; threads and sockets do not grow with the peers a rank has talked to. One
process: real Mooncake engines on TCP loopback, real sockets; every byte checked."""

import os
import random
import threading

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack, snapshot
from mp import wait_for
from txtest import wait_all

from cpkv.parallel import heads_of
from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelSizes

PS, HEADS, LAYERS = 4, 4, 2


def instance(rig, name, sizes, seed, **kw):
    """A prefill instance: one sender per rank over its own pool (its heads of the model)."""
    ranks = [r for r in sizes.ranks() if r.dp == 0]
    out = []
    for r in ranks:
        heads = len(heads_of(r.tp, sizes.tp, HEADS))
        pool = make_cache(mha(num_heads=heads), num_layers=LAYERS, num_pages=16, page_size=PS,
                          seed=seed + 10 * r.tp)
        out.append(KVSender(pool, instance=name, rank=r, sizes=sizes, num_kv_heads=HEADS,
                            engine=rig[0], arena=rig[1], timeout=20, **kw))
    return out


def receiver(rig, name):
    pool = fill_sentinel(make_cache(mha(num_heads=HEADS), num_layers=LAYERS, num_pages=64,
                                    page_size=PS, seed=99))
    return KVReceiver(pool, instance=name, engine=rig[0], arena=rig[2], timeout=20)


def expected(senders, dst, s_ids, d_ids, n, want):
    """Each TP rank's heads land at their place in the decode pool (CP ranks hold the same)."""
    for s in senders:
        if s.rank.cp:
            continue
        heads = heads_of(s.rank.tp, s.sizes.tp, HEADS)
        want = oracle_unpack(s.cache, s_ids, dst, d_ids, n, range(LAYERS),
                             range(len(heads)), range(LAYERS), heads, want=want)
    return want


def test_two_instances_of_other_sizes_feed_two_receivers_at_random(rig):
    """Instance A (CP 2, TP 1) and B (CP 2, TP 2) feed decode receivers D0 and D1 (TP 1):
    40 requests, each from a random instance to a random receiver, all in flight together,
    so each receiver is fed by both instances at once. Every byte lands where it should."""
    a = instance(rig, "A", ParallelSizes(cp=2), seed=1)
    b = instance(rig, "B", ParallelSizes(cp=2, tp=2), seed=2)
    receivers = [receiver(rig, f"D{i}") for i in range(2)]
    rng = random.Random(0)
    want = [snapshot(r.cache) for r in receivers]
    plan, free = [], [list(range(64)) for _ in receivers]
    for rid in range(40):
        src, d = rng.choice([("A", a), ("B", b)]), rng.randrange(2)
        n = rng.randrange(1, 3 * PS + 1)
        pages = -(-n // PS)
        s_ids = torch.randperm(16)[:pages]
        d_ids = torch.tensor([free[d].pop(rng.randrange(len(free[d]))) for _ in range(pages)])
        want[d] = expected(src[1], receivers[d].cache, s_ids, d_ids, n, want[d])
        receivers[d].expect(f"req-{rid}", d_ids, source=src[0], num_tokens=n)
        plan.append((f"req-{rid}", src[1], d, s_ids, n))
    for rid, senders, d, s_ids, n in plan:
        for s in senders:
            s.send(rid, s_ids, to=receivers[d].address, num_tokens=n)
    pairs = [(receivers[d], rid) for rid, _, d, _, _ in plan]
    pairs += [(s, rid) for rid, senders, _, _, _ in plan for s in senders]
    assert wait_all(pairs, timeout=60) == [KVStatus.Success] * len(pairs)
    for r, w in zip(receivers, want, strict=True):
        assert_cache_equals(r.cache, w)
    assert [r.stats()["senders"] for r in receivers] == [6, 6]  # 2 of A, 4 of B each
    for s in a + b:
        assert s.stats()["peers"] == 2 and s.stats()["threads"] == 3
        s.close()
    for r in receivers:
        r.close()


def test_two_instances_with_equal_coordinates_never_collide(rig):
    """Two single-rank instances (both dp0.cp0.tp0.pp0) send to one receiver concurrently:
    each request is judged against its own source."""
    x, y = instance(rig, "X", ParallelSizes(), seed=3), instance(rig, "Y", ParallelSizes(), seed=4)
    recv = receiver(rig, "D")
    want = snapshot(recv.cache)
    for rid, (name, senders, d_ids) in enumerate([("X", x, [1, 2]), ("Y", y, [3, 4])]):
        want = expected(senders, recv.cache, torch.tensor([5, 6]), torch.tensor(d_ids),
                        2 * PS, want)
        recv.expect(rid, torch.tensor(d_ids), source=name, num_tokens=2 * PS)
    for rid, senders in enumerate((x, y)):
        senders[0].send(rid, torch.tensor([5, 6]), to=recv.address, num_tokens=2 * PS)
    assert wait_all([(recv, 0), (recv, 1), (x[0], 0), (y[0], 1)]) == [KVStatus.Success] * 4
    assert_cache_equals(recv.cache, want)
    assert recv.stats()["senders"] == 2
    for s in x + y:
        s.close()
    recv.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_threads_and_sockets_do_not_grow_with_the_peers_talked_to(rig):
    """One sender ships to 8 receivers in turn: its threads stay 3, its connections go back
    to none once idle, and the process's threads and descriptors come back to where they
    were once the receivers are gone."""
    (sender,) = instance(rig, "P", ParallelSizes(), seed=5, idle=0.2)
    warm = receiver(rig, "warm")  # first use of the engine and the arenas
    warm.expect(0, torch.tensor([0]), source="P", num_tokens=PS)
    sender.send(0, torch.tensor([1]), to=warm.address, num_tokens=PS)
    assert wait_all([(warm, 0), (sender, 0)]) == [KVStatus.Success] * 2
    sender.forget(0)
    warm.close()
    wait_for(lambda: sender.stats()["connections"] == 0, what="the idle connection closed")
    threads, fds = threading.active_count(), _fds()
    for k in range(8):
        recv = receiver(rig, f"D{k}")
        recv.expect(k, torch.tensor([k]), source="P", num_tokens=PS)
        sender.send(k, torch.tensor([k]), to=recv.address, num_tokens=PS)
        assert wait_all([(recv, k), (sender, k)]) == [KVStatus.Success] * 2
        assert sender.stats()["threads"] == 3 and sender.stats()["connections"] <= 1
        recv.close()
        sender.forget(k)
    wait_for(lambda: sender.stats()["connections"] == 0 and sender.stats()["peers"] == 0,
             what="idle connections closed")
    assert threading.active_count() == threads
    assert _fds() <= fds + 2, (fds, _fds())  # Mooncake may keep a socket to its own engine
    sender.close()


@pytest.mark.slow
def test_a_long_run_stays_flat(rig):
    """300 requests alternating over two receivers: no state accumulates on either side."""
    (sender,) = instance(rig, "P", ParallelSizes(), seed=6)
    receivers = [receiver(rig, f"D{i}") for i in range(2)]
    for rid in range(300):
        r = receivers[rid % 2]
        r.expect(rid, torch.tensor([rid % 64]), source="P", num_tokens=PS)
        sender.send(rid, torch.tensor([rid % 16]), to=r.address, num_tokens=PS)
        assert wait_all([(r, rid), (sender, rid)]) == [KVStatus.Success] * 2
        r.forget(rid)
        sender.forget(rid)
        if rid == 20:
            threads, fds = threading.active_count(), _fds()
    assert threading.active_count() == threads and _fds() == fds
    assert sender.stats() == {"connections": 2, "peers": 2, "open_legs": 0, "requests": 0,
                              "threads": 3}
    for r in receivers:
        s = r.stats()
        assert (s["requests"], s["fenced"], s["announced"], s["staging_bytes"]) == (0, 0, 0, 0)
        r.close()
    sender.close()
