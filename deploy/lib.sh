# Shared by deploy/single_node.sh and deploy/multi_node.sh (sourced, not run).
#
# Every long-running process is started in its own session (setsid), so its pid is also its process-group
# id: stopping it (TERM to the group, KILL after a grace period) also stops what it spawned (vLLM's
# engine core, TP workers). `stop_all` stops them in the reverse order of start, and is installed as the
# EXIT/INT/TERM trap by `install_traps`.

# --- logging -----------------------------------------------------------------------------------------
log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${DEPLOY_NAME:-deploy}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes ---------------------------------------------------------------------------------------
PIDS=()    # started processes, in start order
NAMES=()   # their names
LOGS=()    # their log files
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
STOPPING=0

# start_bg NAME LOGFILE [VAR=VALUE ...] -- CMD ARGS...
# Starts CMD in a new session with the given extra environment, output to LOGFILE.
start_bg() {
  local name="$1" logfile="$2"; shift 2
  local envs=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  : >"$logfile"
  # `env` applies the per-process variables; setsid makes the process a session and group leader.
  setsid env "${envs[@]}" "$@" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  PIDS+=("$pid"); NAMES+=("$name"); LOGS+=("$logfile")
  log "started $name (pid $pid), log: $logfile"
}

# The process group of a pid we started (its own pid: setsid did not fork, we were not a group leader).
_group_of() { ps -o pgid= -p "$1" 2>/dev/null | tr -d ' ' || true; }

_signal_group() {  # SIG PID
  local pgid; pgid="$(_group_of "$2")"
  if [ -n "$pgid" ] && [ "$pgid" = "$2" ]; then kill "-$1" -- "-$pgid" 2>/dev/null || true
  else kill "-$1" "$2" 2>/dev/null || true; fi
}

is_alive() { kill -0 "$1" 2>/dev/null; }

stop_all() {
  [ "$STOPPING" = 1 ] && return 0
  STOPPING=1
  trap '' INT TERM  # a second Ctrl-C must not cut the clean-up short (stragglers are killed anyway)
  set +e  # and neither may a failing probe of an already-gone process
  local i pid deadline
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid="${PIDS[$i]}"
    is_alive "$pid" || continue
    log "stopping ${NAMES[$i]} (pid $pid)"
    _signal_group TERM "$pid"
    deadline=$((SECONDS + STOP_TIMEOUT))
    while is_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    if is_alive "$pid"; then
      log "${NAMES[$i]} did not stop within ${STOP_TIMEOUT}s: killing its process group"
    fi
    _signal_group KILL "$pid"  # the leader if still there, and children that outlived it
    wait "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))  # until the whole group is gone (killed children take a moment)
    while kill -0 -- "-$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  done
  [ "${#LOGS[@]}" -gt 0 ] && log "stopped; logs: $(dirname "${LOGS[0]}")"
  return 0
}

install_traps() {
  trap 'stop_all' EXIT
  trap 'log "interrupted"; exit 130' INT
  trap 'log "terminated"; exit 143' TERM
}

# Exit (stopping everything) if any started process has died; print the tail of its log.
check_alive() {
  local i
  for i in "${!PIDS[@]}"; do
    if ! is_alive "${PIDS[$i]}"; then
      log "${NAMES[$i]} (pid ${PIDS[$i]}) exited; last lines of ${LOGS[$i]}:"
      tail -n 30 "${LOGS[$i]}" >&2
      exit 1
    fi
  done
}

# Block until a started process dies (then exit 1) or a signal arrives (then the traps run).
monitor() {
  while true; do
    check_alive
    sleep 2 &
    wait $! 2>/dev/null || true  # `wait` returns at once when a trapped signal arrives
  done
}

# --- probes ------------------------------------------------------------------------------------------
http_get() {  # URL -> body on stdout, non-zero status when unreachable or not 2xx
  if command -v curl >/dev/null 2>&1; then
    curl -sf --max-time 5 "$1"
  else
    "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" 2>/dev/null
  fi
}

tcp_open() {  # HOST PORT
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_for DESCRIPTION TIMEOUT_S COMMAND...: poll COMMAND every second; die (after stopping) on timeout.
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  log "waiting for $what (up to ${timeout}s)"
  until "$@" >/dev/null; do
    check_alive
    [ "$SECONDS" -ge "$deadline" ] && die "timed out after ${timeout}s waiting for $what"
    sleep 1
  done
  log "$what: ok"
}

