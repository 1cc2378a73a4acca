"""What each spawned process runs in test_transfer_mp.py: ranks 0..cp-1 prefill, rank cp decode.

Every process builds the same prefill pool from the same seed, so the decode rank can compute
the expected bytes itself and compare its pool bit for bit.
"""

from __future__ import annotations

import os
import time

import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, mla, oracle_unpack, snapshot
from mp import Recorder

from cpkv.staging import StagingArena
from cpkv.transfer import ControlPlane, KVReceiver, KVSender, KVStatus, ParallelRank, TransferEngine

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


def wait_dest(control, rid, timeout):
    """Block until the current receiver has published request ``rid``'s destination."""
    inc = control.wait_get(control.key("recv"), timeout)["inc"]
    return control.wait_get(control.key(inc, "dest", rid), timeout)


def prefill(rank, control, engine, arena, sc, timeout=20.0):
    src, _ = pools(sc["kind"], sc["ps"])
    reqs = requests(sc["ps"])
    with KVSender(src, control, rank=ParallelRank(cp=rank), cp_size=CP, policy=sc["policy"],
                  engine=engine, arena=arena, timeout=timeout) as sender:
        chunks = sc.get("chunks")
        for rid, (s_ids, _, n) in reqs.items():
            for i, chunk in enumerate(chunks or [None]):
                last = chunks is None or i == len(chunks) - 1
                if chunk is not None:
                    chunk = (min(chunk[0], len(s_ids)), min(chunk[1], len(s_ids)))
                sender.send(rid, s_ids, num_tokens=n, chunk=chunk, last=last,
                            metadata=f"first-token-{rid}".encode() if last else None)
        st = wait(sender, list(reqs))
        bad = {r: (s, sender.reason(r)) for r, s in st.items() if s != KVStatus.Success}
        assert not bad, bad
        assert arena.live_slots == [], arena.live_slots


def decode(control, engine, arena, sc, timeout=20.0):
    src, dst = pools(sc["kind"], sc["ps"])
    reqs = requests(sc["ps"])
    want = snapshot(dst)
    heads = range(dst.num_heads)
    for s_ids, d_ids, n in reqs.values():
        want = oracle_unpack(src, s_ids, dst, d_ids, n, range(3), heads, range(3), heads, want)
    with KVReceiver(dst, control, cp_size=CP,
                    engine=engine, arena=arena, timeout=timeout) as recv:
        assert recv.setup_error is None, recv.setup_error
        for rid, (_, d_ids, n) in reqs.items():
            recv.expect(rid, d_ids, num_tokens=n)
        st = wait(recv, list(reqs))
        bad = {r: (s, recv.reason(r)) for r, s in st.items() if s != KVStatus.Success}
        assert not bad, bad
        for rid in reqs:
            assert recv.metadata(rid) == f"first-token-{rid}".encode(), recv.metadata(rid)
        assert arena.live_slots == [], arena.live_slots
    assert_cache_equals(dst, want)


def _setup(port):
    control = ControlPlane(port=port, timeout=60)
    engine = TransferEngine("127.0.0.1")
    arena = StagingArena(16 << 20)
    engine.register_arena(arena)
    return control, engine, arena


def main_rank(rank, world, port, out_path):
    """Every scenario, in order; prefill ranks and the decode rank meet per namespace."""
    rec = Recorder(out_path)
    try:
        control, engine, arena = _setup(port)
        for sc in scenarios():
            ns = control.scoped(sc["name"])
            if rank < CP:
                rec.run(sc["name"], prefill, rank, ns, engine, arena, sc)
            else:
                rec.run(sc["name"], decode, ns, engine, arena, sc)
    except Exception as e:
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)


def sender_dies(rank, control, engine, arena, dst, timeout):
    """Prefill rank 1 exits before sending: the receiver fails the request within the timeout,
    releases the slot and leaves its pool untouched."""
    src, _ = pools("mha", 16)
    s_ids, d_ids, n = requests(16)[11]
    if rank == 1:  # registers, sees the request start, then dies mid-request
        KVSender(src, control, rank=ParallelRank(cp=1), cp_size=CP, engine=engine, arena=arena,
                 timeout=timeout)
        wait_dest(control, 11, 120)
        return "die"
    if rank == 0:
        with KVSender(src, control, rank=ParallelRank(cp=0), cp_size=CP, engine=engine,
                      arena=arena, timeout=timeout) as sender:
            sender.send(11, s_ids, num_tokens=n)
            wait(sender, [11])
        return None
    before = snapshot(dst)
    with KVReceiver(dst, control, cp_size=CP,
                    engine=engine, arena=arena, timeout=timeout) as recv:
        assert recv.setup_error is None, recv.setup_error
        t0 = time.monotonic()
        recv.expect(11, d_ids, num_tokens=n)
        st = wait(recv, [11], timeout=timeout + 10)[11]
        elapsed = time.monotonic() - t0
        assert st is KVStatus.Failed and "waiting for senders ['dp0.cp1" in recv.reason(11), (
            st, recv.reason(11))
        assert elapsed < timeout + 2, f"failed only after {elapsed:.1f} s"
        assert recv.settle(timeout + 10)  # the dead rank never acknowledges: the grace period
        assert arena.live_slots == []
    assert_cache_equals(dst, before)
    return None


