"""Codegen report: compile every kernel specialisation the launcher would use, ahead of time,
for a GPU target this machine does not have, and read its code quality from the machine code.

    python -m benchmarks.codegen [--out benchmarks/results/codegen.csv] [--arch sm_90a,sm_100a]

No GPU is needed: Triton lowers the kernel to PTX for the target, and the ``ptxas`` / ``cuobjdump``
bundled with Triton's wheel give registers, spills and SASS. The specialisations come from
`cpkv.kernels.paged_copy.plan_launch` (the launcher's own planning code) on shapes A, B, C
(../shared/BENCHMARKS.md) at page sizes 1, 16, 64 with fragmented page ids, for every op of `OPS`
(pack, unpack, reorganize, and the variants of pack / unpack: a slot cut into values). One row
per specialisation:

- ``vector_bits``: the narrowest of the widest global load and widest global store in SASS
  (128 = ``LDG.E.128`` and ``STG.E.128``);
- ``registers``, ``spills`` (spill stores + loads, bytes) from ``ptxas -v``;
- ``div_rem``: 64-bit integer div/rem in the PTX (each becomes a long SASS sequence);
- ``sass_instructions``: instructions in the kernel's SASS.

Targets on sm_90a: 128-bit accesses, <= 64 registers, no spills, no 64-bit div/rem.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 warning only

ARCHS = {"sm_90a": 90, "sm_100a": 100}
TARGETS = {"vector_bits": 128, "registers": 64, "spills": 0, "div_rem": 0}
# op -> the plan_launch flags the launcher uses for it
OPS = {
    "pack": dict(unpack=False),
    "unpack": dict(unpack=True),
    "reorganize": dict(unpack=True, token_map=True),
    "pack-regions": dict(unpack=False, regions=True),
    "unpack-regions": dict(unpack=True, regions=True),
}
COLUMNS = ["op", "shape", "page_size", "arch", "vector_bits", "registers", "spills", "div_rem",
           "sass_instructions", "word_bytes", "vec", "head_words", "row_words", "contig_heads",
           "block_t", "block_r", "chunk_words", "blocks", "triton", "ptxas", "git_sha",
           "timestamp"]


def _bin(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def arch_supported(arch: str) -> bool:
    """Whether the bundled ptxas assembles for ``arch``."""
    try:
        out = subprocess.run([str(_bin("ptxas")), "--help"], capture_output=True, text=True,
                             timeout=60).stdout
    except OSError:
        return False
    return arch in out


def compile_kernel(fn, signature: dict, constexprs: dict, arch: str) -> dict:
    """Compile a ``@triton.jit`` function for ``arch`` (no GPU needed); measure its code.

    Pointer arguments are assumed 16-byte aligned (as Triton specialises real tensors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*")}
    src = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32))
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        p_ptx, p_cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        p_ptx.write_text(ptx)
        p_cubin.write_bytes(cubin)
        # Triton 3.9 assembles with its newest bundled ptxas (its PTX version needs it).
        ptxas = _bin("ptxas-blackwell") if _bin("ptxas-blackwell").exists() else _bin("ptxas")
        info = subprocess.run([str(ptxas), "-v", f"-arch={arch}", str(p_ptx), "-o",
                               str(Path(tmp, "v.cubin"))], capture_output=True, text=True,
                              timeout=300)
        sass = subprocess.run([str(_bin("cuobjdump")), "-sass", str(p_cubin)],
                              capture_output=True, text=True, timeout=300).stdout
        usage = subprocess.run([str(_bin("cuobjdump")), "-res-usage", str(p_cubin)],
                               capture_output=True, text=True, timeout=300).stdout
    log = info.stdout + info.stderr
    regs = re.search(r"REG:(\d+)", usage)  # Triton's own cubin, as it would be launched
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "vector_bits": min(_widest(sass, "LDG"), _widest(sass, "STG")),
        "registers": int(regs.group(1)) if regs else -1,
        "spills": int(spill.group(1)) + int(spill.group(2)) if spill else -1,
        "div_rem": len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
        "sass_instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M)),
    }


def _widest(sass: str, op: str) -> int:
    """Widest global access of kind ``op`` (LDG/STG) in bits; 0 if none."""
    widths = [int(w) if w else 32 for w in re.findall(rf"\b{op}\.E(?:\.[A-Z]+)*?(?:\.(64|128))?\b",
                                                         sass)]
    return max(widths, default=0)


