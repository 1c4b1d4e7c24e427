#!/usr/bin/env bash
# Several nodes: etcd + NATS on one node, the KV-routing frontend on one, FlexKV workers on the others.
#
#   node A:  deploy/multi_node.sh infra                      etcd + NATS (JetStream), reachable at $NODE_IP
#   node B:  deploy/multi_node.sh frontend [options]         dynamo.frontend --router-mode kv
#   node C+: deploy/multi_node.sh workers --model M [...]    N workers `python -m dynamo.vllm --connector flexkv`
#
# (Roles may share a node.) Addresses come from the environment:
#   NODE_IP        this node's address as the other nodes reach it (default: first of `hostname -I`);
#                  everything this script starts listens on it (not on every interface): etcd, NATS, the
#                  frontend's HTTP port (--http-host to change), Dynamo's request/response/event/system servers
#   INFRA_HOST     the infra node's address; ETCD_ENDPOINTS and NATS_SERVER default to
#                  http://$INFRA_HOST:2379 and nats://$INFRA_HOST:4222 (set them to override)
# Each role stays in the foreground and stops what it started on Ctrl-C / SIGTERM. Once ready, a worker
# that dies is restarted; the frontend moves its requests to other workers (--migration-limit, default 3).
# Cross-node KV reuse (FlexKV's distributed tier: Redis, Mooncake) is configured with FLEXKV_* variables
# or FLEXKV_CONFIG_PATH exactly as on one node; see deploy/README.md.
set -euo pipefail
DEPLOY_NAME="multi_node"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'HELP'
Usage: deploy/multi_node.sh ROLE [options] [-- extra dynamo.vllm arguments]

Roles:
  infra      etcd (--etcd-port 2379, --etcd-peer-port 2380) and NATS (--nats-port 4222) on this node,
             listening on $NODE_IP (--listen-host H to change, 0.0.0.0 for every interface)
  frontend   the KV-routing frontend (--http-host H, default $NODE_IP; --http-port 8000;
             --migration-limit N, default $DYN_MIGRATION_LIMIT or 3, 0 = off; --router-host-cache-hit-weight W,
             --router-disk-cache-hit-weight W, --router-prefill-load-scale S, --router-kv-overlap-score-credit C,
             --router-temperature T: ours by default, see deploy/README.md; --frontend-arg ARG ...)
  workers    FlexKV workers on this node (options below)

Environment: NODE_IP (this node), INFRA_HOST (the infra node) or ETCD_ENDPOINTS + NATS_SERVER.

Worker options:
HELP
  worker_options_help
  cat <<'HELP'
Common:
  --python PY                interpreter with flexkv-dynamo installed (default $PYTHON or python)
  --workdir D                logs and data (default /tmp/flexkv_multi_node)
  -h, --help                 this text
HELP
}

ROLE="${1:-}"
case "$ROLE" in
  infra|frontend|workers) shift ;;
  -h|--help|"") usage; [ -n "$ROLE" ] && exit 0; exit 1 ;;
  *) usage >&2; die "unknown role '$ROLE' (infra, frontend or workers)" ;;
esac

worker_defaults
HTTP_HOST=""
HTTP_PORT=8000
LISTEN_HOST=""
MIGRATION_LIMIT="${DYN_MIGRATION_LIMIT:-3}"
FRONTEND_ARGS=("${ROUTER_DEFAULT_ARGS[@]}")  # ours first: options given below override them
ETCD_PORT=2379; ETCD_PEER_PORT=2380
NATS_PORT=4222
WORKDIR=/tmp/flexkv_multi_node

while [ "$#" -gt 0 ]; do
  if [ "$ROLE" = workers ]; then
    parse_worker_option "$@"
    if [ "$SHIFT_BY" -gt 0 ]; then shift "$SHIFT_BY"; continue; fi
  fi
  case "$1" in
    --http-host) HTTP_HOST="$2"; shift 2 ;;
    --http-port) HTTP_PORT="$2"; shift 2 ;;
    --listen-host) LISTEN_HOST="$2"; shift 2 ;;
    --migration-limit) MIGRATION_LIMIT="$2"; shift 2 ;;
    --router-host-cache-hit-weight|--router-disk-cache-hit-weight|--router-prefill-load-scale|\
    --router-kv-overlap-score-credit|--router-temperature) FRONTEND_ARGS+=("$1" "$2"); shift 2 ;;
    --frontend-arg) FRONTEND_ARGS+=("$2"); shift 2 ;;
    --etcd-port) ETCD_PORT="$2"; shift 2 ;;
    --etcd-peer-port) ETCD_PEER_PORT="$2"; shift 2 ;;
    --nats-port) NATS_PORT="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option '$1' for role $ROLE" ;;
  esac
