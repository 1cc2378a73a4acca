"""What each spawned process runs in test_transfer_mp.py: ranks 0..cp-1 prefill, rank cp decode.

Every process builds the same prefill pool from the same seed, so the decode rank can compute
the expected bytes itself and compare its pool bit for bit. Per scenario the decode rank
publishes its receiver's address in the group's folder (`mp.publish`); the prefill ranks look
it up and name it in every `send`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, mla, oracle_unpack, snapshot
from mp import Recorder, alive, lookup, publish, wait_for

from cpkv.staging import StagingArena
from cpkv.transfer import (
    KVReceiver,
    KVSender,
    KVStatus,
    ParallelRank,
    ParallelSizes,
    TransferEngine,
)

KINDS = {"mha": mha, "mla": mla}
CP = 2
DONE = (KVStatus.Success, KVStatus.Failed)


def scenarios():
    out = [dict(name=f"{kind}-{policy}-ps16", kind=kind, policy=policy, ps=16)
           for kind in KINDS for policy in ("all", "rank0", "rotate")]
    out.append(dict(name="mha-all-ps1", kind="mha", policy="all", ps=1))
    out.append(dict(name="mla-chunked-empty-last-share", kind="mla", policy="all", ps=16,
                    chunks=[(0, 3), (5, 8), (3, 5)]))
    return out


def requests(ps):
    """request id -> (prefill ids, decode ids, tokens): partial last pages, fragmented ids.

    Requests in flight together own disjoint decode pages (the receiver refuses overlaps);
    prefill pages may be shared (they are only read)."""
    g = torch.Generator().manual_seed(ps)
    decode_perm = torch.randperm(20, generator=g)
    out, used = {}, 0
    for rid, n_pages in ((11, 8), (12, 3), (13, 5)):
        n = n_pages * ps - (ps // 3)
        out[rid] = (torch.randperm(20, generator=g)[:n_pages],
                    decode_perm[used:used + n_pages], n)
        used += n_pages
    return out


def pools(kind, ps):
    src = make_cache(KINDS[kind](), num_layers=3, num_pages=20, page_size=ps, seed=5)
    dst = fill_sentinel(make_cache(KINDS[kind](), num_layers=3, num_pages=20, page_size=ps))
    return src, dst


def wait(obj, rids, timeout=30.0):
    deadline = time.monotonic() + timeout
    return {r: obj.wait(r, max(0.0, deadline - time.monotonic())) for r in rids}


PREFILL = "prefill"  # the prefill instance's name (its senders' and the receiver's source)


class Meeting:
    """Where one scenario's processes meet: files in the group's folder (`mp.publish`)."""

    def __init__(self, out_path: str, name: str):
        self.base = Path(out_path).parent / name

    def publish(self, what: str, value=True) -> None:
        publish(f"{self.base}.{what}", value)

    def lookup(self, what: str, timeout: float = 120.0):
        return lookup(f"{self.base}.{what}", timeout)


def prefill(rank, meet, engine, arena, sc, timeout=20.0):
    src, _ = pools(sc["kind"], sc["ps"])
    reqs = requests(sc["ps"])
    to = meet.lookup("address")
    with KVSender(src, instance=PREFILL, rank=ParallelRank(cp=rank), sizes=ParallelSizes(cp=CP),
                  kind=sc["kind"], policy=sc["policy"], engine=engine, arena=arena,
                  timeout=timeout) as sender:
        chunks = sc.get("chunks")
        for rid, (s_ids, _, n) in reqs.items():
            for i, chunk in enumerate(chunks or [None]):
                last = chunks is None or i == len(chunks) - 1
                if chunk is not None:
                    chunk = (min(chunk[0], len(s_ids)), min(chunk[1], len(s_ids)))
                sender.send(rid, s_ids, to=to, num_tokens=n, chunk=chunk, last=last,
                            metadata=f"first-token-{rid}".encode() if last else None)
        st = wait(sender, list(reqs))
        bad = {r: (s, sender.reason(r)) for r, s in st.items() if s != KVStatus.Success}
        assert not bad, bad
        assert arena.live_slots == [], arena.live_slots


def decode(meet, engine, arena, sc, timeout=20.0):
    src, dst = pools(sc["kind"], sc["ps"])
    reqs = requests(sc["ps"])
    want = snapshot(dst)
    heads = range(dst.num_heads)
    for s_ids, d_ids, n in reqs.values():
        want = oracle_unpack(src, s_ids, dst, d_ids, n, range(3), heads, range(3), heads, want)
    with KVReceiver(dst, kind=sc["kind"], engine=engine, arena=arena,
                    timeout=timeout) as recv:
        meet.publish("address", recv.address)
        for rid, (_, d_ids, n) in reqs.items():
            recv.expect(rid, d_ids, source=PREFILL, num_tokens=n)
        st = wait(recv, list(reqs))
        bad = {r: (s, recv.reason(r)) for r, s in st.items() if s != KVStatus.Success}
        assert not bad, bad
        for rid in reqs:
            assert recv.metadata(rid) == f"first-token-{rid}".encode(), recv.metadata(rid)
        assert arena.live_slots == [], arena.live_slots
    assert_cache_equals(dst, want)


def _setup():
    engine = TransferEngine("127.0.0.1")
    arena = StagingArena(16 << 20)
    engine.register_arena(arena)
    return engine, arena


def main_rank(rank, world, port, out_path):
    """Every scenario, in order; prefill ranks and the decode rank meet per scenario."""
    rec = Recorder(out_path)
    try:
        engine, arena = _setup()
        for sc in scenarios():
            meet = Meeting(out_path, sc["name"])
            if rank < CP:
                rec.run(sc["name"], prefill, rank, meet, engine, arena, sc)
            else:
                rec.run(sc["name"], decode, meet, engine, arena, sc)
    except Exception as e:
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)


def sender_dies(rank, meet, engine, arena, dst, timeout):
    """Prefill rank 1 starts its sender, sees the request start, then dies without sending:
    the receiver fails the request within the timeout naming it, releases the slot and leaves
    every page outside the request untouched."""
    src, _ = pools("mha", 16)
    s_ids, d_ids, n = requests(16)[11]
    kw = dict(instance=PREFILL, sizes=ParallelSizes(cp=CP), engine=engine, arena=arena,
              timeout=timeout)
    if rank == 1:  # set up, sees the request start, then dies mid-request
        KVSender(src, rank=ParallelRank(cp=1), **kw)
        meet.publish("ready1")
        meet.lookup("expected")
        return "die"
    if rank == 0:
        with KVSender(src, rank=ParallelRank(cp=0), **kw) as sender:
            meet.publish("ready0")
            sender.send(11, s_ids, to=meet.lookup("address"), num_tokens=n)
            wait(sender, [11])
        return None
    before = snapshot(dst)
    with KVReceiver(dst, engine=engine, arena=arena, timeout=timeout) as recv:
        meet.publish("address", recv.address)
        for r in range(CP):  # both senders are up: the bound below is the request's own
            meet.lookup(f"ready{r}")
        t0 = time.monotonic()
        recv.expect(11, d_ids, source=PREFILL, num_tokens=n)
        meet.publish("expected")
        st = wait(recv, [11], timeout=timeout + 10)[11]
        elapsed = time.monotonic() - t0
        assert st is KVStatus.Failed and f"waiting for senders ['{PREFILL}/dp0.cp1" in \
            recv.reason(11), (st, recv.reason(11))
        assert elapsed < timeout + 2, f"failed only after {elapsed:.1f} s"
        assert recv.settle(timeout + 10)  # the dead rank never held the destination
        assert arena.live_slots == []
    pages = [int(i) for i in d_ids]  # a failed request's own pages are undefined (rule 3)
    for name, layers in snapshot(dst).items():
        for i, t in enumerate(layers):
            before[name][i][pages] = t[pages]
    assert_cache_equals(dst, before, "pages outside the request")
    return None


class DiesBeforeTheWrite:
    """The engine, except that its first write waits until the receiver's process is gone
    and the sender has seen its connection end: the write goes, past the fence, to a dead
    peer."""

    def __init__(self, engine, meet):
        self._engine, self._meet, self.sender, self.dead_at = engine, meet, None, None

    def submit(self, *args, **kwargs):
        if self.dead_at is None:
            self._meet.publish("writing")
            pid = self._meet.lookup("pid")
            wait_for(lambda: not alive(pid), 60, "the decode process gone")
            self.dead_at = time.monotonic()
            wait_for(lambda: self.sender.stats()["connections"] == 0, 60,
                     "the sender saw its connection end")
        return self._engine.submit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def receiver_dies(rank, meet, engine, arena, timeout):
    """The decode rank gives the sender where to write, then dies before the write: the
    sender fails within the timeout and releases its staging slot once the write failed."""
    src, dst = pools("mla", 16)
    s_ids, d_ids, n = requests(16)[12]
    if rank == CP:
        recv = KVReceiver(dst, kind="mla", engine=engine, arena=arena, timeout=timeout)
        meet.publish("address", recv.address)
        meet.publish("pid", os.getpid())
        recv.expect(12, d_ids, source="solo", num_tokens=n)
        meet.lookup("writing")  # the sender holds the destination and is about to write
        return "die"
    if rank != 0:
        return None
    dying = DiesBeforeTheWrite(engine, meet)
    with KVSender(src, instance="solo", kind="mla", engine=dying, arena=arena,
                  timeout=timeout) as sender:
        dying.sender = sender
        # start-up may take long on a loaded machine; the bound under test is the failure below
        sender.send(12, s_ids, to=meet.lookup("address"), num_tokens=n)
        st = wait(sender, [12], timeout=120)[12]
        assert st is KVStatus.Failed, (st, sender.reason(12))
        assert time.monotonic() - dying.dead_at < timeout + 2
        assert "connection to receiver" in sender.reason(12), sender.reason(12)
        wait_for(lambda: arena.live_slots == [], timeout + 10, "the failed write's slot freed")
    return None


def fault_rank(rank, world, port, out_path, timeout=3.0):
    rec = Recorder(out_path)
    try:
        engine, arena = _setup()
        _, dst = pools("mha", 16)
        outcome = {}

        def run(name, fn, *args):
            def body():
                outcome[name] = fn(rank, Meeting(out_path, name), engine, arena, *args)
            rec.run(name, body)
            if outcome.get(name) == "die":
                rec.save()
                os._exit(1)  # a crash: no close, no goodbye

        run("sender-dies", sender_dies, dst, timeout)
        run("receiver-dies", receiver_dies, timeout)
    except Exception as e:
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)


def hetero_rank(rank, world, port, out_path):
    """Ranks 0-3: prefill tp = rank // 2, cp = rank % 2 (8 KV heads, 4 per rank); rank 4:
    a tp 1 decode rank receiving both head halves, packed then direct. Both sides derive the
    routes from the instances' sizes."""
    from cpkv.parallel import heads_of

    rec = Recorder(out_path)
    try:
        engine, arena = _setup()
        heads_total, ps = 8, 16
        src_full = make_cache(mha(num_heads=heads_total), num_layers=3, num_pages=20,
                              page_size=ps, seed=9)
        reqs = requests(ps)
        for mode in ("packed", "direct"):
            meet = Meeting(out_path, f"hetero-{mode}")
            if rank < 4:
                tp, cp = divmod(rank, 2)
                h = heads_of(tp, 2, heads_total)
                local = make_cache(mha(num_heads=4), num_layers=3, num_pages=20, page_size=ps)
                for name, layers in local.buffers.items():
                    for i, t in enumerate(layers):
                        t.copy_(src_full.layer(name, i)[:, :, h.start:h.stop])

                def send(local=local, tp=tp, cp=cp, meet=meet, mode=mode):
                    with KVSender(local, instance=PREFILL, rank=ParallelRank(cp=cp, tp=tp),
                                  sizes=ParallelSizes(cp=2, tp=2), mode=mode, engine=engine,
                                  arena=arena) as s:
                        to = meet.lookup("address")
                        for rid, (s_ids, _, n) in reqs.items():
                            s.send(rid, s_ids, to=to, num_tokens=n)
                        st = wait(s, list(reqs))
                        assert all(v is KVStatus.Success for v in st.values()), (
                            st, [s.reason(r) for r in reqs])
                rec.run(f"hetero-{mode}", send)
            else:
                def receive(meet=meet, mode=mode):
                    dst = fill_sentinel(make_cache(mha(num_heads=heads_total), num_layers=3,
                                                   num_pages=20, page_size=ps))
                    want = snapshot(dst)
                    hr = range(heads_total)
                    for s_ids, d_ids, n in reqs.values():
                        want = oracle_unpack(src_full, s_ids, dst, d_ids, n, range(3), hr,
                                             range(3), hr, want)
                    with KVReceiver(dst, direct=mode == "direct", engine=engine,
                                    arena=arena) as recv:
                        meet.publish("address", recv.address)
                        for rid, (_, d_ids, n) in reqs.items():
                            recv.expect(rid, d_ids, source=PREFILL, num_tokens=n)
                        st = wait(recv, list(reqs))
                        assert all(v is KVStatus.Success for v in st.values()), (
                            st, [recv.reason(r) for r in reqs])
                    assert_cache_equals(dst, want)
                rec.run(f"hetero-{mode}", receive)
    except Exception as e:
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)
