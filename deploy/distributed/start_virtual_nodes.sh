#!/usr/bin/env bash
# N "virtual nodes" on one machine sharing KV blocks through FlexKV's distributed tier.
#
#   1. Redis for the global index, password-protected (or --external-redis); --flush deletes the flexkv:*
#      keys left by an earlier run first
#   2. N nodes, each with its own ports, SSD directory, cache service endpoint and transfer-engine ports:
#        engine mode (--model M):  node i = deploy/single_node.sh --workers 1, its frontend on HTTP base+i
#        --cache-only:             node i = python -m flexkv_core.distributed (a cache node, no engine)
#   3. waits until every node is ready and sees the other N-1 nodes of this run as peers (each node's
#      cache service answers with its own view of the global index), then stays in the foreground;
#      Ctrl-C (or SIGTERM) stops the nodes, then Redis.
#
# Every node gets FLEXKV_ENABLE_DISTRIBUTED=1 and the FLEXKV_REDIS_* / FLEXKV_TE_* / FLEXKV_DIST_* variables
# below; any other FLEXKV_* in the environment (capacities, ...) applies to all nodes. See README.md here.
set -euo pipefail
DEPLOY_NAME="virtual_nodes"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib.sh
source "$HERE/../lib.sh"

usage() {
  cat <<'HELP'
Usage: deploy/distributed/start_virtual_nodes.sh (--model M | --cache-only) [options] [-- worker args]

Nodes:
  --nodes N                  how many (default 2)
  --model M                  engine mode: each node serves M behind its own frontend (deploy/single_node.sh)
  --cache-only               no engines: each node is a standalone cache node (python -m flexkv_core.distributed;
                             --model then only names the cache identity, default flexkv-virtual)
  --http-base-port B         engine mode: node i's frontend listens on B+i (default 8000)
  --te-base-port T           node i's transfer engine uses ports T+2i and T+2i+1 (default 17000)
  --service-base-port S      node i's export service (peers call it) is on S+i (default 17500)
  --kv-events-base-port K    engine mode: node i's worker publishes KV events on tcp://*:K+i (default: an
                             ipc socket in D/node_i/ipc, which only this machine reaches)
  --node-arg ARG             engine mode: an extra deploy/single_node.sh option for every node (repeatable,
                             e.g. --node-arg --ready-timeout --node-arg 1800)
  --system-base-port Y       engine mode: node i's worker serves /health on Y+i (default 18081)
  --node-addr A              this machine's address as the nodes reach each other (default 127.0.0.1)
  --workdir D                node i keeps its logs, SSD directory and sockets in D/node_i
                             (default /tmp/flexkv_virtual_nodes)
  --python PY                interpreter with flexkv-dynamo installed (default $PYTHON or python)
Redis (the metadata of the global index):
  --redis-port P             default 6379
  --redis-host H             default 127.0.0.1
  --redis-password PW        default $FLEXKV_REDIS_PASSWORD; required (Redis is started with it)
  --external-redis           use a Redis that is already running instead of starting one
  --flush                    delete every flexkv:* key in that Redis before starting (nothing else)
Other:
  -h, --help                 this text
Arguments after -- go to every node's worker: python -m dynamo.vllm (engine mode, e.g. -- --max-model-len
8192 --block-size 64) or python -m flexkv_core.distributed (cache-only mode, e.g. -- --num-layers 2
--block-size 16).
HELP
}

NODES=2
MODEL=""
CACHE_ONLY=0
HTTP_BASE=8000
TE_BASE=17000
SERVICE_BASE=17500
KV_BASE=""
NODE_ARGS=()
SYSTEM_BASE=18081
NODE_ADDR=127.0.0.1
WORKDIR=/tmp/flexkv_virtual_nodes
PY="${PYTHON:-python}"
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
REDIS_PASSWORD="${FLEXKV_REDIS_PASSWORD:-}"
EXTERNAL_REDIS=0
FLUSH=0
EXTRA=()

