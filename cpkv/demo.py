"""`cpkv demo`: a CP prefill group hands a batch of requests to a decode rank, end to end.

Processes (all local): ``cp`` prefill ranks (a gloo group) and one decode rank; the control
plane (a TCPStore) is served by this parent process, which also relays progress. For each
request every prefill rank computes K/V for its zigzag share of the tokens, all-gathers the KV
into its paged pool (`cpkv.cp.all_gather_kv`), and sends its page share packed, in one
Mooncake write (`cpkv.transfer.KVSender`); the decode rank receives, unpacks and checks every
byte against the reference. Then prefill rank 0 writes the same bytes as one raw descriptor:
the wire ceiling.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .shapes import SHAPES

RESULT_TIMEOUT = 600.0


@dataclass
class DemoConfig:
    shape: str = "A"
    page_size: int = 16
    tokens: int = 1024
    requests: int = 4
    cp: int = 2
    layers: int | None = None  # None: the shape's own
    protocol: str = "tcp"
    device: str = "cpu"
    out: str = "out"
    corrupt_byte: bool = False  # test hook: the decode rank flips one byte after receiving

    @property
    def num_layers(self) -> int:
        return self.layers or SHAPES[self.shape].num_layers


def reference_kv(cfg: DemoConfig, request_id: int) -> dict[str, torch.Tensor]:
    """The request's whole K/V, [layers, tokens, heads, head_dim] per component (seeded)."""
    g = torch.Generator().manual_seed(1000 + request_id)
    out = {}
    for spec in SHAPES[cfg.shape].components:
        t = torch.empty(cfg.num_layers, cfg.tokens, spec.num_heads, spec.head_dim,
                        dtype=spec.dtype)
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8))
        out[spec.name] = t
    return out


