"""Codegen report: compile every kernel specialisation the launcher would use, ahead of time,
for a GPU target this machine does not have, and read its code quality from the machine code.

    python -m benchmarks.codegen [--out benchmarks/results/codegen.csv] [--arch sm_90a,sm_100a]

No GPU is needed: Triton lowers the kernel to PTX for the target, and the ``ptxas`` / ``cuobjdump``
bundled with Triton's wheel give registers, spills and SASS. The specialisations come from
`cpkv.kernels.paged_copy.plan_launch` (the launcher's own planning code) on shapes A, B, C
(../shared/BENCHMARKS.md) at page sizes 1, 16, 64 with fragmented page ids, for pack, unpack and
reorganize. One row per specialisation:

- ``vector_bits``: the narrowest of the widest global load and widest global store in SASS
  (128 = ``LDG.E.128`` and ``STG.E.128``);
- ``registers``, ``spills`` (spill stores + loads, bytes) from ``ptxas -v``;
- ``div_rem``: 64-bit integer div/rem in the PTX (each becomes a long SASS sequence);
- ``sass_instructions``: instructions in the kernel's SASS.

Targets on sm_90a: 128-bit accesses, <= 64 registers, no spills, no 64-bit div/rem.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 warning only

ARCHS = {"sm_90a": 90, "sm_100a": 100}
TARGETS = {"vector_bits": 128, "registers": 64, "spills": 0, "div_rem": 0}
COLUMNS = ["op", "shape", "page_size", "arch", "word_bytes", "page_size_c", "head_words",
           "row_words", "contig_heads", "block_t", "block_r", "chunk_words", "vector_bits",
           "registers", "spills", "div_rem", "sass_instructions"]


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
