"""Helpers for transfer tests: a prefill group and a decode receiver on one control plane."""

from __future__ import annotations

import time
import uuid

from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank

DONE = (KVStatus.Success, KVStatus.Failed)


def wait_all(objs_and_ids, timeout=30.0):
    """`wait` on each (obj, request_id) in turn (receivers first: a sender's final status is
    the receiver's verdict); return their final statuses."""
    deadline = time.monotonic() + timeout
    statuses = [obj.wait(rid, max(0.0, deadline - time.monotonic()))
                for obj, rid in objs_and_ids]
    if not all(s in DONE for s in statuses):
        raise TimeoutError(f"statuses still {statuses} after {timeout} s")
    return statuses


def group(src, dst, rig, *, cp=2, policy="all", timeout=10.0):
    """cp senders over `src` and a receiver into `dst` (one process), on the rig's engine,
    arenas and control-plane server, in a fresh namespace. Returns (namespace, senders, recv)."""
    engine, send_arena, recv_arena, control = rig
    namespace = uuid.uuid4().hex

    def client():
        return control.scoped(namespace)

    senders = [KVSender(src, client(), rank=ParallelRank(cp=r), cp_size=cp, policy=policy,
                        timeout=timeout, engine=engine, arena=send_arena) for r in range(cp)]
    recv = KVReceiver(dst, client(), cp_size=cp,
                      timeout=timeout, engine=engine, arena=recv_arena)
    return namespace, senders, recv


def close_all(senders, recv):
    for s in senders:
        s.close()
    recv.close()
