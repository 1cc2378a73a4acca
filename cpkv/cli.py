"""The `cpkv` command: `cpkv demo [--store]`,
`cpkv bench kernels|cp|transfer|store|layerwise|dcp|serve`, `cpkv plot`.

Errors in arguments are one line on stderr and exit status 2; a failed check exits 1.
The sweeps and figures are the top-level packages `benchmarks` and `plots`, installed with cpkv
(beside it, in a checkout or in site-packages), so both commands work from any directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .demos.common import missing_extra
from .report import CompanionError, companion, figures_dir, results_dir
from .shapes import SHAPES

# benchmarks/bench_<name>.py, each with main(argv); plots/plot_<name>.py with plot(results, out)
SWEEPS = ("kernels", "cp", "transfer", "store", "layerwise", "dcp", "serve")
PLOTS = ("kernels", "transfer", "cp", "store", "layerwise", "timeline", "dcp", "serve")
MAX_CP = 8


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
    """Check the arguments and the extras against this machine, then run the end-to-end demo
    (`cpkv.demos`): a missing extra fails at once, before any process starts."""
    from .demos import store, transfer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device on this machine")
    if args.tokens < args.page_size:
        raise CliError(f"--tokens: expected at least one page ({args.page_size}), "
                       f"got {args.tokens}")
    if args.tokens < 2 * args.cp:
        raise CliError(f"--tokens: a zigzag split over {args.cp} ranks needs at least "
                       f"{2 * args.cp} tokens, got {args.tokens}")
    if args.cp > MAX_CP:
        raise CliError(f"--cp: this demo runs at most {MAX_CP} prefill processes, got {args.cp}")
    if args.layers is not None and args.layers > SHAPES[args.shape].num_layers:
        raise CliError(f"--layers: shape {args.shape} has {SHAPES[args.shape].num_layers} "
                       f"layers, got {args.layers}")
    if args.store:
        if args.tokens < args.page_size * args.cp:
            raise CliError(f"--tokens: --store needs a full store page per CP rank "
                           f"({args.page_size * args.cp}), got {args.tokens}")
        _check_extras(["mooncake.store"], "cpkv demo --store")
        return store.run(store.StoreDemoConfig(
            shape=args.shape, page_size=args.page_size, tokens=args.tokens, cp=args.cp,
            layers=args.layers, device=args.device))
    cfg = transfer.DemoConfig(shape=args.shape, page_size=args.page_size, tokens=args.tokens,
                              requests=args.requests, cp=args.cp, layers=args.layers,
                              mode=args.mode, protocol=args.protocol, device=args.device,
                              out=args.out, checksum=args.checksum,
                              corrupt_byte=args.corrupt_byte)
    need, have = transfer.estimated_bytes(cfg), _physical_memory()
    if have and need > 0.8 * have:
        raise CliError(f"this run needs about {need / 2**30:.1f} GiB of memory, the machine "
                       f"has {have / 2**30:.1f} GiB: use fewer --tokens, --requests or --cp")
    _check_writable(Path(args.out))
    _check_extras(transfer.needs(cfg), "cpkv demo")
    _companion("plots", "plot_demo")  # its figure: the plots package shipped with cpkv
    return transfer.run(cfg)


def _check_extras(modules, what: str) -> None:
    missing = missing_extra(modules)
    if missing:
        raise CliError(f"{what} {missing}")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".cpkv-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CliError(f"--out: cannot write to {path}: {e.strerror or e}") from None


def _companion(package: str, module: str):
    """`cpkv.report.companion`, its refusals as one-line CLI errors."""
    try:
        return companion(package, module)
    except CompanionError as e:
        raise CliError(str(e)) from None


def bench(args) -> int:
    """Run a sweep (benchmarks/bench_<sweep>.py); its options follow its name."""
    return _companion("benchmarks", f"bench_{args.sweep}").main(args.rest)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")



def plot(args) -> int:
    """Turn the sweeps' CSVs into PNGs (plots/plot_<figure>.py; needs matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("cpkv plot needs matplotlib: pip install 'cpkv[plot]'") from None
    unknown = [f for f in args.figures if f not in PLOTS]
    if unknown:
        raise CliError(f"unknown figure {unknown[0]!r}: expected some of {', '.join(PLOTS)}")
    _check_writable(Path(args.out))
    results = Path(args.results)
    for name in args.figures or PLOTS:
        module = _companion("plots", f"plot_{name}")
        try:
            for path in module.plot(results, Path(args.out)):
                print(f"wrote {path}")
        except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
            raise CliError(f"plot {name}: {e}") from None
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cpkv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="end-to-end: CP prefill group -> decode rank, verified")
    d.add_argument("--shape", choices=sorted(SHAPES), default="A",
                   help="model shape (A: Llama-3.1-8B, B: Llama-3-70B TP8, C: DeepSeek-V3 MLA)")
    d.add_argument("--page-size", type=_positive, default=16)
    d.add_argument("--tokens", type=_positive, default=1024, help="tokens per request")
    d.add_argument("--requests", type=_positive, default=6,
                   help="requests per mode; the first is the warm-up")
    d.add_argument("--cp", type=_positive, default=2, help="prefill CP ranks (processes)")
    d.add_argument("--layers", type=_positive, default=None,
                   help="fewer layers than the shape has (faster)")
    d.add_argument("--mode", choices=("compare", "packed", "direct", "auto"), default="compare",
                   help="compare: packed then direct; or one of packed (cpkv), direct (the "
                        "per-page baseline), auto (the cost model picks)")
    d.add_argument("--protocol", choices=("tcp", "rdma"), default="tcp")
    d.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--out", default="out", help="folder for demo.csv and demo.png")
    d.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True,
                   help="CRC32C of every packed segment, verified before Success (default on)")
    d.add_argument("--store", action="store_true",
                   help="the KV store tier instead: CP writers store a prompt in Mooncake Store, "
                        "a reader of another page size loads it (uses --shape, --page-size, "
                        "--tokens, --cp, --layers, --device)")
    d.add_argument("--corrupt-byte", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(func=demo)
    b = sub.add_parser("bench", help="run a benchmark sweep (its options after its name)")
    b.add_argument("sweep", choices=SWEEPS)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=bench)
    pl = sub.add_parser("plot", help="PNGs from the sweeps' CSVs")
    pl.add_argument("figures", nargs="*", help=f"which ({', '.join(PLOTS)}); default all")
    pl.add_argument("--results", default=str(results_dir()),
                    help="folder of the sweeps' CSVs (default: a checkout's benchmarks/results, "
                         "else ./cpkv-results)")
    pl.add_argument("--out", default=str(figures_dir()),
                    help="folder for the PNGs (default: a checkout's plots/, else the results "
                         "folder)")
    pl.set_defaults(func=plot)
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