done

NODE_IP="${NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
[ -n "$NODE_IP" ] || die "cannot tell this node's address: set NODE_IP"
[[ "$MIGRATION_LIMIT" =~ ^[0-9]+$ ]] || die "--migration-limit must be a number >= 0, not '$MIGRATION_LIMIT'"
HTTP_HOST="${HTTP_HOST:-$NODE_IP}"
LISTEN_HOST="${LISTEN_HOST:-$NODE_IP}"
# Where this node reaches a server that listens on HOST (every interface: loopback).
local_address() { if [ "$1" = 0.0.0.0 ]; then echo 127.0.0.1; else echo "$1"; fi; }
LOG_DIR="$WORKDIR/logs"
mkdir -p "$LOG_DIR"

# Where the shared servers are (not needed by the infra role itself).
infra_addresses() {
  if [ -z "${ETCD_ENDPOINTS:-}" ] || [ -z "${NATS_SERVER:-}" ]; then
    [ -n "${INFRA_HOST:-}" ] || die "set INFRA_HOST (the infra node) or both ETCD_ENDPOINTS and NATS_SERVER"
  fi
  export ETCD_ENDPOINTS="${ETCD_ENDPOINTS:-http://$INFRA_HOST:$ETCD_PORT}"
  export NATS_SERVER="${NATS_SERVER:-nats://$INFRA_HOST:$NATS_PORT}"
  export DYN_DISCOVERY_BACKEND=etcd DYN_EVENT_PLANE=nats
  # Dynamo's servers must be reachable from the other nodes.
  for var in DYN_TCP_RPC_HOST DYN_EVENT_PLANE_HOST DYN_TCP_RESPONSE_STREAM_HOST; do
    export "$var=${!var:-$NODE_IP}"
  done
  log "node $NODE_IP; etcd $ETCD_ENDPOINTS; NATS $NATS_SERVER"
  local etcd_url="${ETCD_ENDPOINTS%%,*}"
  wait_for "etcd at $etcd_url" 120 http_get "$etcd_url/health"
  local nats_hostport="${NATS_SERVER#nats://}"
  nats_hostport="${nats_hostport%%,*}"
  wait_for "NATS at $nats_hostport" 120 tcp_open "${nats_hostport%:*}" "${nats_hostport##*:}"
}

install_traps
case "$ROLE" in
  infra)
    start_etcd "$LISTEN_HOST" "$ETCD_PORT" "$ETCD_PEER_PORT" "$NODE_IP" "$WORKDIR/etcd" "$LOG_DIR/etcd.log"
    start_nats "$LISTEN_HOST" "$NATS_PORT" "$NODE_IP" "$WORKDIR/nats" "$LOG_DIR/nats.log"
    log "ready. On the other nodes: export INFRA_HOST=$NODE_IP   (or ETCD_ENDPOINTS=http://$NODE_IP:$ETCD_PORT NATS_SERVER=nats://$NODE_IP:$NATS_PORT)"
    ;;
  frontend)
    check_python
    infra_addresses
    start_bg frontend "$LOG_DIR/frontend.log" -- "$PY" -m dynamo.frontend --router-mode kv \
      --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" --migration-limit "$MIGRATION_LIMIT" "${FRONTEND_ARGS[@]}"
    url="http://$(local_address "$HTTP_HOST"):$HTTP_PORT"
    wait_for "the frontend on $url" 120 http_get "$url/health"
    log "ready: $url (workers registering anywhere in the cluster show up in /health)"
    ;;
  workers)
    check_worker_options
    infra_addresses
    export DYN_SYSTEM_HOST="${DYN_SYSTEM_HOST:-$NODE_IP}"  # health probes from other nodes
    export FLEXKV_NODE_ADDR="${FLEXKV_NODE_ADDR:-$NODE_IP}"  # peers and Prometheus reach the cache here
    start_workers
    wait_for "$WORKERS worker(s) ready" "$READY_TIMEOUT" workers_ready
    log "ready: $WORKERS worker(s) on $NODE_IP; cache status: $PY -m flexkv_core.cli status --endpoint ipc://$IPC_DIR/flexkv_server_0"
    supervise
    ;;
esac
log "logs: $LOG_DIR   (Ctrl-C stops everything this role started)"
monitor
