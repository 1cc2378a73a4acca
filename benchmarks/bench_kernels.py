"""Kernel sweep: pack and unpack vs a same-run plain copy (ceiling) and a naive per-layer baseline.

Bandwidth counts read + write (2 x the packed payload). On CPU the cpkv provider is the torch path
(the Triton interpreter is never timed); on a GPU it is the Triton kernel.

    python -m benchmarks.bench_kernels [--quick] [--device cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import RESULTS, measure, page_ids, random_fill
from cpkv.kernels import pack_pages, unpack_pages
from cpkv.report import CsvWriter, provenance
from cpkv.shapes import SHAPES

FULL_TOKENS = {"cpu": [256, 1024, 4096], "cuda": [256, 1024, 4096, 16384, 32768]}
QUICK_TOKENS = [64, 256]


def naive_pack(cache, ids, num_tokens, out):
    """The baseline: per layer and component, index_select whole pages, then copy the tokens."""
    pos = 0
    for layer in range(cache.num_layers):
        for spec in cache.components:
            pages = cache.nhd_view(spec.name, layer).index_select(0, ids)
            rows = pages.flatten(0, 1)[:num_tokens]
            n = rows.numel() * rows.element_size()
            out[pos:pos + n].view(rows.dtype).view(rows.shape).copy_(rows)
            pos += n


def naive_unpack(packed, cache, ids, num_tokens):
    """The baseline: per layer and component, index_put the tokens in the pool's dtype."""
    t = torch.arange(num_tokens, device=ids.device)
    pages, slots = ids.long()[t // cache.page_size], t % cache.page_size
    pos = 0
    for layer in range(cache.num_layers):
        for spec in cache.components:
            pool = cache.nhd_view(spec.name, layer)
            n = num_tokens * spec.num_heads * spec.head_nbytes
            block = packed[pos:pos + n].view(spec.dtype).view(num_tokens, spec.num_heads, -1)
            pool[pages, slots] = block
            pos += n


def bench_config(writer, device, provider, name, ps, tokens, pattern, *, layers, repeats):
    """Time one configuration; returns a one-line summary of ratios to the copy ceiling."""
    shape = SHAPES[name]
    n_pages = -(-tokens // ps)
    src = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers, device=device)
    dst = shape.cache(num_pages=2 * n_pages, page_size=ps, num_layers=layers, device=device)
    random_fill(src)
    random_fill(dst)
    ids = page_ids(pattern, n_pages, 2 * n_pages, device)
    dst_ids = page_ids(pattern, n_pages, 2 * n_pages, device, seed=1)
    nbytes = src.packed_nbytes(tokens)
    slot = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy_src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    copy_dst = torch.empty_like(copy_src)
    base = dict(shape=name, page_size=ps, tokens=tokens, pattern=pattern)
    ceiling = measure(lambda: copy_dst.copy_(copy_src), device, repeats=repeats)
    for op in ("pack", "unpack"):
        writer.timing(metric_base=dict(op=op, provider="copy", **base), seconds=ceiling,
                      moved_bytes=2 * nbytes, ceiling_s=ceiling[0])
    runs = {
        ("pack", provider): lambda: pack_pages(src, ids, num_tokens=tokens, out=slot,
                                               validate=False),
        ("pack", "naive"): lambda: naive_pack(src, ids, tokens, slot),
        ("unpack", provider): lambda: unpack_pages(slot, dst, dst_ids, num_tokens=tokens,
                                                   validate=False),
        ("unpack", "naive"): lambda: naive_unpack(slot, dst, dst_ids, tokens),
    }
    summary = []
    for (op, prov), fn in runs.items():
        t = measure(fn, device, repeats=repeats)
        writer.timing(metric_base=dict(op=op, provider=prov, **base), seconds=t,
                      moved_bytes=2 * nbytes, ceiling_s=ceiling[0])
        summary.append(f"{op}/{prov} {ceiling[0] / t[0]:.2f}")
    return f"{nbytes / 2**20:.1f} MiB, ratio to copy: {', '.join(summary)}"


def run(args) -> int:
    device = torch.device(args.device)
    writer = CsvWriter(args.out, provenance(device))
    tokens_list = QUICK_TOKENS if args.quick else FULL_TOKENS[device.type]
    configs = [(s, ps, n, pat) for s in args.shapes.split(",") for ps in args.page_sizes
               for n in tokens_list for pat in ("fragmented", "contiguous")]
    provider = "cpkv-triton" if device.type == "cuda" else "cpkv-torch"
    for i, (name, ps, tokens, pattern) in enumerate(configs, 1):
        line = bench_config(writer, device, provider, name, ps, tokens, pattern,
                            layers=2 if args.quick else None, repeats=args.repeats)
        print(f"[{i}/{len(configs)}] {name} ps={ps} tokens={tokens} {pattern}: {line}",
              flush=True)
    print(f"wrote {writer.rows} rows to {args.out}")
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 layers (CI-class machines)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="A,B,C")
    p.add_argument("--page-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(RESULTS / "kernels.csv"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
