"""One process of test_netns.py, run inside its own network namespace with `ip netns exec`:
the decode receiver (serving the control plane on its namespace address) or a CP sender."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from kvtest import fill_sentinel, make_cache, mha

from cpkv.kernels import pack_pages
from cpkv.transfer import ControlPlane, KVReceiver, KVSender, KVStatus, ParallelRank

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


def receiver(addr: str, port: int) -> dict:
    from cpkv.transfer import TransferEngine
    src, dst = pools()
    control = ControlPlane(addr, port, serve=True, namespace="netns", timeout=60)
    engine = TransferEngine(addr)
    with KVReceiver(dst, control, cp_size=2, engine=engine, timeout=60,
                    checksum=True) as recv:
        assert recv.wait_ready(60), recv.setup_error
        for rid, (_, d_ids, n) in REQUESTS.items():
            recv.expect(rid, d_ids, num_tokens=n)
        statuses = {rid: recv.wait(rid) for rid in REQUESTS}
        bad = {r: recv.reason(r) for r, s in statuses.items() if s is not KVStatus.Success}
        assert not bad, bad
        for rid, (s_ids, d_ids, n) in REQUESTS.items():
            assert torch.equal(pack_pages(dst, d_ids, num_tokens=n),
                               pack_pages(src, s_ids, num_tokens=n)), f"request {rid} bytes"
        recv.settle(10)
        session = engine.session_id
    engine.close()
    return {"session": session}


def sender(rank: int, addr: str, store_addr: str, port: int) -> dict:
    from cpkv.transfer import TransferEngine
    src, _ = pools()
    control = ControlPlane(store_addr, port, namespace="netns", timeout=60)
    engine = TransferEngine(addr)
    with KVSender(src, control, rank=ParallelRank(cp=rank), cp_size=2, engine=engine,
                  timeout=60) as s:
        for rid, (s_ids, _, n) in REQUESTS.items():
            s.send(rid, s_ids, num_tokens=n)
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
            result = receiver(sys.argv[2], int(sys.argv[3]))
        else:
            result = sender(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
        result["ok"] = True
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    out.write_text(json.dumps(result))
