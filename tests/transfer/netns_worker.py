"""One process of test_netns.py, run inside its own network namespace with `ip netns exec`:
the decode receiver (listening on its namespace address, which it publishes in a file the test
gives every process: namespaces share the file system, not the network) or a CP sender."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from kvtest import fill_sentinel, make_cache, mha
from mp import lookup, publish

from cpkv.kernels import pack_pages
from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank, ParallelSizes

REQUESTS = {1: (torch.tensor([3, 0, 7, 5, 2]), torch.tensor([9, 1, 4, 12, 6]), 18),
            2: (torch.tensor([1, 6, 4]), torch.tensor([2, 3, 5]), 12),
            3: (torch.tensor([8, 9, 10, 11, 12, 13, 14, 15]), torch.tensor(list(range(16, 24))),
                31)}


def pools():
    src = make_cache(mha(num_heads=4, head_dim=64), num_layers=4, num_pages=16, page_size=4,
                     seed=3)
    dst = fill_sentinel(make_cache(mha(num_heads=4, head_dim=64), num_layers=4, num_pages=24,
                                   page_size=4))
    return src, dst


def receiver(addr: str, meet: str) -> dict:
    from cpkv.transfer import TransferEngine
    src, dst = pools()
    engine = TransferEngine(addr)
    with KVReceiver(dst, host=addr, engine=engine, timeout=60, checksum=True) as recv:
        publish(meet, recv.address)
        for rid, (_, d_ids, n) in REQUESTS.items():
            recv.expect(rid, d_ids, source="prefill", num_tokens=n)
        statuses = {rid: recv.wait(rid) for rid in REQUESTS}
        bad = {r: recv.reason(r) for r, s in statuses.items() if s is not KVStatus.Success}
        assert not bad, bad
        for rid, (s_ids, d_ids, n) in REQUESTS.items():
            assert torch.equal(pack_pages(dst, d_ids, num_tokens=n),
                               pack_pages(src, s_ids, num_tokens=n)), f"request {rid} bytes"
        recv.settle(10)
        session, address = engine.session_id, recv.address
    engine.close()
    return {"session": session, "address": address}


def sender(rank: int, addr: str, meet: str) -> dict:
    from cpkv.transfer import TransferEngine
    src, _ = pools()
    engine = TransferEngine(addr)
    with KVSender(src, instance="prefill", rank=ParallelRank(cp=rank),
                  sizes=ParallelSizes(cp=2), engine=engine, timeout=60) as s:
        to = lookup(meet, 120)
        for rid, (s_ids, _, n) in REQUESTS.items():
            s.send(rid, s_ids, to=to, num_tokens=n)
        statuses = {rid: s.wait(rid) for rid in REQUESTS}
        assert all(v is KVStatus.Success for v in statuses.values()), (
            statuses, [s.reason(r) for r in REQUESTS])
        session = engine.session_id
    engine.close()
    return {"session": session}


if __name__ == "__main__":
    role, out = sys.argv[1], Path(sys.argv[-1])
    try:
        if role == "receiver":
            result = receiver(sys.argv[2], sys.argv[3])
        else:
            result = sender(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        result["ok"] = True
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    out.write_text(json.dumps(result))