# --- infrastructure ----------------------------------------------------------------------------------
start_etcd() {  # CLIENT_HOST CLIENT_PORT PEER_PORT ADVERTISE_HOST DATA_DIR LOG
  local host="$1" port="$2" peer="$3" adv="$4" data="$5" logfile="$6"
  command -v etcd >/dev/null || die "etcd not found on PATH (Debian: apt-get install etcd-server)"
  mkdir -p "$data"
  start_bg etcd "$logfile" -- etcd --name "flexkv-etcd" --data-dir "$data" \
    --listen-client-urls "http://$host:$port" --advertise-client-urls "http://$adv:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "flexkv-etcd=http://127.0.0.1:$peer"
  wait_for "etcd on $adv:$port" 60 http_get "http://$adv:$port/health"
}

start_nats() {  # HOST PORT ADVERTISE_HOST STORE_DIR LOG
  local host="$1" port="$2" adv="$3" store="$4" logfile="$5"
  command -v nats-server >/dev/null || die "nats-server not found on PATH (Debian: apt-get install nats-server)"
  mkdir -p "$store"
  start_bg nats "$logfile" -- nats-server -js -a "$host" -p "$port" --store_dir "$store"
  wait_for "NATS on $adv:$port" 60 tcp_open "$adv" "$port"
}

# --- the frontend's router knobs -------------------------------------------------------------------
# What our deployments pass to `dynamo.frontend --router-mode kv` before any --router-* option given on the
# command line (the last one wins). Chosen with the trace-replay sweep (bench/README.md, "Router knobs we
# ship"); tests/test_trace_replay.py checks that bench/replay/router.py's SHIPPED_KNOBS says the same.
ROUTER_DEFAULT_ARGS=(--router-host-cache-hit-weight 1 --router-disk-cache-hit-weight 1 --router-prefill-load-scale 8)

# --- the worker command ------------------------------------------------------------------------------
# Chooses how to start a FlexKV worker: `python -m dynamo.vllm ... --connector flexkv` needs the hook
# (`python -m flexkv_dynamo.dynamo_hook install`); `python -m flexkv_dynamo.vllm` works without it.
pick_launcher() {  # auto|dynamo|flexkv -> module name on stdout
  case "$1" in
    dynamo) echo dynamo.vllm ;;
    flexkv) echo flexkv_dynamo.vllm ;;
    auto)
      if "$PY" -m flexkv_dynamo.dynamo_hook status 2>/dev/null | grep -q "installed and active"; then
        echo dynamo.vllm
      else
        echo flexkv_dynamo.vllm
      fi ;;
    *) die "--launcher must be auto, dynamo or flexkv, not '$1'" ;;
  esac
}

kv_events_json() {  # ENDPOINT
  printf '{"publisher":"zmq","topic":"kv-events","endpoint":"%s","enable_kv_cache_events":true}' "$1"
}

# FLEXKV_CONFIG_PATH may name one file per worker with {i} in it (e.g. /etc/flexkv/worker_{i}.yaml).
config_path_for() {  # WORKER_INDEX
  [ -n "${FLEXKV_CONFIG_PATH:-}" ] || return 0
  printf '%s' "${FLEXKV_CONFIG_PATH//\{i\}/$1}"
}

# Count the generate endpoints the frontend sees (one per registered worker).
registered_workers() {  # FRONTEND_URL
  { http_get "$1/health" || true; } | grep -o '"endpoint":"generate"' | wc -l || true
}

frontend_ready() {  # FRONTEND_URL WORKERS
  local n
  n="$(registered_workers "$1")"
  [ "${n:-0}" -ge "$2" ] && { http_get "$1/v1/models" || true; } | grep -q '"id"'
}

# --- options shared by the scripts that start workers ------------------------------------------------
worker_defaults() {
  MODEL="${MODEL:-}"
  WORKERS="${NUM_WORKERS:-1}"
  TP=1
  GPUS_PER_WORKER=""
  KV_BASE=20080
  SYSTEM_BASE=18081
  IPC_DIR=/tmp
  SSD_ROOT=""
  LAUNCHER=auto
  PY="${PYTHON:-python}"
  READY_TIMEOUT=900
  EXTRA=()
}

worker_options_help() {
  cat <<'HELP'
  --model M                  model path or name (or $MODEL)
  --workers N                number of workers on this node (default $NUM_WORKERS or 1)
  --tp N                     tensor-parallel size per worker (default 1)
  --gpus-per-worker G        GPUs per worker for CUDA_VISIBLE_DEVICES (default: --tp when nvidia-smi
                             lists GPUs, else 0 = leave CUDA_VISIBLE_DEVICES alone)
  --kv-events-base-port B    worker i publishes KV events on tcp://*:B+i (default 20080)
  --system-base-port S       worker i serves /health on S+i (default 18081; must stay below 32768)
  --ipc-dir D                worker i's cache service is ipc://D/flexkv_server_i (default /tmp)
  --ssd-root D               worker i's SSD directory is D/worker_i (default $WORKDIR/ssd)
  --launcher auto|dynamo|flexkv   `python -m dynamo.vllm --connector flexkv` (needs the hook) or
                             `python -m flexkv_dynamo.vllm` (default auto: the hook when installed)
  --python PY                interpreter with flexkv-dynamo installed (default $PYTHON or python)
  --ready-timeout S          seconds to wait for the workers (default 900)
HELP
}

