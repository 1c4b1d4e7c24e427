#!/usr/bin/env bash
# Check flexkv_core's CUDA data path on a machine with one NVIDIA GPU, in under 6 minutes (`make gpu-check`).
#
# Made for a short loan of a GPU machine: Python 3.12 with a CUDA PyTorch, numpy and xxhash, NO vLLM, NO
# network and maybe no compiler. It runs from this checkout (no install): scripts/gpu_check.py imports
# flexkv_core's layout, CPU pool, block copier and CUDA batched copy only, which need nothing beyond torch,
# numpy and xxhash; the compiled CPU copy extension is never imported on the CUDA path.
#
# Should a wider import ever need more (msgspec, pyyaml, pyzmq, prometheus-client...), put their wheels in
# gpu_wheels/ (ignored by git, well under 40 MiB) before the loan, from a machine with network:
#   pip download --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --only-binary=:all: --no-deps -d gpu_wheels msgspec pyyaml pyzmq prometheus-client
# and send it along with the working tree (the device tool's `carry`); this script installs them into a
# temporary directory, offline, and puts that on PYTHONPATH.
#
#   bash scripts/gpu_check.sh              # the full check (prints one table; exit 1 if a check fails)
#   bash scripts/gpu_check.sh --quick      # smaller sizes
#   bash scripts/gpu_check.sh --dry-run    # no GPU: the same cases on CPU tensors (checks the script)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && ! "$PY" -c 'import torch' 2>/dev/null && PY="$ROOT/.venv/bin/python"

extra=""
if compgen -G "$ROOT/gpu_wheels/*.whl" >/dev/null; then
  extra="$(mktemp -d /tmp/flexkv-gpu-wheels.XXXXXX)"
  "$PY" -m pip install -q --no-index --no-deps --target "$extra" "$ROOT"/gpu_wheels/*.whl
fi
export PYTHONPATH="$ROOT${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 360 "$PY" "$ROOT/scripts/gpu_check.py" "$@"
