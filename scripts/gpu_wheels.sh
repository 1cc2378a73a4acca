#!/usr/bin/env bash
# Prepare, on a machine with a package registry, the wheels scripts/gpu_check.sh installs on a
# GPU machine that has none (Python 3.12, torch + triton + numpy + pytest + hypothesis +
# matplotlib already there). Writes .whl/ at the repository root (git-ignored there).
#
#   scripts/gpu_wheels.sh            # then carry .whl/ with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
# Mooncake's non-CUDA wheel: its CUDA wheel needs libcudart.so.12, which a CUDA 13 machine
# lacks; the transfer tests run over TCP either way. Its own needs (aiohttp, requests,
# msgpack) are on those machines already.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "mooncake-transfer-engine-non-cuda==${MOONCAKE_VERSION:-0.3.13.post1}"
# cpkv itself runs from the checkout (gpu_check.sh puts it first on PYTHONPATH): no wheel.
ls -l .whl  # about 46 MB: within what one device call carries (64 MiB)