# parse_worker_option ARGS...: consume one worker option; sets SHIFT_BY (0 when $1 is not one).
parse_worker_option() {
  SHIFT_BY=2
  case "$1" in
    --model) MODEL="${2:-}" ;;
    --workers) WORKERS="${2:-}" ;;
    --tp) TP="${2:-}" ;;
    --gpus-per-worker) GPUS_PER_WORKER="${2:-}" ;;
    --kv-events-base-port) KV_BASE="${2:-}" ;;
    --system-base-port) SYSTEM_BASE="${2:-}" ;;
    --ipc-dir) IPC_DIR="${2:-}" ;;
    --ssd-root) SSD_ROOT="${2:-}" ;;
    --launcher) LAUNCHER="${2:-}" ;;
    --python) PY="${2:-}" ;;
    --ready-timeout) READY_TIMEOUT="${2:-}" ;;
    *) SHIFT_BY=0 ;;
  esac
  if [ "$SHIFT_BY" = 2 ] && [ "$#" -lt 2 ]; then die "$1 needs a value"; fi
  return 0
}

check_python() {
  command -v "$PY" >/dev/null || die "python interpreter '$PY' not found (use --python)"
  "$PY" -c 'import flexkv_dynamo, dynamo.vllm' 2>/dev/null || die "$PY cannot import flexkv_dynamo and dynamo.vllm"
}

check_worker_options() {
  [ -n "$MODEL" ] || die "--model is required"
  [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, not '$WORKERS'"
  [[ "$TP" =~ ^[1-9][0-9]*$ ]] || die "--tp must be a positive integer, not '$TP'"
  [ $((SYSTEM_BASE + WORKERS - 1)) -lt 32768 ] || die "--system-base-port: Dynamo needs system ports below 32768"
  check_python
  SSD_ROOT="${SSD_ROOT:-$WORKDIR/ssd}"
  if [ -z "$GPUS_PER_WORKER" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPUS_PER_WORKER="$TP"; else GPUS_PER_WORKER=0; fi
  fi
}

# start_workers: WORKERS workers of MODEL, each with its own cache service endpoint, SSD directory,
# KV-events endpoint and system port; capacities and every other FLEXKV_* come from the environment.
start_workers() {
  local module i cfg worker_env
  module="$(pick_launcher "$LAUNCHER")"
  [ "$module" = dynamo.vllm ] || log "the dynamo.vllm hook is not installed: starting workers with python -m $module"
  export DYNAMO_USE_FLEXKV="${DYNAMO_USE_FLEXKV:-1}"
  for ((i = 0; i < WORKERS; i++)); do
    worker_env=(
      "FLEXKV_SERVER_RECV_PORT=ipc://$IPC_DIR/flexkv_server_$i"
      "FLEXKV_SSD_CACHE_DIR=$SSD_ROOT/worker_$i"
      "DYN_SYSTEM_PORT=$((SYSTEM_BASE + i))"
    )
    cfg="$(config_path_for "$i")"
    [ -n "$cfg" ] && worker_env+=("FLEXKV_CONFIG_PATH=$cfg")
    if [ "$GPUS_PER_WORKER" -gt 0 ]; then
      worker_env+=("CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER_WORKER)) $((i * GPUS_PER_WORKER + GPUS_PER_WORKER - 1)))")
    fi
    mkdir -p "$SSD_ROOT/worker_$i"
    start_bg "worker $i" "$LOG_DIR/worker_$i.log" "${worker_env[@]}" -- \
      "$PY" -m "$module" --model "$MODEL" --tensor-parallel-size "$TP" --connector flexkv \
      --kv-events-config "$(kv_events_json "tcp://*:$((KV_BASE + i))")" "${EXTRA[@]}"
  done
}

# All workers of this node answer "ready" on their system port.
workers_ready() {
  local i host="${DYN_SYSTEM_HOST:-127.0.0.1}"
  [ "$host" = "0.0.0.0" ] && host=127.0.0.1
  for ((i = 0; i < WORKERS; i++)); do
    { http_get "http://$host:$((SYSTEM_BASE + i))/health" || true; } | grep -q '"status":"ready"' || return 1
  done
}
