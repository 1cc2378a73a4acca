"""A model runner's CP prefill step with cpkv, then one decode step over the pool.

Each CP rank runs a tiny attention layer on its zigzag share of a batch (SGLang's batch order),
writes K/V into its paged pool with `cpkv.cp.all_gather_kv` (every rank ends up with the whole
batch), and a decode query attends over the pool, read back the way the runner reads it. The
result equals attention over the unsplit K/V, bit for bit. Two pools: SGLang's token-major
``k_buffer``/``v_buffer`` (through `cpkv.adapters.from_sglang_mha`, page ids as numpy like
SGLang's allocator hands them out) and vLLM's flash-attn ``[2, blocks, block_size, heads, dim]``
layer tensors (through `cpkv.adapters.from_vllm`).

    python examples/runner_prefill.py          # 2 CP ranks, gloo on loopback
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpkv.adapters import from_sglang_mha, from_vllm
from cpkv.cp import all_gather_kv, gather_nbytes, zigzag_split
from cpkv.staging import StagingArena

SEQ_LENS = [13, 9, 20]  # a batch of three prefills
LAYERS, HIDDEN, HEADS, HEAD_DIM, PAGE_SIZE, PAGES = 2, 16, 2, 8, 4, 16
POOLS = ("sglang", "vllm")


def weights(layer: int):
    """This layer's K/V projections, the same on every rank. Small integers keep every product
    exact, so split and unsplit K/V are the same bytes however the matmul is blocked."""
    g = torch.Generator().manual_seed(100 + layer)
    return [torch.randint(-2, 3, (HIDDEN, HEADS * HEAD_DIM), generator=g).float()
            for _ in range(2)]


def batch_hidden() -> torch.Tensor:
    """Hidden states of the whole batch, sequences concatenated: [tokens, hidden]."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(-2, 3, (sum(SEQ_LENS), HIDDEN), generator=g).float()


def kv_proj(x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    wk, wv = weights(layer)
    shape = (x.shape[0], HEADS, HEAD_DIM)
    return (x @ wk).view(shape).bfloat16(), (x @ wv).view(shape).bfloat16()


def page_tables() -> list[np.ndarray]:
    """Per sequence, its pages, as an allocator hands them out (page 0 is SGLang's padding)."""
    perm = np.random.default_rng(3).permutation(np.arange(1, PAGES))
    out, pos = [], 0
    for n in SEQ_LENS:
        k = -(-n // PAGE_SIZE)
        out.append(perm[pos:pos + k].astype(np.int64))
        pos += k
    return out


def make_pool(kind: str):
    """The runner's own buffers and a cpkv view of them (no copy)."""
    if kind == "sglang":  # MHATokenToKVPool: per layer [size + page_size, heads, dim]
        k_buffer = [torch.zeros(PAGES * PAGE_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16)
                    for _ in range(LAYERS)]
        v_buffer = [torch.zeros_like(t) for t in k_buffer]
        return (k_buffer, v_buffer), from_sglang_mha(k_buffer, v_buffer, page_size=PAGE_SIZE)
    kv_caches = [torch.zeros(2, PAGES, PAGE_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16)
                 for _ in range(LAYERS)]  # vLLM flash_attn layer tensors
    return kv_caches, from_vllm(kv_caches, backend="flash_attn")


def read_kv(kind: str, buffers, layer: int, pages: np.ndarray, n: int):
    """K/V of a sequence's first n tokens, addressed the way the runner's attention does."""
    token = np.arange(n)
    if kind == "sglang":  # token slot = page * page_size + offset
        loc = torch.from_numpy(pages[token // PAGE_SIZE] * PAGE_SIZE + token % PAGE_SIZE)
        return buffers[0][layer][loc], buffers[1][layer][loc]
    block = torch.from_numpy(pages[token // PAGE_SIZE])
    slot = torch.from_numpy(token % PAGE_SIZE)
    return buffers[layer][0][block, slot], buffers[layer][1][block, slot]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token per head over [n, heads, dim] K/V (torch SDPA)."""
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.transpose(0, 1).float(),
                                          v.transpose(0, 1).float())


def prefill_then_decode(kind: str, rank: int, world: int, arena: StagingArena) -> None:
    plan = zigzag_split(SEQ_LENS, world)  # SGLang's batch order
    x_local = batch_hidden()[plan.positions[rank]]  # this rank's rows, in its local order
    buffers, cache = make_pool(kind)
    pages = page_tables()
    slot = arena.alloc(gather_nbytes(cache, plan, layers=0))
    try:
        for layer in range(LAYERS):  # the forward pass: attention layer by layer
            k, v = kv_proj(x_local, layer)
            all_gather_kv({"k": k, "v": v}, plan, cache, pages, slot=slot, layers=layer)
    finally:
        slot.release()
    x_full, start = batch_hidden(), 0
    for s, n in enumerate(SEQ_LENS):  # decode step: one query per sequence and layer
        for layer in range(LAYERS):
            q = torch.randn(HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(s))
            k_pool, v_pool = read_kv(kind, buffers, layer, pages[s], n)
            k_ref, v_ref = kv_proj(x_full[start:start + n], layer)  # unsplit K/V
            got, want = decode_attention(q, k_pool, v_pool), decode_attention(q, k_ref, v_ref)
            if not torch.equal(got, want):
                raise AssertionError(f"{kind} pool, sequence {s}, layer {layer}: decode "
                                     f"attention over the pool differs from unsplit K/V")
        start += n


def rank_main(rank: int, world: int, port: int, results) -> None:
    out = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        arena = StagingArena(1 << 20, backend="host-shared")
        for kind in POOLS:
            try:
                prefill_then_decode(kind, rank, world, arena)
                out[kind] = "ok"
            except Exception as e:  # reported per pool
                out[kind] = f"{type(e).__name__}: {e}"
        arena.close()
        dist.destroy_process_group()
    except Exception as e:
        out["setup"] = f"{type(e).__name__}: {e}"
    results.put((rank, out))


def launch(world: int = 2, timeout: float = 180.0) -> list[dict]:
    """Spawn ``world`` CP ranks (gloo on loopback); per rank, pool kind -> "ok" or the error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    try:
        for _ in range(world):
            rank, out = results.get(timeout=timeout)
            got[rank] = out
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)
    return [got.get(r, {"setup": "no result (timed out or crashed)"}) for r in range(world)]


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    outcome = launch(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    for r, out in enumerate(outcome):
        print(f"rank {r}: {out}")
    sys.exit(0 if all(v == "ok" for out in outcome for v in out.values()) else 1)
