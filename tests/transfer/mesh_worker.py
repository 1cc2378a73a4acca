"""Ranks of a many-to-many deployment in real processes (issue 19): prefill instance A (CP 2,
TP 1), prefill instance B (CP 2, TP 2) and decode receivers D0 and D1 (TP 1 each, two decode
instances), Mooncake over TCP loopback. Every rank derives the same request plan from a seed;
receivers publish their addresses in the group's folder; prefill pools are deterministic, so a
decode rank rebuilds them to check every byte it received.

Rank layout: 0-1 A (cp 0, 1), 2-5 B (cp x tp: (0,0), (0,1), (1,0), (1,1)), 6-7 D0, D1.
Scenarios (in order, every rank): ``mesh`` (requests routed at random, all in flight at once,
each receiver fed by both instances), ``restart`` (rank 1, A's CP rank 1, runs its sender in a
child process that is killed mid-stream and started again with the same coordinates, while B
keeps sending to both receivers: A's requests in flight when it died fail at once, the others
and every later one succeed), ``flat`` (threads and descriptors of every process the same
after a round of traffic as before it, once every connection is open).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import torch
from kvtest import fill_sentinel, make_cache, mha, oracle_unpack, snapshot
from mp import Recorder, lookup, publish, wait_for

from cpkv.parallel import ParallelRank, ParallelSizes, heads_of

PS, HEADS, LAYERS, SRC_PAGES, DST_PAGES = 4, 4, 2, 16, 96
INSTANCES = {"A": ParallelSizes(cp=2), "B": ParallelSizes(cp=2, tp=2)}
RANKS = [("A", ParallelRank(cp=0)), ("A", ParallelRank(cp=1)),
         ("B", ParallelRank(cp=0, tp=0)), ("B", ParallelRank(cp=0, tp=1)),
         ("B", ParallelRank(cp=1, tp=0)), ("B", ParallelRank(cp=1, tp=1)),
         ("D0", None), ("D1", None)]
WORLD = len(RANKS)


def prefill_pool(instance: str, tp: int):
    """The pool of one prefill (instance, TP rank): the same on each of its CP ranks."""
    heads = len(heads_of(tp, INSTANCES[instance].tp, HEADS))
    return make_cache(mha(num_heads=heads), num_layers=LAYERS, num_pages=SRC_PAGES,
                      page_size=PS, seed=100 * (instance == "B") + tp + 1)


def plan(round_: int, n: int = 24):
    """(rid, source, dest, tokens, source pages, dest pages) of one round, the same on every
    rank; dest pages are distinct per receiver and round."""
    rng = random.Random(round_)
    free = {d: list(range(DST_PAGES)) for d in ("D0", "D1")}
    out = []
    for i in range(n):  # every (instance, receiver) pair first, then at random
        src, dst = ("AABB"[i], ("D0", "D1")[i % 2]) if i < 4 else (rng.choice("AB"),
                                                                  rng.choice(["D0", "D1"]))
        tokens = rng.randrange(1, 3 * PS + 1)
        pages = -(-tokens // PS)
        s_ids = rng.sample(range(SRC_PAGES), pages)
        d_ids = [free[dst].pop(rng.randrange(len(free[dst]))) for _ in range(pages)]
        out.append((f"r{round_}-{i}", src, dst, tokens, s_ids, d_ids))
    return out


def expect_and_check(recv, name: str, round_: int, timeout: float = 120.0) -> None:
    """Expect this receiver's requests of the round, wait, check every byte."""
    cache = recv.cache
    want = snapshot(cache)
    mine = [r for r in plan(round_) if r[2] == name]
    for rid, src, _, n, s_ids, d_ids in mine:
        for tp in range(INSTANCES[src].tp):
            heads = heads_of(tp, INSTANCES[src].tp, HEADS)
            want = oracle_unpack(prefill_pool(src, tp), torch.tensor(s_ids), cache,
                                 torch.tensor(d_ids), n, range(LAYERS), range(len(heads)),
                                 range(LAYERS), heads, want=want)
        recv.expect(rid, torch.tensor(d_ids), source=src, num_tokens=n)
    failed = [(rid, recv.reason(rid)) for rid, *_ in mine
              if recv.wait(rid, timeout).name != "Success"]
    assert not failed, failed[:3]
    for c in want:
        for layer in range(LAYERS):
            assert torch.equal(snapshot(cache)[c][layer], want[c][layer]), (c, layer)
    for rid, *_ in mine:
        recv.forget(rid)


