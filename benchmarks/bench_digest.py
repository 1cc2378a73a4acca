"""Integrity cost, side by side: pack and unpack with and without the fused digest, and with the
transfer's opt-in CRC32C.

    python -m benchmarks.bench_digest [--device cpu|cuda] [--shapes A,B,C] [--page-sizes 16]
                                      [--tokens 256,1024] [--repeats 15] [--out PATH]

Each repeat times every variant once, in a shuffled order, so a busy machine slows them alike
and none always runs first; each row gives a variant's time and its cost relative to the plain
call of the same repeat (``metric=cost_vs_plain``: variant time / plain time; median, p20, p80
over the repeats).
Variants of ``op`` pack and unpack (fragmented page ids, all layers and heads):

- ``cpkv-<backend>``: the call (Triton on a GPU, the torch path on a CPU);
- ``digest-cpkv-<backend>``: the call with ``digest=`` (inside the kernel on a GPU; the torch
  path reads the slot a second time);
- ``crc32c-cpkv-<backend>``: the call and the CRC32C of the slot as `cpkv.transfer` computes it
  (on the host; a GPU slot is copied there first); skipped without the ``crc32c`` package.

and ``op=checksum``: ``packed_digest`` and ``crc32c`` of the slot alone (their cost_vs_plain is
relative to the plain pack). On a GPU each call is timed with CUDA events (host work, the CRC,
included); on a CPU with the wall clock.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from benchmarks.bench_kernels import _ints, device_name
from benchmarks.common import RESULTS, page_ids, random_fill
from cpkv.kernels import pack_pages, packed_digest, unpack_pages
from cpkv.report import CsvWriter, provenance, quantiles
from cpkv.shapes import SHAPES


def _crc32c():
    """CRC32C of a slot as the transfer's opt-in checksum computes it (host bytes), or None."""
    try:
        import crc32c
    except ImportError:
        return None
    return lambda buf: crc32c.crc32c(memoryview((buf.cpu() if buf.is_cuda else buf).numpy()))


def _timer(device: torch.device):
    """Seconds one call of fn takes: CUDA events on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return timed

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed


def variants(src, dst, ids, dst_ids, tokens, slot, digest, provider, crc):
    """(op, provider) -> call, the plain call of each op first."""
    runs = {}
    for op in ("pack", "unpack"):
        def call(dig=None, op=op):
            if op == "pack":
                return pack_pages(src, ids, num_tokens=tokens, out=slot, digest=dig,
                                  validate=False)
            return unpack_pages(slot, dst, dst_ids, num_tokens=tokens, digest=dig,
                                validate=False)
        runs[op, provider] = call
        runs[op, "digest-" + provider] = lambda call=call: call(digest)
        if crc is not None:
            runs[op, "crc32c-" + provider] = lambda call=call: (call(), crc(slot))
    runs["checksum", "packed_digest"] = lambda: packed_digest(slot)
    if crc is not None:
        runs["checksum", "crc32c"] = lambda: crc(slot)
    return runs


def bench_config(writer, device, provider, name, ps, tokens, *, repeats) -> str:
    shape = SHAPES[name]
    n_pages = -(-tokens // ps)
    src = shape.cache(num_pages=2 * n_pages, page_size=ps, device=device)
    dst = shape.cache(num_pages=2 * n_pages, page_size=ps, device=device)
    random_fill(src)
    random_fill(dst)
    ids = page_ids("fragmented", n_pages, 2 * n_pages, device)
    dst_ids = page_ids("fragmented", n_pages, 2 * n_pages, device, seed=1)
    slot = torch.empty(src.packed_nbytes(tokens), dtype=torch.uint8, device=device)
    digest = torch.zeros(1, dtype=torch.int64, device=device)
    runs = variants(src, dst, ids, dst_ids, tokens, slot, digest, provider, _crc32c())
    timed = _timer(device)
    for fn in runs.values():  # warm: compile, key tables, allocator
        fn()
    times = {k: [] for k in runs}
    order = list(runs)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no variant always runs first (after another's writes)
        for k in order:
            times[k].append(timed(runs[k]))
    base = dict(shape=name, page_size=ps, tokens=tokens, pattern="fragmented")
    summary = []
    for (op, prov), ts in times.items():
        p50, p20, p80 = quantiles(ts)
        writer.write(op=op, provider=prov, **base, metric="time", unit="ms", p50=p50 * 1e3,
                     p20=p20 * 1e3, p80=p80 * 1e3)
        plain = times.get((op, provider)) or times[("pack", provider)]
        ratio = quantiles([t / p for t, p in zip(ts, plain, strict=True)])
        writer.write(op=op, provider=prov, **base, metric="cost_vs_plain", unit="x",
                     p50=ratio[0], p20=ratio[1], p80=ratio[2])
        if prov != provider:
            summary.append(f"{op}/{prov} {ratio[0]:.2f}x")
    return f"{slot.numel() / 2**20:.1f} MiB; vs the plain call: {', '.join(summary)}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="A,B,C")
    p.add_argument("--page-sizes", type=_ints, default=[16])
    p.add_argument("--tokens", type=_ints, default=None,
                   help="request sizes (default: 256, 1024 on a CPU; 4K, 32K on a GPU)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(RESULTS / "digest.csv"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    writer = CsvWriter(args.out, {**provenance(device), "device": device_name(device)})
    tokens_list = args.tokens or ([4096, 32768] if device.type == "cuda" else [256, 1024])
    provider = "cpkv-triton" if device.type == "cuda" else "cpkv-torch"
    configs = [(s, ps, n) for s in args.shapes.split(",") for ps in args.page_sizes
               for n in tokens_list]
    for i, (name, ps, tokens) in enumerate(configs, 1):
        line = bench_config(writer, device, provider, name, ps, tokens, repeats=args.repeats)
        print(f"[{i}/{len(configs)}] {name} ps={ps} tokens={tokens}: {line}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {writer.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