while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --cache-only) CACHE_ONLY=1; shift ;;
    --http-base-port) HTTP_BASE="$2"; shift 2 ;;
    --te-base-port) TE_BASE="$2"; shift 2 ;;
    --service-base-port) SERVICE_BASE="$2"; shift 2 ;;
    --kv-events-base-port) KV_BASE="$2"; shift 2 ;;
    --node-arg) NODE_ARGS+=("$2"); shift 2 ;;
    --system-base-port) SYSTEM_BASE="$2"; shift 2 ;;
    --node-addr) NODE_ADDR="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --redis-port) REDIS_PORT="$2"; shift 2 ;;
    --redis-host) REDIS_HOST="$2"; shift 2 ;;
    --redis-password) REDIS_PASSWORD="$2"; shift 2 ;;
    --external-redis) EXTERNAL_REDIS=1; shift ;;
    --flush) FLUSH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; [ "${1:-}" = "--" ] && shift  # `-- --`, which earlier versions needed, still works
      EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not '$NODES'"
[ "$CACHE_ONLY" = 1 ] || [ -n "$MODEL" ] || die "give --model M (engine mode) or --cache-only"
[ -n "$REDIS_PASSWORD" ] || die "set --redis-password or FLEXKV_REDIS_PASSWORD (the metadata Redis is never left open)"
[ "$CACHE_ONLY" = 1 ] && MODEL="${MODEL:-flexkv-virtual}"
for port in "$TE_BASE" "$SERVICE_BASE" "$HTTP_BASE" "$REDIS_PORT"; do
  [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "ports must be positive integers, not '$port'"
done
command -v "$PY" >/dev/null || die "python interpreter '$PY' not found (use --python)"
command -v redis-cli >/dev/null || die "redis-cli not found on PATH (Debian: apt-get install redis-tools)"

LOG_DIR="$WORKDIR/logs"
mkdir -p "$LOG_DIR"
install_traps
export REDISCLI_AUTH="$REDIS_PASSWORD"  # redis-cli reads it: the password stays off command lines

# Node i's cache service (single_node.sh names its one worker's flexkv_server_0).
node_endpoint() {  # I
  if [ "$CACHE_ONLY" = 1 ]; then printf 'ipc://%s/node_%s/ipc/flexkv_server' "$WORKDIR" "$1"
  else printf 'ipc://%s/node_%s/ipc/flexkv_server_0' "$WORKDIR" "$1"; fi
}
redis_cli() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --no-auth-warning "$@"; }
redis_ready() { [ "$(redis_cli ping 2>/dev/null)" = PONG ]; }

# --- 1. Redis -------------------------------------------------------------------------------------
if [ "$EXTERNAL_REDIS" = 0 ]; then
  command -v redis-server >/dev/null || die "redis-server not found on PATH (Debian: apt-get install redis-server)"
  ! redis_ready || die "something already answers on $REDIS_HOST:$REDIS_PORT: use --external-redis or another --redis-port"
  # The password goes into a private config file, not onto the command line (ps would show it).
  conf="$WORKDIR/redis.conf"
  (umask 077; printf 'port %s\nbind %s\nsave ""\nappendonly no\nrequirepass "%s"\n' \
    "$REDIS_PORT" "$REDIS_HOST" "$REDIS_PASSWORD" >"$conf")
  start_bg redis "$LOG_DIR/redis.log" -- redis-server "$conf"
fi
wait_for "Redis on $REDIS_HOST:$REDIS_PORT (with the password)" 30 redis_ready
if [ "$FLUSH" = 1 ]; then
  n="$(redis_cli --scan --pattern 'flexkv:*' | wc -l)"
  redis_cli --scan --pattern 'flexkv:*' | xargs -r -n 500 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --no-auth-warning del >/dev/null
  log "flushed $n flexkv:* keys from Redis"
fi