def send_round(sender, instance: str, round_: int, addresses: dict,
               timeout: float = 120.0) -> dict:
    """Send this instance's requests of the round (all at once); their final statuses."""
    mine = [r for r in plan(round_) if r[1] == instance]
    for rid, _, dst, n, s_ids, _ in mine:
        sender.send(rid, torch.tensor(s_ids), to=addresses[dst], num_tokens=n)
    out = {rid: sender.wait(rid, timeout).name for rid, *_ in mine}
    out = {rid: s if s == "Success" else f"{s}: {sender.reason(rid)}" for rid, s in out.items()}
    for rid in out:
        sender.forget(rid)
    return out


def _sender(instance, rank, **kw):
    from cpkv.transfer import KVSender

    return KVSender(prefill_pool(instance, rank.tp), instance=instance, rank=rank,
                    sizes=INSTANCES[instance], num_kv_heads=HEADS, timeout=60, **kw)


def _child(conn, instance, rank, addresses):
    """A sender in a process of its own (rank 1's, to be killed and restarted)."""
    sender = _sender(instance, rank)
    conn.send("up")
    while (cmd := conn.recv()) is not None:
        conn.send(send_round(sender, instance, cmd, addresses))
    sender.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    torch.set_num_threads(1)
    rec = Recorder(out)
    folder = Path(out).parent
    instance, coords = RANKS[rank]
    try:
        if coords is None:  # a decode receiver
            from cpkv.transfer import KVReceiver

            cache = fill_sentinel(make_cache(mha(num_heads=HEADS), num_layers=LAYERS,
                                             num_pages=DST_PAGES, page_size=PS, seed=9))
            recv = KVReceiver(cache, instance=instance, num_kv_heads=HEADS, timeout=60,
                              arena_bytes=16 << 20)
            publish(folder / f"{instance}.json", recv.address)
            rec.run("mesh", expect_and_check, recv, instance, 0)
            rec.run("restart", expect_and_check_restart, recv, instance, folder)
            expect_and_check(recv, instance, 3)  # every connection of the steady state open
            base = (threading.active_count(), _fds(), recv.stats()["connections"])
            rec.run("flat", expect_and_check, recv, instance, 4)
            rec.run("flat-counts", lambda: _flat(base, recv.stats()["requests"] == 0,
                                                 recv.stats()["connections"], 0))
            publish(folder / f"{instance}.done", True)
            for other in ("D0", "D1"):
                lookup(folder / f"{other}.done")
            lookup(folder / "senders.done", timeout=120)
            recv.close()
        else:
            addresses = {d: lookup(folder / f"{d}.json") for d in ("D0", "D1")}
            if rank == 1:
                rec.run("mesh", _restartable, instance, coords, addresses, folder, mesh=True)
                rec.run("restart", _restartable, instance, coords, addresses, folder)
                rec.run("flat", _restartable, instance, coords, addresses, folder, rounds=(3, 4))
                rec.run("flat-counts", lambda: None)
            else:
                sender = _sender(instance, coords)
                rec.run("mesh", _all_success, send_round(sender, instance, 0, addresses))
                rec.run("restart", _restart_bystander, sender, instance, addresses, folder)
                _all_success(send_round(sender, instance, 3, addresses))
                base = (threading.active_count(), _fds(), sender.stats()["connections"])
                rec.run("flat", _all_success, send_round(sender, instance, 4, addresses))
                rec.run("flat-counts", lambda: _flat(base, sender.stats()["open_legs"] == 0,
                                                     sender.stats()["connections"], 0.5))
                sender.close()
            publish(folder / f"sender{rank}.done", True)
            if rank == 0:
                for r in range(6):
                    lookup(folder / f"sender{r}.done", timeout=120)
                publish(folder / "senders.done", True)
    except Exception as e:  # recorded for the parent
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    rec.save()


