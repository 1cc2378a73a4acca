"""`cpkv demo`: a CP prefill group hands a batch of requests to a decode rank, end to end.

Processes (all local): ``cp`` prefill ranks (a gloo group) and one decode rank; this parent
process relays progress and the ranks' messages (`_Mail`): as a router would, it hands the
decode rank's receiver addresses to the prefill ranks, which name them in every send. For each
request every prefill rank computes K/V for its zigzag share of the tokens, all-gathers the KV
into its paged pool (`cpkv.cp.all_gather_kv`), and sends its page share packed, in one
Mooncake write per layer group (`cpkv.transfer.KVSender`); the decode rank receives, unpacks
and checks every byte against the reference. Then prefill rank 0 writes the same bytes as one
raw descriptor: the wire ceiling.

A request's time runs from "both sides ready" (every prefill pool holds the request and the
decode rank expects it) to "the decode pool holds the bytes", as in `cpkv bench transfer`;
verifying the bytes and relaying progress happen outside it. The CP group agrees on each
request's status by MIN (`cpkv.transfer.agree`), as a model runner would.

This module runs the processes and reports; the reference data and the byte check are
`cpkv.demos.data`; the figure is `plots/plot_demo.py`, drawn from the CSV written here.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._net import free_port
from ..report import companion, quantiles
from ..shapes import SHAPES
from .common import quiet_native_logs, share_cores
from .data import clear_pages, new_pool, packed_format, page_ids, pool_pages, reference_kv, verify

RESULT_TIMEOUT = 600.0
SETUP_TIMEOUT = 120.0  # for the decode rank's receiver addresses to reach the prefill ranks
DEAD_GRACE_S = 5.0  # a finished child's queued messages may still be in flight
PREFILL = "prefill"  # the prefill instance's name: its senders' and the receivers' source


@dataclass
class DemoConfig:
    shape: str = "A"
    page_size: int = 16
    tokens: int = 1024
    requests: int = 6  # the first is the warm-up; the figures are medians of the rest
    cp: int = 2
    layers: int | None = None  # None: the shape's own
    mode: str = "compare"  # packed then direct; or "packed", "direct", "auto" (cost model)
    protocol: str = "tcp"
    device: str = "cpu"
    out: str = "out"
    checksum: bool = True  # CRC32C of every packed segment, verified before Success
    corrupt_byte: bool = False  # test hook: the decode rank flips one byte after receiving

    @property
    def num_layers(self) -> int:
        return self.layers or SHAPES[self.shape].num_layers

    @property
    def modes(self) -> list[str]:
        return ["packed", "direct"] if self.mode == "compare" else [self.mode]


def estimated_bytes(cfg: DemoConfig) -> int:
    """Host memory the demo's processes need together (pools, arenas, reference K/V)."""
    pool = packed_format(cfg, pool_pages(cfg) * cfg.page_size).nbytes
    return (cfg.cp + 1) * (pool + 4 * packed_format(cfg).nbytes)


def needs(cfg: DemoConfig) -> list[str]:
    """The optional modules this run imports (`cpkv.demos.common.EXTRAS`)."""
    return ["mooncake.engine", *(["crc32c"] if cfg.checksum else []), "matplotlib"]


class _Mail:
    """Messages between the demo's processes, relayed by the parent: `post` a value under a
    key to some roles (prefill ranks by number, "decode"); `get` waits for a key, keeping
    what arrives meanwhile under its own key."""

    def __init__(self, outbox, inbox):
        self.outbox, self.inbox, self.kept = outbox, inbox, {}  # a queue; a pipe's read end

    def post(self, to, key: tuple, value=True) -> None:
        self.outbox.put(("post", list(to), key, value))

    def tell_parent(self, *msg) -> None:
        """("progress", text) or ("result", role, figures)."""
        self.outbox.put(msg)

    def get(self, key: tuple, timeout: float):
        deadline = time.monotonic() + timeout
        while key not in self.kept:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key} from the other ranks within {timeout} s")
            if self.inbox.poll(left):
                got, value = self.inbox.recv()
                self.kept[got] = value
        return self.kept.pop(key)


