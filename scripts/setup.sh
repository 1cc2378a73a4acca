#!/usr/bin/env bash
# Idempotent set-up for cpkv: system libraries, a virtual environment, torch, and the package.
# Re-running it is cheap: a stamp keyed on this script and pyproject.toml skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CPKV_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.cpkv-setup-$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

log() { printf '[setup] %s\n' "$*"; }

# Mooncake's wheels link against libibverbs/librdmacm even when only TCP is used.
if ! ldconfig -p | grep -q 'libibverbs.so.1' || ! ldconfig -p | grep -q 'librdmacm.so.1'; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  log "installing libibverbs1 librdmacm1 (Debian)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libibverbs1 librdmacm1 >/dev/null
fi

# --system-site-packages lets an already-installed torch be reused instead of downloaded again.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
py="$VENV/bin/python"
pip() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

has_cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_cuda=1; fi

if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  if [ "$has_cuda" = 1 ]; then
    log "installing torch (CUDA build)"; pip torch
  else
    # Pinned: this version resolves to the local CPU build; an open range would pull a CUDA build.
    log "installing torch==2.13.0 (CPU build)"; pip torch==2.13.0
  fi
fi

if [ "$has_cuda" = 1 ]; then extras="test,plot,integrity,gpu"; else extras="test,plot,integrity,cpu"; fi
log "installing cpkv[$extras]"
pip -e ".[$extras]"

rm -f "$VENV"/.cpkv-setup-*
touch "$stamp"
log "done ($("$py" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")'))"
