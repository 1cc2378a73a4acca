"""Kernel sweep: pack, unpack and reorganize vs a same-run plain copy (ceiling), a naive per-layer
baseline, and the same calls end to end from Python (host overhead included).

Bandwidth counts read + write (2 x the bytes moved). On CPU the cpkv provider is the torch path
(the Triton interpreter is never timed); on a GPU it is the Triton kernel, timed with
``triton.testing.do_bench`` (which clears the L2 before every run; the working set, read + write,
is also >= 4x L2 from 4K tokens on for every shape), and ``e2e-`` providers time single calls
from Python to a synchronised result: launches, argument checks and all (``e2e-cpkv-...`` with
``validate=False``, ``e2e-validate-cpkv-...`` with the checks; ``e2e-copy`` the same for the
copy). Their ratio_to_copy is still to the copy's device time. The device column names the GPU,
its driver and CUDA runtime.

    python -m benchmarks.bench_kernels [--quick] [--device cuda] [--ops pack,unpack,reorganize]
                                       [--out PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from benchmarks.common import RESULTS, measure, page_ids, random_fill
from cpkv.cp import split_token_map, zigzag_split
from cpkv.kernels import pack_pages, reorganize_pages, unpack_pages
from cpkv.report import CsvWriter, provenance, quantiles
from cpkv.shapes import SHAPES

FULL_TOKENS = {"cpu": [256, 1024, 4096], "cuda": [4096, 8192, 32768]}
QUICK_TOKENS = [64, 256]
E2E_TOKENS = {"full": 4096, "quick": 64}  # requests timed end to end
OPS = ("pack", "unpack", "reorganize")


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
    pages, entries = ids.long()[t // cache.page_size], t % cache.page_size
    fmt = cache.packed_format(num_tokens)
    for layer in range(cache.num_layers):
        for c, spec in enumerate(cache.components):
            pool = cache.nhd_view(spec.name, layer)
            block = packed[fmt.block(layer, c).slice].view(spec.dtype)
            pool[pages, entries] = block.view(num_tokens, spec.num_heads, -1)


def e2e_seconds(fn, device: torch.device, *, repeats: int) -> tuple[float, float, float]:
    """(p50, p20, p80) of single calls timed from Python to a synchronised result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(max(repeats, 5) * (4 if device.type == "cuda" else 1)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return quantiles(times)


def bench_config(writer, device, provider, name, ps, tokens, pattern, *, layers, repeats,
                 ops=OPS, e2e=False):
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
    for op in ops:
        writer.timing(metric_base=dict(op=op, provider="copy", **base), seconds=ceiling,
                      moved_bytes=2 * nbytes, ceiling_s=ceiling[0])
    # reorganize: a zigzag CP-2 gather of the request, written through its token map
    plan = zigzag_split(tokens, 2)
    all_ids, token_map = split_token_map(plan, dst, dst_ids)
    gathered = torch.empty(plan.cp_size * dst.packed_nbytes(plan.padded_len), dtype=torch.uint8,
                           device=device).random_(0, 256)

    def call(op, validate=False):
        if op == "pack":
            return lambda: pack_pages(src, ids, num_tokens=tokens, out=slot, validate=validate)
        if op == "unpack":
            return lambda: unpack_pages(slot, dst, dst_ids, num_tokens=tokens, validate=validate)
        return lambda: reorganize_pages(gathered, dst, all_ids, token_map,
                                        rows_per_rank=plan.padded_len, validate=validate)

    runs = {(op, provider): call(op) for op in ops}
    if "pack" in ops:
        runs["pack", "naive"] = lambda: naive_pack(src, ids, tokens, slot)
    if "unpack" in ops:
        runs["unpack", "naive"] = lambda: naive_unpack(slot, dst, dst_ids, tokens)
    summary = []
    for (op, prov), fn in runs.items():
        t = measure(fn, device, repeats=repeats)
        writer.timing(metric_base=dict(op=op, provider=prov, **base), seconds=t,
                      moved_bytes=2 * nbytes, ceiling_s=ceiling[0])
        summary.append(f"{op}/{prov} {ceiling[0] / t[0]:.2f}")
    if e2e:  # host overhead included; the ratio is still to the copy's device time
        t = e2e_seconds(lambda: copy_dst.copy_(copy_src), device, repeats=repeats)
        writer.timing(metric_base=dict(op="copy", provider="e2e-copy", **base), seconds=t,
                      moved_bytes=2 * nbytes, ceiling_s=ceiling[0])
        for op in ops:
            for prefix, validate in (("e2e-", False), ("e2e-validate-", True)):
                t = e2e_seconds(call(op, validate), device, repeats=repeats)
                writer.timing(metric_base=dict(op=op, provider=prefix + provider, **base),
                              seconds=t, moved_bytes=2 * nbytes, ceiling_s=ceiling[0])
                summary.append(f"{op}/{prefix}{provider} {ceiling[0] / t[0]:.2f}")
    return f"{nbytes / 2**20:.1f} MiB, ratio to copy: {', '.join(summary)}"


def device_name(device: torch.device) -> str:
    """The device column: on a GPU, its name, driver and CUDA runtime."""
    name = provenance(device)["device"]
    if device.type != "cuda":
        return name
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader", f"--id={device.index or 0}"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = ""
    return f"{name} (driver {driver or '?'}, CUDA {torch.version.cuda})"


def run(args) -> int:
    device = torch.device(args.device)
    writer = CsvWriter(args.out, {**provenance(device), "device": device_name(device)})
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS[device.type])
    e2e_tokens = E2E_TOKENS["quick" if args.quick else "full"]
    configs = [(s, ps, n, pat) for s in args.shapes.split(",") for ps in args.page_sizes
               for n in tokens_list for pat in args.patterns.split(",")]
    provider = "cpkv-triton" if device.type == "cuda" else "cpkv-torch"
    ops = tuple(args.ops.split(","))
    for i, (name, ps, tokens, pattern) in enumerate(configs, 1):
        line = bench_config(writer, device, provider, name, ps, tokens, pattern,
                            layers=2 if args.quick else None, repeats=args.repeats, ops=ops,
                            e2e=not args.no_e2e and tokens == e2e_tokens)
        print(f"[{i}/{len(configs)}] {name} ps={ps} tokens={tokens} {pattern}: {line}",
              flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {writer.rows} rows to {args.out}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _choices(allowed):
    def parse(text: str) -> str:
        bad = [x for x in text.split(",") if x not in allowed]
        if bad or not text:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(allowed)}, got {text!r}")
        return text
    return parse


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 layers (CI-class machines)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=_choices(tuple(SHAPES)), default="A,B,C")
    p.add_argument("--page-sizes", type=_ints, default=[1, 16, 64])
    p.add_argument("--tokens", type=_ints, default=None,
                   help="request sizes (default: 4K, 8K, 32K on a GPU)")
    p.add_argument("--patterns", type=_choices(("fragmented", "contiguous")),
                   default="fragmented,contiguous")
    p.add_argument("--ops", type=_choices(OPS), default=",".join(OPS))
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (host) timings")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(RESULTS / "kernels.csv"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
