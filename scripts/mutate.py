"""Mutation testing for cpkv: hand-written mutants of the code that decides which bytes go where
and when a request is finished, each run against the tests that cover its file.

    python scripts/mutate.py                     # every mutant in scripts/mutants.py
    python scripts/mutate.py --only tx-overlap   # some of them
    python scripts/mutate.py --list              # and which are stale (exit status 1)

Why hand-written and not mutmut / cosmic-ray: their operator mutants number in the thousands over
this package, and the tests that can kill a transfer or CP mutant start real Mooncake engines and
gloo groups in several processes (10-60 s a run on 2 cores), so an exhaustive run would take a
day. Each mutant here is a realistic slip (an off-by-one, a dropped check, a swapped offset) in
code whose failure is silent corruption or a wrong completion.

Mutants run in a scratch copy of the checkout (the working tree is never modified). A mutant is
*killed* when its tests fail, *survived* when they pass, *timed out* past ``--timeout``. Each
mutant's tests are its own ``tests=`` (pytest arguments as-is: files and ``-k`` expressions, so a
survivor costs seconds) or, by default, those of its file (`TESTS_FOR`). The selected tests are
first run unmutated: a red baseline makes every verdict meaningless, so the driver stops there. A
mutant whose ``old`` text no longer occurs exactly once is *stale* (the code moved on; update the
mutant). Writes a markdown report (``--report``) naming each survivor by file:line with its
``equivalent=`` reason, or as not yet killed.

The whole run takes well under an hour on a 2-core machine (the report states the last figure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANE = "tests/integrations"  # run by the vLLM lane's interpreter (make setup-vllm)
LANE_PY = ROOT / ".venv-vllm" / "bin" / "python"
sys.path.insert(0, str(ROOT / "scripts"))

from mutants import MUTANTS, Mutant  # noqa: E402

# Which tests cover which source file: longest matching prefix wins; a mutant may override.
TESTS_FOR = {
    "cpkv/_checks.py": ["tests/kernels/test_bad_input.py"],
    "cpkv/layout.py": ["tests/test_layout.py", "tests/kernels"],
    "cpkv/staging.py": ["tests/test_staging.py"],
    "cpkv/parallel.py": ["tests/test_parallel.py", "tests/cp/test_partition.py",
                         "tests/transfer/test_mapping.py"],
    "cpkv/kernels/": ["tests/kernels"],
    "cpkv/cp/": ["tests/cp", "tests/kernels/test_reorganize.py"],
    "cpkv/cp/partition.py": ["tests/cp/test_partition.py", "tests/kernels/test_reorganize.py"],
    "cpkv/transfer/": ["tests/transfer"],
}


def tests_for(m: Mutant) -> list[str]:
    if m.tests:
        return list(m.tests)
    best = max((p for p in TESTS_FOR if m.file.startswith(p)), key=len, default=None)
    if best is None:
        raise SystemExit(f"mutant {m.id}: no tests cover {m.file}; give it tests=")
    return TESTS_FOR[best]


def problems(m: Mutant) -> list[str]:
    """What makes the mutant stale in this checkout: its ``old`` text not there exactly once,
    or a test file it names (or its file's `TESTS_FOR`) that is not there."""
    out = []
    source = ROOT / m.file
    found = source.read_text().count(m.old) if source.exists() else 0
    if found != 1:
        out.append(f"'old' occurs {found} times in {m.file}")
    args = tests_for(m)
    for i, arg in enumerate(args):
        if not arg.startswith("-") and not (i and args[i - 1] == "-k") \
                and not (ROOT / arg.split("::")[0]).exists():
            out.append(f"no test file {arg}")
    return out


def scratch_copy() -> Path:
    """The checkout's tracked and untracked-not-ignored files, copied to a temporary folder."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    dst = Path(tempfile.mkdtemp(prefix="cpkv-mutate-"))
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    return dst


def python_for(tests: list[str]) -> str:
    """The interpreter for these tests: the vLLM lane's for tests/integrations (there vLLM is
    installed; elsewhere those tests skip, and every mutant would survive)."""
    if not any(t.startswith(LANE) for t in tests):
        return sys.executable
    if not LANE_PY.exists():
        raise SystemExit(f"{' '.join(tests)}: needs the vLLM lane ({LANE_PY}): make setup-vllm")
    return str(LANE_PY)


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [python_for(tests), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        return "timed out", time.monotonic() - t0, ""
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return ("survived" if proc.returncode == 0 else "killed"), time.monotonic() - t0, tail[0]


def line_of(text: str, old: str) -> int:
    return text[:text.index(old)].count("\n") + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    ap.add_argument("--report", default="benchmarks/results/mutation.md")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutant ids: {set(args.only) - {m.id for m in chosen}}")
    if args.list:  # and say which mutants are stale (exit status 1 if any)
        stale = 0
        for m in chosen:
            print(f"{m.id:28} {m.file:32} {m.why}")
            for problem in problems(m):
                print(f"{'':28} STALE: {problem}")
                stale += 1
        return 1 if stale else 0

    t_start = time.monotonic()
    tree = scratch_copy()
    try:
        groups = sorted({tuple(tests_for(m)) for m in chosen})
        for tests in groups:  # a red baseline would make every mutant look killed
            verdict, secs, tail = run_tests(tree, list(tests), args.timeout)
            print(f"baseline {' '.join(tests)}: {verdict} in {secs:.0f} s", flush=True)
            if verdict != "survived":
                raise SystemExit(f"baseline is not green for {tests}: {tail}")
        rows = []
        for m in chosen:
            path = tree / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                rows.append((m, "stale", 0.0, 0, f"'old' occurs {text.count(m.old)} times"))
                print(f"{m.id}: stale", flush=True)
                continue
            line = line_of(text, m.old)
            path.write_text(text.replace(m.old, m.new))
            try:
                verdict, secs, tail = run_tests(tree, tests_for(m), args.timeout)
            finally:
                path.write_text(text)
            rows.append((m, verdict, secs, line, tail))
            print(f"{m.id}: {verdict} ({secs:.0f} s) {m.file}:{line}", flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)

    report = Path(args.report) if Path(args.report).is_absolute() else ROOT / args.report
    report.parent.mkdir(parents=True, exist_ok=True)
    minutes = (time.monotonic() - t_start) / 60
    report.write_text(render(rows, minutes))
    counts = {v: sum(r[1] == v for r in rows) for v in ("killed", "survived", "timed out",
                                                         "stale")}
    scored = counts["killed"] + counts["survived"] + counts["timed out"]
    score = (counts["killed"] + counts["timed out"]) / scored if scored else 0.0
    print(f"{counts} score {score:.1%}; report: {report}")
    return 0


def render(rows, minutes: float) -> str:
    counts = {v: sum(r[1] == v for r in rows) for v in ("killed", "survived", "timed out",
                                                         "stale")}
    scored = counts["killed"] + counts["survived"] + counts["timed out"]
    score = (counts["killed"] + counts["timed out"]) / scored if scored else 0.0
    out = ["# Mutation report", "",
           f"`python scripts/mutate.py` (`make mutate`): {len(rows)} mutants, "
           f"{counts['killed']} killed, {counts['survived']} survived, "
           f"{counts['timed out']} timed out, {counts['stale']} stale; "
           f"kill rate {score:.1%} (timed out counts as killed). The run took "
           f"{minutes:.1f} min (baselines included) on {os.cpu_count()} cores.", "",
           "| mutant | where | verdict | seconds | what it breaks |",
           "| --- | --- | --- | --- | --- |"]
    for m, verdict, secs, line, _ in rows:
        out.append(f"| {m.id} | {m.file}:{line} | {verdict} | {secs:.0f} | {m.why} |")
    survivors = [(m, line) for m, verdict, _, line, _ in rows if verdict == "survived"]
    if survivors:
        out += ["", "Survivors (file:line, and why each is harmless where it is):", ""] + [
            f"- `{m.file}:{line}` {m.id}: {m.why}. "
            + (f"Equivalent: {m.equivalent}." if m.equivalent else "**Not yet killed.**")
            for m, line in survivors]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
