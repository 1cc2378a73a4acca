"""Layer-wise transfer sweep: how much of the transfer a simulated prefill hides.

A runner thread simulates prefill: per layer it computes for ``r x`` the per-layer transfer
time (the host is free: it sleeps; on a GPU this would be a kernel of that duration), then
either

* send-after-prefill: one `send` once the last layer is computed (today's path), or
* layer-by-layer:     `send_layers(upto=l + 1)` after each layer (issue 11),

while the decode side polls its receiver on its own thread (streaming unpack). The *exposed*
transfer is the time from the last layer computed to the receiver's Success; its ratio to the
non-overlapped transfer (send-after-prefill's exposed time at the same ratio, runs interleaved)
is ``exposed_fraction``. The per-layer transfer time the compute ratios r = 0.5, 1, 2 scale is a
send with no compute at all, measured first, divided by the layers. Also
the whole-request packed end to end (streaming receiver) against one raw descriptor of the same
bytes, and per-layer-group timestamps of one layer-by-layer request for `plots/plot_timeline.py`.

    python -m benchmarks.bench_layerwise [--quick] [--out PATH] [--timeline PATH]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, page_ids, random_fill
from cpkv.report import CsvWriter, provenance, quantiles
from cpkv.shapes import SHAPES
from cpkv.staging import StagingArena
from cpkv.transfer import KVReceiver, KVSender, KVStatus, TransferEngine

RATIOS = (0.5, 1, 2)
FULL = dict(tokens=1024, layers=None, repeats=5)
QUICK = dict(tokens=64, layers=4, repeats=2)
TIMELINE_COLUMNS = ("side", "what", "l0", "l1", "start_ms", "end_ms")
_rid = itertools.count()


class Rig:
    """A sender and a receiver with their own engines and arenas; the sender ships every
    request to the receiver's address."""

    def __init__(self, src, dst, arena_bytes: int, name: str):
        self.engines = (TransferEngine("127.0.0.1"), TransferEngine("127.0.0.1"))
        self.arenas = (StagingArena(arena_bytes), StagingArena(arena_bytes))
        for e, a in zip(self.engines, self.arenas, strict=True):
            e.register_arena(a)
        self.sender = KVSender(src, instance=name, engine=self.engines[0],
                               arena=self.arenas[0], timeout=120)
        self.recv = KVReceiver(dst, engine=self.engines[1], arena=self.arenas[1], timeout=120)

    def raw_write(self, nbytes: int) -> float:
        """Seconds for one descriptor of ``nbytes`` arena to arena (the wire ceiling)."""
        a, b = self.arenas[0].alloc(nbytes), self.arenas[1].alloc(nbytes)
        peer = self.engines[1].session_id
        dst = self.arenas[1].buffer.data_ptr() + b.offset
        try:
            t0 = time.perf_counter()
            self.engines[0].write(peer, [(a.tensor.data_ptr(), dst, nbytes)])
            return time.perf_counter() - t0
        finally:
            a.release()
            b.release()

    def close(self):
        self.sender.close()
        self.recv.close()
        for a in self.arenas:
            a.close()
        for e in self.engines:
            e.close()


def one_request(rig, src_ids, dst_ids, tokens, layers, compute_s, layerwise):
    """Run one simulated prefill and transfer. Returns (exposed s, start, last-computed,
    success, compute spans) with perf_counter times."""
    rid = next(_rid)
    recv, sender = rig.recv, rig.sender
    recv.expect(rid, dst_ids, source=sender.instance, num_tokens=tokens)
    done = {}

    def decode_side():  # a decode scheduler polling its receiver
        while (st := recv.poll(rid)) not in (KVStatus.Success, KVStatus.Failed):
            time.sleep(0.0002)
        done["t"], done["status"] = time.perf_counter(), st

    poller = threading.Thread(target=decode_side)
    start = time.perf_counter()
    poller.start()
    spans = []
    for layer in range(layers):
        t0 = time.perf_counter()
        if compute_s:
            time.sleep(compute_s)
        spans.append((layer, t0, time.perf_counter()))
        if layerwise:
            sender.send_layers(rid, src_ids, layer + 1, to=recv.address, num_tokens=tokens,
                               last=layer == layers - 1)
    computed = time.perf_counter()
    if not layerwise:
        sender.send(rid, src_ids, to=recv.address, num_tokens=tokens)
    poller.join(timeout=120)
    if done.get("status") is not KVStatus.Success:
        raise RuntimeError(f"transfer failed: {recv.reason(rid)}")
    sender.wait(rid, 30)
    recv.forget(rid)
    sender.forget(rid)
    return done["t"] - computed, start, computed, done["t"], spans