# --- 2. nodes -------------------------------------------------------------------------------------
export FLEXKV_ENABLE_DISTRIBUTED=1 FLEXKV_REDIS_HOST="$REDIS_HOST" FLEXKV_REDIS_PORT="$REDIS_PORT"
export FLEXKV_REDIS_PASSWORD="$REDIS_PASSWORD" FLEXKV_NODE_ADDR="$NODE_ADDR"
for ((i = 0; i < NODES; i++)); do
  dir="$WORKDIR/node_$i"
  mkdir -p "$dir/ssd" "$dir/ipc"
  node_env=(
    "FLEXKV_TE_PORT=$((TE_BASE + 2 * i))"
    "FLEXKV_DIST_SERVICE_PORT=$((SERVICE_BASE + i))"
    "FLEXKV_SSD_CACHE_DIR=$dir/ssd"
  )
  if [ "$CACHE_ONLY" = 1 ]; then
    start_bg "node $i" "$LOG_DIR/node_$i.log" "${node_env[@]}" "FLEXKV_SERVER_RECV_PORT=$(node_endpoint "$i")" -- \
      "$PY" -m flexkv_core.distributed --model "$MODEL" "${EXTRA[@]}"
  else
    kv_args=()
    [ -z "$KV_BASE" ] || kv_args=(--kv-events-base-port "$((KV_BASE + i))")
    start_bg "node $i" "$LOG_DIR/node_$i.log" "${node_env[@]}" -- \
      "$HERE/../single_node.sh" --model "$MODEL" --workers 1 --python "$PY" --workdir "$dir" \
      --http-port "$((HTTP_BASE + i))" "${kv_args[@]}" --system-base-port "$((SYSTEM_BASE + i))" \
      --ipc-dir "$dir/ipc" --ssd-root "$dir/ssd" "${NODE_ARGS[@]}" -- "${EXTRA[@]}"
  fi
done

# --- 3. ready: every node's cache serves and sees the other nodes of this run as peers ---------------
# (Counting node keys in Redis would also count nodes of an earlier run whose leases have not run out.)
peers_see_each_other() {
  local endpoints=() i
  for ((i = 0; i < NODES; i++)); do endpoints+=("$(node_endpoint "$i")"); done
  "$PY" - "${endpoints[@]}" <<'PY'
import sys
from flexkv_core.client import CacheClient

views = []
for endpoint in sys.argv[1:]:
    client = CacheClient(endpoint, timeout_s=2)
    try:
        views.append(client.call("distributed"))  # absent until the node has joined the global index
    except Exception:
        sys.exit(1)
    finally:
        client.close()
ids = [view.get("node_id") for view in views]
sys.exit(0 if None not in ids and all(set(ids) - {own} <= set(view.get("peers", []))
                                      for own, view in zip(ids, views)) else 1)
PY
}
wait_for "$NODES node(s) seeing each other as peers" 900 peers_see_each_other
if [ "$CACHE_ONLY" = 0 ]; then
  for ((i = 0; i < NODES; i++)); do
    wait_for "node $i's frontend on port $((HTTP_BASE + i))" 900 frontend_ready "http://127.0.0.1:$((HTTP_BASE + i))" 1
  done
fi
log "ready: $NODES virtual node(s) sharing KV blocks through Redis $REDIS_HOST:$REDIS_PORT"
for ((i = 0; i < NODES; i++)); do
  if [ "$CACHE_ONLY" = 1 ]; then
    log "  node $i: cache $(node_endpoint "$i"), export port $((SERVICE_BASE + i)), engine ports $((TE_BASE + 2 * i))-$((TE_BASE + 2 * i + 1))"
  else
    log "  node $i: http://127.0.0.1:$((HTTP_BASE + i))/v1/chat/completions, export port $((SERVICE_BASE + i)), engine ports $((TE_BASE + 2 * i))-$((TE_BASE + 2 * i + 1))"
  fi
done
log "logs: $LOG_DIR   (Ctrl-C stops everything)"
monitor