def _prefill(rank: int, cfg: DemoConfig, gloo_port: int, mail: _Mail) -> None:
    import datetime
    import json

    import torch.distributed as dist

    from ..cp import all_gather_kv, gather_nbytes, zigzag_split
    from ..parallel import ParallelRank, ParallelSizes
    from ..staging import StagingArena
    from ..transfer import KVSender, KVStatus, TransferEngine, agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank,
                            world_size=cfg.cp, timeout=datetime.timedelta(seconds=120))
    cache = new_pool(cfg)
    plan = zigzag_split(cfg.tokens, cfg.cp)
    request_nbytes = packed_format(cfg).nbytes
    engine = TransferEngine("127.0.0.1", cfg.protocol)
    arena = StagingArena(gather_nbytes(cache, plan) + request_nbytes + (1 << 20),
                         device=cfg.device)
    engine.register_arena(arena)
    senders = {m: KVSender(cache, instance=PREFILL, rank=ParallelRank(cp=rank),
                           sizes=ParallelSizes(cp=cfg.cp), mode=m, engine=engine, arena=arena,
                           timeout=120) for m in cfg.modes}
    receivers = mail.get(("addresses",), SETUP_TIMEOUT)  # mode -> the decode rank's receiver
    ids = page_ids(cfg, "prefill")
    gather_s = []
    for rid in range(cfg.requests):
        full = reference_kv(cfg, rid)
        local = {n: t[:, plan.positions[rank]].to(cfg.device) for n, t in full.items()}
        with arena.alloc(gather_nbytes(cache, plan)) as slot:
            dist.barrier()
            t0 = time.perf_counter()
            all_gather_kv(local, plan, cache, ids[rid].to(cfg.device), slot=slot)
            gather_s.append(time.perf_counter() - t0)
        for mode, sender in senders.items():
            # Both sides ready: every pool holds the request and the decode rank expects it.
            mail.get(("ready", mode, rid), 120)
            dist.barrier()
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every local process
            sender.send(rid, ids[rid].to(cfg.device), to=receivers[mode], num_tokens=cfg.tokens,
                        metadata=json.dumps({"start": start}).encode() if rank == 0 else None)
            # The decode rank's clock stops at its Success: poll ours gently meanwhile.
            mine = sender.wait(rid, RESULT_TIMEOUT)
            # As a runner would: the CP group agrees on the request's status (MIN over CP).
            if agree([mine], [None])[0] is not KVStatus.Success:
                raise RuntimeError(f"request {rid} ({mode}) failed on this CP group: "
                                   f"{sender.reason(rid) or 'another CP rank failed'}")
            if rank == 0:
                mail.post(["decode"], ("mode", mode, rid), sender.mode_of(rid))
            sender.forget(rid)
            mail.tell_parent("progress", f"prefill rank {rank}: request {rid} sent {mode}")
        # Start the next request only once the decode rank has checked this one: its
        # verification must not take the cores a timed transfer needs, nor ours its cores.
        mail.get(("checked", rid), RESULT_TIMEOUT)
    raw_s = None
    if rank == 0:  # the wire ceiling: the same bytes as one descriptor
        dest = mail.get(("raw",), 120)
        peer = dest["session"]
        with arena.alloc(request_nbytes) as slot:
            engine.write(peer, [(slot.tensor.data_ptr(), dest["addr"], slot.nbytes)])  # warm
            t0 = time.perf_counter()
            engine.write(peer, [(slot.tensor.data_ptr(), dest["addr"], slot.nbytes)])
            raw_s = time.perf_counter() - t0
        mail.post(["decode"], ("raw", "done"))
    mail.tell_parent("result", rank, {"gather_s": quantiles(gather_s[1:] or gather_s)[0],
                                      "raw_s": raw_s})
    for sender in senders.values():
        sender.close()
    arena.close()
    engine.close()
    dist.destroy_process_group()


def descriptors(cfg: DemoConfig, mode: str, rid: int) -> int:
    """Descriptors all CP senders use for one request in ``mode``."""
    from ..transfer.cost import descriptors_per_request

    return descriptors_per_request(mode, page_ids(cfg, "prefill")[rid],
                                   page_ids(cfg, "decode")[rid], packed_format(cfg),
                                   cfg.page_size, cfg.cp)