def page_ids(cfg: DemoConfig, side: str) -> list[torch.Tensor]:
    """Fragmented page ids per request: a seeded permutation of the pool (differs per side)."""
    n = -(-cfg.tokens // cfg.page_size)
    g = torch.Generator().manual_seed(1 if side == "prefill" else 2)
    perm = torch.randperm(2 * n * cfg.requests, generator=g)
    return [perm[r * n:(r + 1) * n] for r in range(cfg.requests)]


def estimated_bytes(cfg: DemoConfig) -> int:
    """Host memory the demo's processes need together (pools, arenas, reference K/V)."""
    bpt = SHAPES[cfg.shape].bytes_per_token() * cfg.num_layers // SHAPES[cfg.shape].num_layers
    n_pages = -(-cfg.tokens // cfg.page_size)
    pool = 2 * n_pages * cfg.requests * cfg.page_size * bpt
    per_request = cfg.tokens * bpt
    return (cfg.cp + 1) * (pool + 4 * per_request)


def _pool(cfg: DemoConfig):
    n = -(-cfg.tokens // cfg.page_size)
    cache = SHAPES[cfg.shape].cache(num_pages=2 * n * cfg.requests, page_size=cfg.page_size,
                                    num_layers=cfg.num_layers, device=cfg.device)
    for layers in cache.buffers.values():
        for t in layers:
            t.view(torch.uint8).fill_(0)
    return cache


def _quiet_native_logs() -> None:
    """Mooncake logs every transfer at INFO; the demo's own progress is what a user reads."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")


def _prefill(rank: int, cfg: DemoConfig, store_port: int, gloo_port: int, q) -> None:
    import datetime

    import torch.distributed as dist

    from .cp import all_gather_kv, gather_nbytes, zigzag_split
    from .staging import StagingArena
    from .transfer import ControlPlane, KVSender, KVStatus, ParallelRank, TransferEngine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank,
                            world_size=cfg.cp, timeout=datetime.timedelta(seconds=120))
    control = ControlPlane(port=store_port, namespace="demo", timeout=120)
    cache = _pool(cfg)
    plan = zigzag_split(cfg.tokens, cfg.cp)
    bpt = cache.packed_nbytes(1)
    engine = TransferEngine("127.0.0.1", cfg.protocol)
    arena = StagingArena(gather_nbytes(cache, plan) + cfg.tokens * bpt + (1 << 20),
                         device=cfg.device)
    engine.register_arena(arena)
    sender = KVSender(cache, control, rank=ParallelRank(cp=rank), cp_size=cfg.cp,
                      engine=engine, arena=arena, timeout=120)
    ids = page_ids(cfg, "prefill")
    gather_s = 0.0
    for rid in range(cfg.requests):
        full = reference_kv(cfg, rid)
        local = {n: t[:, plan.positions[rank]].to(cfg.device) for n, t in full.items()}
        with arena.alloc(gather_nbytes(cache, plan)) as slot:
            dist.barrier()
            t0 = time.perf_counter()
            all_gather_kv(local, plan, cache, ids[rid].to(cfg.device), slot=slot)
            gather_s += time.perf_counter() - t0
        dist.barrier()  # every pool holds the request: "the sender has the page ids"
        sender.send(rid, ids[rid].to(cfg.device), num_tokens=cfg.tokens,
                    metadata=repr(time.time()).encode() if rank == 0 else None)
        while sender.poll(rid) not in (KVStatus.Success, KVStatus.Failed):
            time.sleep(0.0005)
        if sender.poll(rid) is KVStatus.Failed:
            raise RuntimeError(f"request {rid}: {sender.reason(rid)}")
        q.put(("progress", f"prefill rank {rank}: request {rid} sent"))
    raw_s = None
    if rank == 0:  # the wire ceiling: the same bytes as one descriptor
        dest = control.wait_get(control.key("raw", "dest"), 120)
        with arena.alloc(cfg.tokens * bpt) as slot:
            peer = sender._receiver_info()["session"]
            engine.write(peer, [(slot.tensor.data_ptr(), dest["addr"], slot.nbytes)])  # warm
            t0 = time.perf_counter()
            engine.write(peer, [(slot.tensor.data_ptr(), dest["addr"], slot.nbytes)])
            raw_s = time.perf_counter() - t0
        control.put(control.key("raw", "done"), True)
    q.put(("result", rank, {"gather_s": gather_s / cfg.requests, "raw_s": raw_s}))
    sender.close()
    arena.close()
    engine.close()
    dist.destroy_process_group()


def _decode(cfg: DemoConfig, store_port: int, q) -> None:
    from .kernels import pack_pages
    from .staging import StagingArena
    from .transfer import ControlPlane, KVReceiver, KVStatus, TransferEngine

    control = ControlPlane(port=store_port, namespace="demo", timeout=120)
    cache = _pool(cfg)
    bpt = cache.packed_nbytes(1)
    engine = TransferEngine("127.0.0.1", cfg.protocol)
    arena = StagingArena(2 * cfg.tokens * bpt + (1 << 20), device=cfg.device)
    recv = KVReceiver(cache, control, cp_size=cfg.cp,
                      engine=engine, arena=arena, timeout=120)
    if recv.setup_error:
        raise RuntimeError(recv.setup_error)
    ids = page_ids(cfg, "decode")
    latencies = []
    for rid in range(cfg.requests):
        recv.expect(rid, ids[rid].to(cfg.device), num_tokens=cfg.tokens)
        while recv.poll(rid) not in (KVStatus.Success, KVStatus.Failed):
            time.sleep(0.0005)
        if recv.poll(rid) is KVStatus.Failed:
            raise RuntimeError(f"request {rid}: {recv.reason(rid)}")
        latencies.append(time.time() - float(recv.metadata(rid).decode()))
        q.put(("progress", f"decode: request {rid} received and unpacked"))
    if cfg.corrupt_byte:  # test hook: one flipped bit must be caught and named
        name = cache.component_names[-1]
        row = cache.nhd_view(name, cfg.num_layers - 1)[int(ids[0][0]), 0].view(torch.uint8)
        row[0, 5] ^= 1
    q.put(("progress", "decode: checking every byte against the reference"))
    mismatch = None
    for rid in range(cfg.requests):  # every byte, against the reference K/V
        got = pack_pages(cache, ids[rid].to(cfg.device), num_tokens=cfg.tokens).cpu()
        ref = reference_kv(cfg, rid)  # the packed format is layer-major, then component
        want = torch.cat([t[layer].reshape(-1).view(torch.uint8)
                          for layer in range(cfg.num_layers) for t in ref.values()])
        if not torch.equal(got, want):
            first = int((got != want).nonzero()[0])
            mismatch = _locate(cfg, rid, first, int(got[first]), int(want[first]))
            break
    q.put(("progress", "decode: verified; measuring a raw one-descriptor write"))
    slot = arena.alloc(cfg.tokens * bpt)
    control.put(control.key("raw", "dest"), {"addr": recv.arena_addr + slot.offset})
    control.wait_get(control.key("raw", "done"), 120)
    slot.release()
    q.put(("result", cfg.cp, {"latency_s": sorted(latencies)[len(latencies) // 2],
                              "mismatch": mismatch, "bytes": cfg.tokens * bpt,
                              "descriptors": cfg.cp * max(1, _pipeline_chunks(cfg, bpt))}))
    recv.close()
    arena.close()
    engine.close()


def _pipeline_chunks(cfg: DemoConfig, bpt: int) -> int:
    """Writes one sender makes for its share (layer groups of >= 16 MiB, see KVSender)."""
    from .transfer.sender import PIPELINE_CHUNK_BYTES

    per_layer = (cfg.tokens // cfg.cp) * bpt // cfg.num_layers
    step = max(1, -(-PIPELINE_CHUNK_BYTES // max(per_layer, 1)))
    return -(-cfg.num_layers // step)


def _locate(cfg: DemoConfig, rid: int, offset: int, got: int, want: int) -> str:
    """Name the (request, layer, component, token, byte) of a packed byte offset."""
    specs = SHAPES[cfg.shape].components
    rows = [s.num_heads * s.head_nbytes for s in specs]
    per_layer = cfg.tokens * sum(rows)
    layer, rest = divmod(offset, per_layer)
    for spec, row in zip(specs, rows, strict=True):
        if rest < cfg.tokens * row:
            token, byte = divmod(rest, row)
            return (f"request {rid}, layer {layer}, component {spec.name!r}, token {token}, "
                    f"byte {byte}: got {got}, expected {want}")
        rest -= cfg.tokens * row
    return f"request {rid}, packed byte {offset}: got {got}, expected {want}"


def _child(role, cfg_dict, store_port, gloo_port, q) -> None:
    _quiet_native_logs()
    cfg = DemoConfig(**cfg_dict)
    # cp + 1 processes share this machine: oversubscribed torch thread pools thrash.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (cfg.cp + 1)))
    try:
        if role == "decode":
            _decode(cfg, store_port, q)
        else:
            _prefill(role, cfg, store_port, gloo_port, q)
    except BaseException as e:  # reported to the parent, which prints one line and exits 1
        q.put(("error", role, f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: DemoConfig) -> int:
    """Run the demo; print progress and a table; write CSV and PNG. 0 if every byte matched."""
    from .report import CsvWriter, provenance
    from .transfer import ControlPlane

    _quiet_native_logs()
    out = Path(cfg.out)
    shape = SHAPES[cfg.shape]
    mib = cfg.tokens * shape.bytes_per_token() * cfg.num_layers // shape.num_layers / 2**20
    print(f"cpkv demo: {cfg.cp} CP prefill ranks -> 1 decode rank, shape {shape.name} "
          f"({shape.model}, {cfg.num_layers} layers), {cfg.requests} requests x {cfg.tokens} "
          f"tokens ({mib:.1f} MiB each), page_size {cfg.page_size}, Mooncake {cfg.protocol} "
          f"on loopback, {cfg.device}", flush=True)
    server = ControlPlane(serve=True, namespace="demo", timeout=120)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    gloo_port = _free_port()
    roles = list(range(cfg.cp)) + ["decode"]
    procs = [ctx.Process(target=_child, args=(role, asdict(cfg), server.port, gloo_port, q),
                         daemon=True) for role in roles]
    results, errors = {}, []
    t_start = time.perf_counter()
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + RESULT_TIMEOUT
        while len(results) + len(errors) < len(procs) and not errors:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    errors.append(("demo", f"no result within {RESULT_TIMEOUT} s", ""))
                dead = [r for r, p in zip(roles, procs, strict=True)
                        if not p.is_alive() and r not in results]
                if dead and q.empty():
                    errors.append(("demo", f"process {dead[0]} exited without a result", ""))
                continue
            if msg[0] == "progress":
                print(f"  [{time.perf_counter() - t_start:6.1f} s] {msg[1]}", flush=True)
            elif msg[0] == "result":
                results[msg[1]] = msg[2]
            else:
                errors.append(msg[1:])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
    if errors:
        who, text, tb = errors[0]
        print(f"cpkv demo: FAILED in {who}: {text}", file=sys.stderr)
        if os.environ.get("CPKV_DEBUG") and tb:
            print(tb, file=sys.stderr)
        return 1
    dec = results[cfg.cp]
    raw = results[0]["raw_s"]
    gather = sum(results[r]["gather_s"] for r in range(cfg.cp)) / cfg.cp
    rows = [
        ("bytes per request", f"{dec['bytes'] / 2**20:.1f} MiB"),
        ("CP all-gather + reorganize", f"{gather * 1e3:.1f} ms"),
        ("packed: descriptors per request", f"{dec['descriptors']}"),
        ("packed: send -> pool holds bytes", f"{dec['latency_s'] * 1e3:.1f} ms"),
        ("raw one-descriptor write (ceiling)", f"{raw * 1e3:.1f} ms"),
        ("packed throughput / ceiling", f"{raw / dec['latency_s']:.2f}"),
    ]
    print()
    for k, v in rows:
        print(f"  {k:<36}{v:>14}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        writer = CsvWriter(out / "demo.csv", provenance(torch.device(cfg.device)))
        base = dict(op="demo", shape=cfg.shape, page_size=cfg.page_size, tokens=cfg.tokens,
                    pattern="fragmented", unit="ms")
        for provider, seconds in (("cp-gather+reorganize", gather),
                                  ("cpkv-packed", dec["latency_s"]), ("raw-write", raw)):
            writer.write(provider=provider, metric="time", p50=seconds * 1e3, p20="", p80="",
                         **base)
        png = _plot(out / "demo.png", cfg, gather, dec["latency_s"], raw)
        print(f"\n  wrote {out / 'demo.csv'}" + (f" and {png}" if png else ""))
    except OSError as e:
        print(f"cpkv demo: cannot write results to {out}: {e}", file=sys.stderr)
        return 2
    if dec["mismatch"]:
        print(f"cpkv demo: FAILED: the decode pool differs at {dec['mismatch']}",
              file=sys.stderr)
        return 1
    print(f"  OK: every byte of {cfg.requests} requests verified on the decode rank")
    return 0


def _plot(path: Path, cfg: DemoConfig, gather: float, packed: float, raw: float):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 2.6))
    labels = ["CP gather+reorganize", "raw write (ceiling)", "cpkv packed transfer"]
    values = [gather * 1e3, raw * 1e3, packed * 1e3]
    ax.barh(labels, values, color=["#9aa5b1", "#9aa5b1", "#d1495b"])
    ax.set_xlabel("ms per request")
    ax.set_title(f"cpkv demo: shape {cfg.shape}, {cfg.tokens} tokens, page_size "
                 f"{cfg.page_size}, {cfg.device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