def receiver_dies(rank, control, engine, arena, timeout):
    """The decode rank publishes where to write, then dies: the sender fails within the
    timeout and releases its staging slot."""
    src, dst = pools("mla", 16)
    s_ids, d_ids, n = requests(16)[12]
    if rank == CP:
        recv = KVReceiver(dst, control, cp_size=1, engine=engine,
                          arena=arena, timeout=timeout)
        recv.expect(12, d_ids, num_tokens=n)
        return "die"
    if rank != 0:
        return None
    with KVSender(src, control, rank=ParallelRank(cp=0), cp_size=1, engine=engine,
                  arena=arena, timeout=timeout) as sender:
        # start-up may take long on a loaded machine; the bound under test is the failure below
        wait_dest(control, 12, 120)
        time.sleep(1.0)  # the decode process is gone by now
        t0 = time.monotonic()
        sender.send(12, s_ids, num_tokens=n)
        st = wait(sender, [12], timeout=timeout + 10)[12]
        assert st is KVStatus.Failed, (st, sender.reason(12))
        assert time.monotonic() - t0 < timeout + 2
        assert "write failed" in sender.reason(12), sender.reason(12)
        assert arena.live_slots == []
    return None


def fault_rank(rank, world, port, out_path, timeout=3.0):
    rec = Recorder(out_path)
    try:
        control, engine, arena = _setup(port)
        _, dst = pools("mha", 16)
        outcome = {}

        def run(name, fn, *args):
            def body():
                outcome[name] = fn(rank, control.scoped(name), engine, arena, *args)
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
    a tp 1 decode rank receiving both head halves, packed then direct."""
    from cpkv.parallel import ParallelSizes, heads_of
    from cpkv.transfer.mapping import map_ranks

    rec = Recorder(out_path)
    try:
        control, engine, arena = _setup(port)
        heads_total, ps = 8, 16
        routes = map_ranks(ParallelSizes(tp=2, cp=2), ParallelSizes(tp=1),
                           num_kv_heads=heads_total, num_layers=3)[(0, 0)]
        src_full = make_cache(mha(num_heads=heads_total), num_layers=3, num_pages=20,
                              page_size=ps, seed=9)
        reqs = requests(ps)
        for mode in ("packed", "direct"):
            ns = control.scoped(f"hetero-{mode}")
            if rank < 4:
                tp, cp = divmod(rank, 2)
                h = heads_of(tp, 2, heads_total)
                local = make_cache(mha(num_heads=4), num_layers=3, num_pages=20, page_size=ps)
                for name, layers in local.buffers.items():
                    for i, t in enumerate(layers):
                        t.copy_(src_full.layer(name, i)[:, :, h.start:h.stop])
                route = next(r for r in routes if r.tp == tp)

                def send(local=local, route=route, tp=tp, cp=cp, ns=ns, mode=mode):
                    with KVSender(local, ns, rank=ParallelRank(cp=cp, tp=tp), cp_size=2,
                                  route=route, mode=mode, engine=engine, arena=arena) as s:
                        for rid, (s_ids, _, n) in reqs.items():
                            s.send(rid, s_ids, num_tokens=n)
                        st = wait(s, list(reqs))
                        assert all(v is KVStatus.Success for v in st.values()), (
                            st, [s.reason(r) for r in reqs])
                rec.run(f"hetero-{mode}", send)
            else:
                def receive(ns=ns, mode=mode):
                    dst = fill_sentinel(make_cache(mha(num_heads=heads_total), num_layers=3,
                                                   num_pages=20, page_size=ps))
                    want = snapshot(dst)
                    hr = range(heads_total)
                    for s_ids, d_ids, n in reqs.values():
                        want = oracle_unpack(src_full, s_ids, dst, d_ids, n, range(3), hr,
                                             range(3), hr, want)
                    with KVReceiver(dst, ns, cp_size=2, routes=routes, direct=mode == "direct",
                                    engine=engine, arena=arena) as recv:
                        assert recv.setup_error is None, recv.setup_error
                        for rid, (_, d_ids, n) in reqs.items():
                            recv.expect(rid, d_ids, num_tokens=n)
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
