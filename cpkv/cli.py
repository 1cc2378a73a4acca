"""The `cpkv` command: `cpkv demo`, `cpkv bench <sweep>`.

Errors in arguments are one line on stderr and exit status 2; a failed check exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from .shapes import SHAPES

REPO = Path(__file__).resolve().parents[1]
SWEEPS = ("kernels",)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def demo(args) -> int:
    """Kernel round trip on a model-shaped pool (the Mooncake transfer joins in a later step)."""
    from .kernels import pack_pages, unpack_pages

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device on this machine")
    shape = SHAPES[args.shape]
    if args.tokens < args.page_size:
        raise CliError(f"--tokens: expected at least one page ({args.page_size}), "
                       f"got {args.tokens}")
    n_pages = -(-args.tokens // args.page_size)
    print(f"cpkv demo: kernel round trip (pack -> unpack into another page size); "
          f"shape {shape.name} ({shape.model}), {args.tokens} tokens, "
          f"page_size {args.page_size} -> 1, {device}")
    src = shape.cache(num_pages=2 * n_pages, page_size=args.page_size, device=device)
    dst = shape.cache(num_pages=2 * args.tokens, page_size=1, device=device)
    for layers in src.buffers.values():
        for t in layers:
            t.view(torch.uint8).random_(0, 256)
    g = torch.Generator().manual_seed(0)
    src_ids = torch.randperm(src.num_pages, generator=g)[:n_pages].to(device)
    dst_ids = torch.randperm(dst.num_pages, generator=g)[:args.tokens].to(device)

    t0 = time.perf_counter()
    packed = pack_pages(src, src_ids, num_tokens=args.tokens)
    t1 = time.perf_counter()
    unpack_pages(packed, dst, dst_ids, num_tokens=args.tokens)
    t2 = time.perf_counter()
    same = torch.equal(pack_pages(dst, dst_ids, num_tokens=args.tokens), packed)
    mib = packed.numel() / 2**20
    print(f"  {'step':<8}{'MiB':>10}{'ms':>10}{'GB/s (r+w)':>12}")
    for step, dt in (("pack", t1 - t0), ("unpack", t2 - t1)):
        print(f"  {step:<8}{mib:>10.1f}{dt * 1e3:>10.1f}{2 * packed.numel() / dt / 1e9:>12.2f}")
    if not same:
        print("FAILED: the decode pool does not hold the packed bytes", file=sys.stderr)
        return 1
    print("OK: every byte verified")
    return 0


def bench(args) -> int:
    """Run a sweep from benchmarks/ (needs a source checkout)."""
    if not (REPO / "benchmarks" / f"bench_{args.sweep}.py").exists():
        raise CliError(f"cpkv bench needs a source checkout (no benchmarks/ beside {REPO})")
    sys.path.insert(0, str(REPO))
    module = importlib.import_module(f"benchmarks.bench_{args.sweep}")
    return module.main(args.rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpkv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="end-to-end run on an embedded default")
    d.add_argument("--shape", choices=sorted(SHAPES), default="A")
    d.add_argument("--page-size", type=_positive, default=16)
    d.add_argument("--tokens", type=_positive, default=2048)
    d.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    d.set_defaults(func=demo)
    b = sub.add_parser("bench", help="run a benchmark sweep (options after the sweep name)")
    b.add_argument("sweep", choices=SWEEPS)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=bench)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"cpkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