def _all_success(statuses: dict) -> None:
    bad = {rid: s for rid, s in statuses.items() if s != "Success"}
    bad = dict(list(bad.items())[:3])
    assert not bad, bad


MOONCAKE_WARMUP_FDS = 8  # Mooncake's engine grows its pool of TCP connections to each peer
# engine for a while (measured: +0 to +8 descriptors over the first rounds, then flat)


def _flat(base, empty: bool, connections: int, settle: float) -> None:
    """No request left; the same threads and connections of ours; descriptors within what
    Mooncake's own connection pool adds while it warms up."""
    time.sleep(settle)
    assert empty
    threads, fds, ours = base
    now = (threading.active_count(), _fds(), connections)
    assert now[0] == threads and now[2] <= ours and now[1] <= fds + MOONCAKE_WARMUP_FDS, (
        base, now)


_child_state: dict = {}


def _restartable(instance, coords, addresses, folder, *, mesh=False, rounds=()):
    """Rank 1's sender lives in a child process: rounds 0 and 3 go through it; in the
    restart round it is killed after A's first request is on its way, then started again."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def start():
        a, b = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(b, instance, coords, addresses), daemon=True)
        proc.start()
        assert a.recv() == "up"
        _child_state.update(proc=proc, conn=a)

    if "proc" not in _child_state:
        start()
    if mesh or rounds:
        conn = _child_state["conn"]
        for r in rounds or (0,):
            conn.send(r)
            _all_success(conn.recv())
        if rounds:
            conn.send(None)
            _child_state["proc"].join(30)
        return
    # restart round (1): send it, kill the child mid-round, restart, round 2 must succeed
    conn = _child_state["conn"]
    conn.send(1)
    time.sleep(0.05)  # its first writes are on their way
    os.kill(_child_state["proc"].pid, signal.SIGKILL)
    _child_state["proc"].join(30)
    publish(folder / "killed.json", time.monotonic())
    start()
    conn = _child_state["conn"]
    conn.send(2)
    _all_success(conn.recv())


def _restart_bystander(sender, instance, addresses, folder):
    """A rank that keeps working while rank 1 dies: round 1 (its own requests of A fail
    where rank 1's share never came; every B request succeeds), then round 2 all succeed."""
    statuses = send_round(sender, instance, 1, addresses)
    if instance == "B":
        _all_success(statuses)
    lookup(folder / "killed.json")
    _all_success(send_round(sender, instance, 2, addresses))


def expect_and_check_restart(recv, name: str, folder) -> None:
    """Round 1: every request from B succeeds bit-exact; those from A (rank 1 killed) end,
    failed or not, within the timeout; round 2 (after the restart) all succeed."""
    cache = recv.cache
    mine = [r for r in plan(1) if r[2] == name]
    want = snapshot(cache)
    for rid, src, _, n, s_ids, d_ids in mine:
        if src == "B":
            for tp in range(2):
                heads = heads_of(tp, 2, HEADS)
                want = oracle_unpack(prefill_pool("B", tp), torch.tensor(s_ids), cache,
                                     torch.tensor(d_ids), n, range(LAYERS), range(len(heads)),
                                     range(LAYERS), heads, want=want)
        recv.expect(rid, torch.tensor(d_ids), source=src, num_tokens=n)
    for rid, src, *_ in mine:
        status = recv.wait(rid, 120)
        assert status.name in ("Success", "Failed"), (rid, status)
        if src == "B":
            assert status.name == "Success", (rid, recv.reason(rid))
    now = snapshot(cache)
    for rid, src, *_, d_ids in mine:  # B's pages hold B's bytes
        if src == "B":
            for c in want:
                for layer in range(LAYERS):
                    assert torch.equal(now[c][layer][d_ids], want[c][layer][d_ids]), rid
    for rid, *_ in mine:
        recv.forget(rid)
    assert recv.settle(30)
    # the next round's destinations are pushed to connected senders: not to the dead one
    lookup(folder / "killed.json")
    # (its connection ends as the kernel closes the dead process's)
    wait_for(lambda: "A/dp0.cp1.tp0.pp0" not in recv.connected(), 30, interval=0.01,
             fail=False)
    expect_and_check(recv, name, 2)
