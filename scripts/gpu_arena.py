"""Arena part of the GPU check: each staging backend for the device, used for real.

For every backend the check tries (``cuda``; ``symmetric`` with a process group of one, NCCL,
warmed by a collective first; on a CPU machine ``host``), it allocates slots, packs a shape-B
pool into a slot, unpacks the slot into a second pool and compares bytes, then gathers into a
slot with the group where there is one. One CSV row per backend: ok / unavailable / failed and
why (``unavailable`` where the arena itself refuses the backend with ArenaError), plus slot
allocation and pack-into-slot times.

    python scripts/gpu_arena.py --out DIR/arena.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpkv.kernels import pack_pages, unpack_pages  # noqa: E402
from cpkv.report import provenance  # noqa: E402
from cpkv.shapes import SHAPES  # noqa: E402
from cpkv.staging import ArenaError, StagingArena  # noqa: E402

COLUMNS = ["backend", "status", "detail", "alloc_us", "pack_ms", "slot_nbytes", "device",
           "torch", "triton", "git_sha", "timestamp"]


def _group_of_one(tmp: str):
    """An NCCL group of one (the GPU machines have one GPU), warmed before any rendezvous."""
    import torch.distributed as dist

    store = dist.FileStore(os.path.join(tmp, "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    warm = torch.ones(1, device="cuda")
    dist.all_reduce(warm)  # the communicator must exist before symmetric-memory rendezvous
    torch.cuda.synchronize()
    return dist.group.WORLD


def check(backend: str, device: torch.device, group=None) -> dict:
    """Use one arena backend end to end; the row for it."""
    shape = SHAPES["B"]
    src = shape.cache(num_pages=64, page_size=16, num_layers=4, device=device)
    dst = shape.cache(num_pages=64, page_size=16, num_layers=4, device=device)
    for layers in src.buffers.values():
        for t in layers:
            t.view(torch.uint8).random_(0, 256)
    ids = torch.randperm(64)[:32].to(device)
    nbytes = src.packed_nbytes(500)
    with StagingArena(4 * nbytes + (1 << 20), backend=backend, device=device,
                      group=group) as arena:
        t0 = time.perf_counter()
        slots = [arena.alloc(nbytes) for _ in range(3)]
        alloc_us = (time.perf_counter() - t0) / 3 * 1e6
        slot = slots[1].tensor
        pack_pages(src, ids, num_tokens=500, out=slot)  # warm (compiles on a GPU)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        pack_pages(src, ids, num_tokens=500, out=slot, validate=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        pack_ms = (time.perf_counter() - t0) * 1e3
        unpack_pages(slot, dst, ids, num_tokens=500)
        same = torch.equal(pack_pages(dst, ids, num_tokens=500).cpu(), slot.cpu())
        detail = f"fallback: {arena.fallback_reason}" if arena.fallback_reason else ""
        if group is not None:  # a gather into a slot of the arena, with the arena's group
            import torch.distributed as dist

            dist.all_gather_into_tensor(slots[2].tensor, slots[1].tensor, group=group)
            same = same and torch.equal(slots[2].tensor.cpu(), slot.cpu())
            detail = (detail + "; " if detail else "") + "all-gather into a slot"
        for s in slots:
            s.release()
    return dict(backend=backend, status="ok" if same else "failed",
                detail=detail if same else "bytes differ after pack -> slot -> unpack",
                alloc_us=f"{alloc_us:.1f}", pack_ms=f"{pack_ms:.3f}", slot_nbytes=nbytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    prov = provenance(device)
    prov.pop("mooncake", None)
    caps = StagingArena.capabilities(device)
    rows = []
    backends = ["cuda", "symmetric"] if device.type == "cuda" else ["host", "cuda", "symmetric"]
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            if caps[backend] is not None:
                rows.append(dict(backend=backend, status="unavailable", detail=caps[backend]))
                continue
            try:
                group = _group_of_one(tmp) if backend == "symmetric" else None
                rows.append(check(backend, device, group))
            except ArenaError as e:  # the arena says this backend cannot run here, and why
                rows.append(dict(backend=backend, status="unavailable", detail=str(e)[:300]))
            except Exception as e:  # the check reports every backend, whatever one does
                traceback.print_exc()
                rows.append(dict(backend=backend, status="failed",
                                 detail=f"{type(e).__name__}: {e}"[:300]))
            finally:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **prov,
                        "timestamp": prov.get("timestamp") or
                        datetime.datetime.now(datetime.timezone.utc).isoformat()})
    for r in rows:
        print(f"arena {r['backend']:10} {r['status']:12} {r.get('detail', '')}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
