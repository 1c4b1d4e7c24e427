#!/usr/bin/env bash
# One node: Dynamo's KV-routing frontend in front of N vLLM workers with the FlexKV tiered cache.
#
# Does what ../shared/USAGE.md does by hand, in order, and waits for each step:
#   1. optionally etcd and NATS (--with-etcd, --with-nats); without them, file discovery + ZMQ event plane
#   2. `python -m dynamo.frontend --router-mode kv` (router weights passable), until /health answers
#   3. N workers `python -m dynamo.vllm --model M --connector flexkv ...`, each with its own
#      FLEXKV_SERVER_RECV_PORT, SSD directory, KV-events endpoint and system (health) port,
#      until every worker is ready and the frontend lists the model and sees N workers
# then stays in the foreground; Ctrl-C (or SIGTERM) stops everything it started, workers first.
# A process that dies while starting stops everything, with the cause from its log. Once ready, a worker
# that dies is restarted, and the frontend's request migration (--migration-limit, default 3) moves its
# requests to the other workers meanwhile. Everything listens on loopback unless told otherwise.
#
# Capacities come from the environment (FLEXKV_CPU_CACHE_GB, FLEXKV_SSD_CACHE_GB, ...) or from
# FLEXKV_CONFIG_PATH, which may contain {i} for one file per worker. See deploy/README.md.
set -euo pipefail
DEPLOY_NAME="single_node"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'HELP'
Usage: deploy/single_node.sh --model MODEL [options] [-- extra dynamo.vllm arguments]

Workers:
HELP
  worker_options_help
  cat <<'HELP'
Frontend:
  --http-host H, --http-port P    frontend address (default 127.0.0.1:8000; 0.0.0.0 for every interface)
  --migration-limit N        times the frontend may move a request to another worker when its worker
                             dies (default $DYN_MIGRATION_LIMIT or 3; 0 turns migration off)
  --router-host-cache-hit-weight W  credit for prefix blocks in a worker's CPU tier (ours: 1; Dynamo's 0.75)
  --router-disk-cache-hit-weight W  credit for prefix blocks on a worker's SSD (ours: 1; Dynamo's 0.25)
  --router-prefill-load-scale S     weight of prefill work against decode load (ours: 8; Dynamo's 1)
  --router-kv-overlap-score-credit C, --router-temperature T   (ours: 1 and 0, Dynamo's too)
  --frontend-arg ARG         extra frontend argument (repeatable)
Discovery and events:
  --with-etcd                start etcd here (--etcd-port, default 2379; --etcd-peer-port, default 2380)
  --with-nats                start NATS with JetStream here (--nats-port, default 4222)
                             without them: ETCD_ENDPOINTS / NATS_SERVER if set, else file discovery and
                             the ZMQ event plane (no servers needed on one node)
Other:
  --workdir D                logs, SSD directories (default), server data (default /tmp/flexkv_single_node)
  -h, --help                 this text
HELP
}

worker_defaults
HTTP_HOST="127.0.0.1"
HTTP_PORT=8000
MIGRATION_LIMIT="${DYN_MIGRATION_LIMIT:-3}"
FRONTEND_ARGS=("${ROUTER_DEFAULT_ARGS[@]}")  # ours first: options given below override them
WITH_ETCD=0; ETCD_PORT=2379; ETCD_PEER_PORT=2380
WITH_NATS=0; NATS_PORT=4222
WORKDIR=/tmp/flexkv_single_node

while [ "$#" -gt 0 ]; do
  parse_worker_option "$@"
  if [ "$SHIFT_BY" -gt 0 ]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    --http-host) HTTP_HOST="$2"; shift 2 ;;
    --http-port) HTTP_PORT="$2"; shift 2 ;;
    --migration-limit) MIGRATION_LIMIT="$2"; shift 2 ;;
    --router-host-cache-hit-weight|--router-disk-cache-hit-weight|--router-prefill-load-scale|\
    --router-kv-overlap-score-credit|--router-temperature) FRONTEND_ARGS+=("$1" "$2"); shift 2 ;;
    --frontend-arg) FRONTEND_ARGS+=("$2"); shift 2 ;;
    --with-etcd) WITH_ETCD=1; shift ;;
    --etcd-port) ETCD_PORT="$2"; shift 2 ;;
    --etcd-peer-port) ETCD_PEER_PORT="$2"; shift 2 ;;
    --with-nats) WITH_NATS=1; shift ;;
    --nats-port) NATS_PORT="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option '$1' (dynamo.vllm arguments go after --)" ;;
  esac