def bench_config(writer, name, ps, tokens, layers, repeats, timeline=None) -> str:
    shape = SHAPES[name]
    n_pages = -(-tokens // ps)
    src = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers)
    dst = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers)
    random_fill(src)
    src_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu")
    dst_ids = page_ids("fragmented", n_pages, 2 * n_pages, "cpu", seed=1)
    layers = src.num_layers
    nbytes = src.packed_nbytes(tokens)
    rig = Rig(src, dst, nbytes + (8 << 20), f"{name}-{ps}-{tokens}")
    base = dict(op="layerwise", shape=name, page_size=ps, tokens=tokens)
    try:
        one_request(rig, src_ids, dst_ids, tokens, layers, 0, False)  # warm up
        plain, raw = [], []
        for _ in range(repeats):  # interleaved: both see the same load on a shared machine
            plain.append(one_request(rig, src_ids, dst_ids, tokens, layers, 0, False)[0])
            raw.append(rig.raw_write(nbytes))
        transfer = statistics.median(plain)
        writer.timing(metric_base=dict(provider="raw-write", pattern="fragmented", **base),
                      seconds=quantiles(raw), moved_bytes=nbytes)
        writer.timing(metric_base=dict(provider="cpkv-packed", pattern="fragmented", **base),
                      seconds=quantiles(plain), moved_bytes=nbytes)
        e2e = statistics.median(raw) / transfer
        writer.write(provider="cpkv-packed", metric="throughput_vs_raw", unit="x", p50=e2e,
                     p20="", p80="", pattern="fragmented", **base)
        per_layer = transfer / layers
        line = (f"{nbytes / 2**20:.0f} MiB, transfer {transfer * 1e3:.1f} ms "
                f"({per_layer * 1e3:.2f} ms/layer), packed {e2e:.2f} of raw;")
        for r in RATIOS:
            exposed = {"send-after-prefill": [], "layer-by-layer": []}
            for _ in range(repeats):  # interleaved, as above
                for provider in exposed:
                    exposed[provider].append(one_request(
                        rig, src_ids, dst_ids, tokens, layers, r * per_layer,
                        provider == "layer-by-layer")[0])
            # the non-overlapped transfer: sent after prefill, measured beside it
            whole = statistics.median(exposed["send-after-prefill"])
            for provider, times in exposed.items():
                q = quantiles(times)
                row = dict(provider=provider, pattern=f"compute{r:g}x", **base)
                writer.write(metric="exposed_time", unit="ms", p50=q[0] * 1e3, p20=q[1] * 1e3,
                             p80=q[2] * 1e3, **row)
                writer.write(metric="exposed_fraction", unit="x", p50=q[0] / whole,
                             p20=q[1] / whole, p80=q[2] / whole, **row)
            line += (f" r={r:g}: {statistics.median(exposed['layer-by-layer']) / whole:.0%} "
                     f"of {whole * 1e3:.0f} ms exposed")
        if timeline is not None:
            record_timeline(rig, src_ids, dst_ids, tokens, layers, per_layer, timeline)
    finally:
        rig.close()
    return line


def record_timeline(rig, src_ids, dst_ids, tokens, layers, per_layer, path) -> None:
    """One layer-by-layer request at compute ratio 1, every span relative to its start."""
    rig.sender.trace, rig.recv.trace = [], []
    try:
        _, start, computed, success, spans = one_request(rig, src_ids, dst_ids, tokens, layers,
                                                         per_layer, True)
    finally:
        sender_trace, recv_trace = rig.sender.trace, rig.recv.trace
        rig.sender.trace = rig.recv.trace = None
    rows = [("prefill", "compute", layer, layer + 1, t0, t1) for layer, t0, t1 in spans]
    rows += [("prefill", what, l0, l1, t0, t1) for what, _, l0, l1, t0, t1 in sender_trace]
    rows += [("decode", what, l0, l1, t0, t1) for what, _, l0, l1, t0, t1 in recv_trace]
    rows += [("decode", "success", layers, layers, computed, success)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TIMELINE_COLUMNS)
        for side, what, l0, l1, t0, t1 in rows:
            w.writerow((side, what, l0, l1, f"{(t0 - start) * 1e3:.3f}",
                        f"{(t1 - start) * 1e3:.3f}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 tokens, 4 layers, 2 repeats")
    p.add_argument("--shapes", default="A,C")
    p.add_argument("--page-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 16])
    p.add_argument("--out", default=str(RESULTS / "layerwise.csv"))
    p.add_argument("--timeline", default=str(RESULTS / "timeline.csv"),
                   help="per-layer-group timestamps of one request (shape A, page size 16)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    writer = CsvWriter(args.out, provenance(torch.device("cpu")))
    configs = [(s, ps) for s in args.shapes.split(",") for ps in args.page_sizes]
    for i, (name, ps) in enumerate(configs, 1):
        timeline = args.timeline if (name, ps) == (configs[0][0], max(args.page_sizes)) \
            else None
        line = bench_config(writer, name, ps, cfg["tokens"], cfg["layers"], cfg["repeats"],
                            timeline)
        print(f"[{i}/{len(configs)}] {name} ps={ps} tokens={cfg['tokens']}: {line}",
              flush=True)
    print(f"wrote {writer.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