def _decode(cfg: DemoConfig, mail: _Mail) -> None:
    import json

    from ..staging import StagingArena
    from ..transfer import KVReceiver, KVStatus, TransferEngine

    cache = new_pool(cfg)
    request_nbytes = packed_format(cfg).nbytes
    engine = TransferEngine("127.0.0.1", cfg.protocol)
    arena = StagingArena(2 * request_nbytes + (1 << 20), device=cfg.device)
    # One receiver per mode on the same pool: the packed one never registers the pool.
    receivers = {m: KVReceiver(cache, direct=m != "packed", engine=engine, arena=arena,
                               timeout=120, checksum=cfg.checksum)
                 for m in cfg.modes}
    prefill = range(cfg.cp)
    mail.post(prefill, ("addresses",), {m: r.address for m, r in receivers.items()})
    ids = page_ids(cfg, "decode")
    latencies = {m: [] for m in cfg.modes}
    used = {m: [] for m in cfg.modes}
    mismatch = None
    for rid in range(cfg.requests):
        for mode, recv in receivers.items():
            clear_pages(cache, ids[rid])  # every mode must fill the pages itself
            recv.expect(rid, ids[rid].to(cfg.device), source=PREFILL, num_tokens=cfg.tokens)
            mail.post(prefill, ("ready", mode, rid))
            if recv.wait(rid, RESULT_TIMEOUT) is not KVStatus.Success:
                raise RuntimeError(f"request {rid} ({mode}): {recv.reason(rid)}")
            latencies[mode].append(time.monotonic() - json.loads(recv.metadata(rid))["start"])
            # Outside the timed region: which mode the sender used, and every byte checked.
            used[mode].append(mail.get(("mode", mode, rid), 120))
            recv.forget(rid)
            if cfg.corrupt_byte and rid == 0:  # test hook: a flipped bit must be named
                name = cache.component_names[-1]
                row = cache.nhd_view(name, cfg.num_layers - 1)[int(ids[0][0]), 0]
                row.view(torch.uint8)[0, 5] ^= 1
            mismatch = mismatch or verify(cfg, cache, ids[rid].to(cfg.device), rid)
            mail.tell_parent("progress", f"decode: request {rid} received {mode} in "
                                         f"{latencies[mode][-1] * 1e3:.1f} ms, every byte checked")
        mail.post(prefill, ("checked", rid))
    slot = arena.alloc(request_nbytes)
    mail.post([0], ("raw",), {"session": engine.session_id,
                              "addr": arena.buffer.data_ptr() + slot.offset})
    mail.get(("raw", "done"), 120)
    slot.release()
    # Request 0 pays first use (connections, first touch of the staging memory), as the
    # sweep's warm-up run does: the figures are the quantiles of the warm requests after it.
    per_mode = {m: {"latency_s": quantiles(v[1:] or v), "cold_s": v[0],
                    "descriptors": descriptors(cfg, used[m][0], 0), "used": used[m][0]}
                for m, v in latencies.items()}
    mail.tell_parent("result", cfg.cp, {"modes": per_mode, "mismatch": mismatch,
                                        "bytes": request_nbytes})
    for recv in receivers.values():
        recv.close()
    arena.close()
    engine.close()


