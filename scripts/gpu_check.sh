#!/usr/bin/env bash
# The GPU check, one command: GPU tests, codegen report, kernel sweep (device time and end to
# end), the staging arena, plots. Made for one H100/H200 with Python 3.12, torch + Triton
# preinstalled and no package registry: anything missing travels as wheels in .whl/ (see
# scripts/gpu_wheels.sh). Runs in under 9 minutes there; every step has its own time limit and
# a failing step does not stop the others (the exit status says whether any failed).
#
#   scripts/gpu_check.sh OUTDIR [--quick]
#
# --quick: tiny sweep, the GPU-marked tests only; what a CPU machine can run of the check.
# OUTDIR gets: gpu-tests.log, tests.log, codegen.csv, kernels.csv, digest.csv, arena.csv,
# kernels.png, gpu_e2e.png, summary.txt (one line per step: ok / FAILED / skipped, with its
# time).
# GPU_CHECK_SKIP=tests,codegen (comma-separated step names) skips steps; PYTHON picks the
# interpreter (default python3).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--quick]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case "$1" in -*|"") usage ;; esac
OUT=$1
QUICK=0
if [ $# -eq 2 ]; then [ "$2" = "--quick" ] || usage; QUICK=1; fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 MC_LOG_LEVEL=ERROR TRITON_DEFAULT_FP_FUSION=1
failed=0

DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-530}))  # the whole check stays under 9 minutes
step() {  # step NAME LIMIT_S CMD...: run, log, record status and time
  local name=$1 limit=$2; shift 2
  case ",${GPU_CHECK_SKIP:-}," in *",$name,"*)
    echo "$name: skipped (GPU_CHECK_SKIP)" >> "$SUMMARY"; return ;;
  esac
  local left=$((DEADLINE - SECONDS))
  if [ $left -lt 10 ]; then
    echo "$name: skipped (out of time)" >> "$SUMMARY"; failed=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    echo "$name: ok (${took}s)" >> "$SUMMARY"
  else
    [ $rc -eq 124 ] && rc="timeout"
    echo "$name: FAILED ($rc, ${took}s; see $name.log)" >> "$SUMMARY"
    failed=1
  fi
}

# 1. Wheels carried in .whl/ (cpkv's missing dependencies) into a private site directory.
SITE="$OUT/.site"
if compgen -G ".whl/*.whl" > /dev/null; then
  step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "install: skipped (no .whl/ folder; see scripts/gpu_wheels.sh)" >> "$SUMMARY"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
"$PY" - > "$OUT/environment.txt" 2>&1 <<'PYEOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton",
      triton.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory >> 30} GiB, L2 {p.L2_cache_size >> 20} MiB")
PYEOF

# Order: what the GPU's answer depends on first (GPU-marked tests, then the sweep, arena and
# plots), then the whole kernel suite on CUDA tensors and the codegen report; the budget trims
# the last steps, never the sweep, if the machine is slow.
XDIST=()  # spread the kernel suite's compiles over 8 workers where pytest-xdist is installed
if "$PY" -c 'import xdist' 2>/dev/null; then XDIST=(-n 8); fi

# 2. The suite's GPU-marked tests.
if [ $QUICK = 1 ]; then
  step gpu-tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels \
    tests/test_staging.py
else
  step gpu-tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests
fi

# 3. Kernel sweep: device time (do_bench) 4K-32K tokens, end to end at 4K tokens.
rm -f "$OUT/kernels.csv" "$OUT/digest.csv"
if [ $QUICK = 1 ]; then
  step sweep 240 "$PY" -m benchmarks.bench_kernels --quick --shapes B --page-sizes 16 \
    --repeats 2 --patterns fragmented --out "$OUT/kernels.csv"
elif [ "$HAS_CUDA" = 1 ]; then
  step sweep 200 "$PY" -m benchmarks.bench_kernels --device cuda --patterns fragmented \
    --out "$OUT/kernels.csv"
else
  echo "sweep: skipped (no CUDA device; use --quick)" >> "$SUMMARY"
fi

# 3b. Integrity cost: pack / unpack with and without the fused digest, and with CRC32C.
if [ $QUICK = 0 ] && [ "$HAS_CUDA" = 1 ]; then
  step digest 60 "$PY" -m benchmarks.bench_digest --device cuda --tokens 32768 --repeats 20 \
    --out "$OUT/digest.csv"
fi

# 4. Staging arena: cuda, and symmetric with a group of one.
step arena 45 "$PY" scripts/gpu_arena.py --out "$OUT/arena.csv"

# 5. Plots from the CSVs.
if [ -s "$OUT/kernels.csv" ]; then
  step plots 30 "$PY" scripts/gpu_plots.py --results "$OUT" --out "$OUT"
fi

# 6. The kernel suite on CUDA tensors (compiled Triton vs the CPU oracles).
if [ $QUICK = 0 ]; then
  step tests 180 "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/kernels \
    tests/test_codegen.py
fi

# 7. Codegen report for this Triton (the committed one is from the CPU machines' Triton).
if [ $QUICK = 1 ]; then
  step codegen 60 env TRITON_INTERPRET=0 "$PY" -m benchmarks.codegen --arch sm_90a \
    --shapes B --page-sizes 16 --out "$OUT/codegen.csv"
else
  # 13 ops x 3 shapes x 3 page sizes x 2 archs: ~100 s of compiles on 2 cores
  step codegen 150 env TRITON_INTERPRET=0 "$PY" -m benchmarks.codegen --out "$OUT/codegen.csv"
fi

cat "$SUMMARY"
exit $failed
