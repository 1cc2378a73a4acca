"""What `checksum=True` costs (README, Reliability): CRC32C throughput on one buffer, and one
16 MiB request end to end (1 sender -> 1 receiver in one process, Mooncake TCP loopback; 4
layers, 8 KV heads x 128, bf16, 1,024 tokens) with and without it.

    PYTHONPATH=.:tests MC_LOG_LEVEL=ERROR python tests/transfer/checksum_cost.py
"""

import statistics
import time

import torch
from kvtest import make_cache, mha

from cpkv.staging import StagingArena
from cpkv.transfer import KVReceiver, KVSender, KVStatus, TransferEngine
from cpkv.transfer.sender import checksum


def crc_throughput() -> None:
    buf = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8)
    checksum(buf)
    best = min(_timed(lambda: checksum(buf)) for _ in range(5))
    print(f"crc32c: {64 / 1024 / best:.2f} GB/s, {best * 16 * 1e3:.1f} ms per GiB")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def end_to_end(repeats: int = 12) -> None:
    engine = TransferEngine("127.0.0.1")
    send_arena, recv_arena = StagingArena(64 << 20), StagingArena(64 << 20)
    engine.register_arena(send_arena)
    engine.register_arena(recv_arena)
    shape = dict(num_layers=4, num_pages=64, page_size=16)
    src = make_cache(mha(num_heads=8, head_dim=128), seed=1, **shape)
    dst = make_cache(mha(num_heads=8, head_dim=128), seed=2, **shape)
    ids, times = torch.arange(64), {}
    for crc in (False, True, False, True):
        with KVReceiver(dst, engine=engine, arena=recv_arena, checksum=crc) as recv, \
                KVSender(src, engine=engine, arena=send_arena) as sender:
            for rid in range(repeats):
                t0 = time.perf_counter()
                recv.expect(rid, ids, source=sender.instance)
                sender.send(rid, ids, to=recv.address)
                assert recv.wait(rid) is KVStatus.Success, recv.reason(rid)
                if rid >= 2:  # warm-up excluded
                    times.setdefault(crc, []).append(time.perf_counter() - t0)
                sender.wait(rid)
    for crc, ts in times.items():
        print(f"checksum={crc}: median {statistics.median(ts) * 1e3:.1f} ms per 16 MiB "
              f"request (n={len(ts)})")
    send_arena.close()
    recv_arena.close()
    engine.close()


if __name__ == "__main__":
    crc_throughput()
    end_to_end()