def _child(role, cfg_dict, gloo_port, q, inbox) -> None:
    quiet_native_logs()
    cfg = DemoConfig(**cfg_dict)
    share_cores(cfg.cp + 1)  # cp + 1 processes share this machine
    mail = _Mail(q, inbox)
    try:
        if role == "decode":
            _decode(cfg, mail)
        else:
            _prefill(role, cfg, gloo_port, mail)
    except BaseException as e:  # reported to the parent, which prints one line and exits 1
        q.put(("error", role, f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()  # os._exit would kill the queue's feeder thread before it flushes
        sys.stdout.flush()
        os._exit(0)


def run(cfg: DemoConfig) -> int:
    """Run the demo; print progress and a table; write CSV and PNG. 0 if every byte matched."""
    from ..report import CsvWriter, provenance

    quiet_native_logs()
    out = Path(cfg.out)
    shape = SHAPES[cfg.shape]
    mib = packed_format(cfg).nbytes / 2**20
    print(f"cpkv demo: {cfg.cp} CP prefill ranks -> 1 decode rank ({' and '.join(cfg.modes)}), "
          f"shape {shape.name} "
          f"({shape.model}, {cfg.num_layers} layers), {cfg.requests} requests x {cfg.tokens} "
          f"tokens ({mib:.1f} MiB each), page_size {cfg.page_size}, Mooncake {cfg.protocol} "
          f"on loopback, {cfg.device}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()  # every child -> this process: progress, results, errors, posts to relay
    gloo_port = free_port()
    roles = list(range(cfg.cp)) + ["decode"]
    # To each child a pipe of its own (no semaphores: nothing for the resource tracker to race
    # on at exit): the messages the others post to it.
    pipes = {role: ctx.Pipe(duplex=False) for role in roles}
    procs = [ctx.Process(target=_child, args=(role, asdict(cfg), gloo_port, q, pipes[role][0]),
                         daemon=True) for role in roles]
    results, errors = {}, []
    t_start = time.perf_counter()
    dead_since = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + RESULT_TIMEOUT
        while len(results) + len(errors) < len(procs) and not errors:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                now = time.monotonic()
                if now > deadline:
                    errors.append(("demo", f"no result within {RESULT_TIMEOUT} s", ""))
                for r, p in zip(roles, procs, strict=True):
                    if not p.is_alive() and r not in results:
                        dead_since.setdefault(r, now)
                        if now - dead_since[r] > DEAD_GRACE_S:  # its last words had time
                            errors.append(("demo", f"process {r} exited without a result", ""))
                            break
                continue
            if msg[0] == "post":
                for to in msg[1]:
                    pipes[to][1].send(msg[2:])
            elif msg[0] == "progress":
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
        for ends in pipes.values():
            for end in ends:
                end.close()
    if errors:
        who, text, tb = errors[0]
        print(f"cpkv demo: FAILED in {who}: {text}", file=sys.stderr)
        if os.environ.get("CPKV_DEBUG") and tb:
            print(tb, file=sys.stderr)
        return 1
    dec = results[cfg.cp]
    raw = results[0]["raw_s"]
    gather = sum(results[r]["gather_s"] for r in range(cfg.cp)) / cfg.cp
    modes = dec["modes"]
    warm = f"median of {max(1, cfg.requests - 1)} warm requests"
    rows = [("bytes per request", f"{dec['bytes'] / 2**20:.1f} MiB"),
            ("CP all-gather + reorganize", f"{gather * 1e3:.1f} ms"),
            ("raw one-descriptor write (ceiling)", f"{raw * 1e3:.1f} ms")]
    for mode, m in modes.items():
        label = mode if m["used"] == mode else f"{mode} (chose {m['used']})"
        rows += [(f"{label}: descriptors per request", f"{m['descriptors']}"),
                 (f"{label}: ready -> pool holds bytes", f"{m['latency_s'][0] * 1e3:.1f} ms"),
                 (f"{label}: throughput / ceiling", f"{raw / m['latency_s'][0]:.2f}"),
                 (f"{label}: first request (cold)", f"{m['cold_s'] * 1e3:.1f} ms")]
    if "packed" in modes and "direct" in modes:
        speedup = modes["direct"]["latency_s"][0] / modes["packed"]["latency_s"][0]
        rows.append(("packed speedup over direct", f"{speedup:.1f}x"))
    print(f"\n  per request, from both sides ready to the pool holding the bytes ({warm}):")
    for k, v in rows:
        print(f"  {k:<40}{v:>12}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        writer = CsvWriter(out / "demo.csv", provenance(torch.device(cfg.device)))
        # the shape label as `cpkv bench transfer` writes it: A-cp2 is shape A from 2 CP ranks
        shape = cfg.shape + (f"-cp{cfg.cp}" if cfg.cp > 1 else "")
        base = dict(op="demo", shape=shape, page_size=cfg.page_size, tokens=cfg.tokens,
                    pattern="fragmented", unit="ms", metric="time")
        writer.write(provider="cp-gather+reorganize", p50=gather * 1e3, p20="", p80="", **base)
        writer.write(provider="raw-write", p50=raw * 1e3, p20="", p80="", **base)
        for mode, m in modes.items():
            provider = "cpkv-" + mode if mode != "direct" else mode
            p50, p20, p80 = (x * 1e3 for x in m["latency_s"])
            writer.write(provider=provider, p50=p50, p20=p20, p80=p80, **base)
        png, = companion("plots", "plot_demo").plot(out, out)  # the figure, from the CSV
        print(f"\n  wrote {out / 'demo.csv'} and {png}")
    except OSError as e:
        print(f"cpkv demo: cannot write results to {out}: {e}", file=sys.stderr)
        return 2
    if dec["mismatch"]:
        print(f"cpkv demo: FAILED: the decode pool differs at {dec['mismatch']}",
              file=sys.stderr)
        return 1
    print(f"  OK: every byte of {cfg.requests} requests verified on the decode rank")
    return 0