def launch_specs(shape: str, page_size: int, op: str):
    """(spec, number of blocks) of every launch the launcher plans for one request of ``op``
    on a pool of ``shape`` (all layers, all heads; fragmented int32 ids, aligned buffers)."""

    from cpkv.kernels.paged_copy import plan_launch
    from cpkv.shapes import SHAPES

    cache = SHAPES[shape].cache(num_pages=2, page_size=page_size)  # only shapes/strides matter
    plan = plan_launch(cache, range(cache.num_layers), range(cache.num_heads), 16,
                       interpret=False, **OPS[op])
    return [(g.spec, len(g.rows)) for g in plan]


def signature(spec) -> dict:
    """The kernel's argument types as `_launch` passes them (int32 page ids, int64 map)."""
    word = {8: "i64", 4: "i32", 2: "i16", 1: "u8"}[spec.word]
    sig = {"slot": f"*{word}", "desc": "*i64", "page_ids": "*i32",
           "token_map": "*i64" if spec.has_token_map else "*i32",
           "num_rows": "i32", "rows_per_region": "i32", "region_words": "i32"}
    sig.update({name: "constexpr" for name in spec.constexprs()})
    return sig


def report(archs, shapes=("A", "B", "C"), page_sizes=(1, 16, 64), ops=OPS):
    """Rows of the report: one per (op, shape, page size, arch, specialisation)."""
    from cpkv.kernels.paged_copy import _paged_copy_kernel

    rows, seen = [], {}
    for arch in archs:
        for op in ops:
            for shape in shapes:
                for ps in page_sizes:
                    for spec, n_blocks in launch_specs(shape, ps, op):
                        key = (arch, spec)
                        if key not in seen:
                            seen[key] = compile_kernel(_paged_copy_kernel, signature(spec),
                                                       spec.constexprs(), arch)
                        rows.append(dict(
                            op=op, shape=shape, page_size=ps, arch=arch, **seen[key],
                            word_bytes=spec.word, vec=spec.vec, head_words=spec.head_words,
                            row_words=spec.row_words, contig_heads=int(spec.contig_heads),
                            block_t=spec.block_t, block_r=spec.block_r,
                            chunk_words=spec.chunk_words, blocks=n_blocks))
    return rows


def misses(row: dict) -> list[str]:
    """The targets a row misses (empty when it meets them all)."""
    out = []
    if row["vector_bits"] < TARGETS["vector_bits"]:
        out.append(f"vector_bits {row['vector_bits']} < {TARGETS['vector_bits']}")
    for k in ("registers", "spills", "div_rem"):
        if not 0 <= row[k] <= TARGETS[k]:
            out.append(f"{k} {row[k]} > {TARGETS[k]}")
    return out


def _provenance() -> dict:
    import triton

    ptxas = _bin("ptxas-blackwell") if _bin("ptxas-blackwell").exists() else _bin("ptxas")
    version = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    m = re.search(r"release ([\d.]+)", version)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"triton": triton.__version__, "ptxas": m.group(1) if m else "",
            "git_sha": sha,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "codegen.csv"))
    p.add_argument("--arch", default="sm_90a,sm_100a",
                   help="comma-separated; an arch the bundled ptxas lacks is skipped")
    p.add_argument("--shapes", default="A,B,C")
    p.add_argument("--page-sizes", default="1,16,64")
    args = p.parse_args(argv)
    archs = []
    for arch in args.arch.split(","):
        if arch not in ARCHS:
            p.error(f"--arch: expected some of {sorted(ARCHS)}, got {arch!r}")
        if arch_supported(arch):
            archs.append(arch)
        else:
            print(f"skipping {arch}: the bundled ptxas does not support it")
    rows = report(archs, args.shapes.split(","), [int(x) for x in args.page_sizes.split(",")])
    prov = _provenance()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({**row, **prov})
    bad = 0
    for row in rows:
        miss = misses(row) if row["arch"] == "sm_90a" else []
        bad += bool(miss)
        print(f"{row['op']:10} {row['shape']} ps={row['page_size']:<3} {row['arch']} "
              f"{row['vector_bits']}-bit regs={row['registers']} spills={row['spills']} "
              f"div_rem={row['div_rem']} sass={row['sass_instructions']}"
              + (f"  MISSES: {'; '.join(miss)}" if miss else ""))
    print(f"wrote {len(rows)} rows to {args.out}; {bad} miss the sm_90a targets")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