done

check_worker_options
[[ "$MIGRATION_LIMIT" =~ ^[0-9]+$ ]] || die "--migration-limit must be a number >= 0, not '$MIGRATION_LIMIT'"
LOG_DIR="$WORKDIR/logs"
mkdir -p "$LOG_DIR"
install_traps

# Everything stays on this node: Dynamo's servers listen on loopback unless told otherwise.
for var in DYN_TCP_RPC_HOST DYN_EVENT_PLANE_HOST DYN_TCP_RESPONSE_STREAM_HOST DYN_SYSTEM_HOST; do
  export "$var=${!var:-127.0.0.1}"
done

# --- 1. discovery and event plane -----------------------------------------------------------------
if [ "$WITH_ETCD" = 1 ]; then
  start_etcd 127.0.0.1 "$ETCD_PORT" "$ETCD_PEER_PORT" 127.0.0.1 "$WORKDIR/etcd" "$LOG_DIR/etcd.log"
  export ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
fi
if [ "$WITH_NATS" = 1 ]; then
  start_nats 127.0.0.1 "$NATS_PORT" 127.0.0.1 "$WORKDIR/nats" "$LOG_DIR/nats.log"
  export NATS_SERVER="nats://127.0.0.1:$NATS_PORT"
fi
if [ -n "${ETCD_ENDPOINTS:-}" ]; then
  export DYN_DISCOVERY_BACKEND=etcd
else
  export DYN_DISCOVERY_BACKEND=file DYN_FILE_KV="${DYN_FILE_KV:-$WORKDIR/discovery}"
  rm -rf "$DYN_FILE_KV"  # registrations left by a previous run are stale
fi
if [ -n "${NATS_SERVER:-}" ]; then export DYN_EVENT_PLANE=nats; else export DYN_EVENT_PLANE=zmq; fi
log "discovery: $DYN_DISCOVERY_BACKEND${ETCD_ENDPOINTS:+ ($ETCD_ENDPOINTS)}, event plane: $DYN_EVENT_PLANE${NATS_SERVER:+ ($NATS_SERVER)}"

# --- 2. frontend ----------------------------------------------------------------------------------
FRONTEND_URL="http://127.0.0.1:$HTTP_PORT"
[ "$HTTP_HOST" = "0.0.0.0" ] || [ "$HTTP_HOST" = "127.0.0.1" ] || FRONTEND_URL="http://$HTTP_HOST:$HTTP_PORT"
start_bg frontend "$LOG_DIR/frontend.log" -- "$PY" -m dynamo.frontend --router-mode kv \
  --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" --migration-limit "$MIGRATION_LIMIT" "${FRONTEND_ARGS[@]}"
wait_for "the frontend on $FRONTEND_URL" 120 http_get "$FRONTEND_URL/health"

# --- 3. workers -----------------------------------------------------------------------------------
start_workers
wait_for "$WORKERS worker(s) ready" "$READY_TIMEOUT" workers_ready
wait_for "the frontend listing the model with $WORKERS worker(s)" 120 frontend_ready "$FRONTEND_URL" "$WORKERS"

SERVED="$(http_get "$FRONTEND_URL/v1/models" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p' | head -n 1)"
log "ready: $WORKERS worker(s) behind $FRONTEND_URL (model $SERVED)"
log "try:   curl $FRONTEND_URL/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"$SERVED\", \"messages\": [{\"role\": \"user\", \"content\": \"Tell me a joke.\"}], \"max_tokens\": 30}'"
log "cache: $PY -m flexkv_core.cli status --endpoint ipc://$IPC_DIR/flexkv_server_0"
log "logs:  $LOG_DIR   (Ctrl-C stops everything)"
supervise
monitor
