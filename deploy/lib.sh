# Shared by deploy/single_node.sh and deploy/multi_node.sh (sourced, not run).
#
# Every long-running process is started in its own session (setsid), so its pid is also its process-group
# id: stopping it (TERM to the group, KILL after a grace period) also stops what it spawned (vLLM's
# engine core, TP workers). `stop_all` stops them in the reverse order of start, and is installed as the
# EXIT/INT/TERM trap by `install_traps`.
#
# Until everything is up, a process that dies stops everything (the script exits 1 and prints the cause
# from its log). Once the scripts call `supervise`, a dead worker is restarted instead (the frontend's
# request migration moves its streams to the others meanwhile), unless it died within MIN_UPTIME seconds
# of its start (a crash loop: everything stops).

# --- logging -----------------------------------------------------------------------------------------
log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${DEPLOY_NAME:-deploy}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes ---------------------------------------------------------------------------------------
PIDS=()      # started processes, in start order ("" once a dead one was replaced by its restart)
NAMES=()     # their names
LOGS=()      # their log files
RESTARTS=()  # the command that starts each again once `supervise` is on ("" = none: its death is fatal)
STARTED=()   # $SECONDS when each was started
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
MIN_UPTIME="${MIN_UPTIME:-60}"
STOPPING=0
SUPERVISING=0
RESTART_WITH=""  # set around a start_bg call: how to start that process again
RESTARTING=0

# start_bg NAME LOGFILE [VAR=VALUE ...] -- CMD ARGS...
# Starts CMD in a new session with the given extra environment, output appended to LOGFILE.
start_bg() {
  local name="$1" logfile="$2"; shift 2
  local envs=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  [ "$RESTARTING" = 1 ] || : >"$logfile"  # a restart keeps the log of the run that died
  # `env` applies the per-process variables; setsid makes the process a session and group leader.
  setsid env "${envs[@]}" "$@" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  PIDS+=("$pid"); NAMES+=("$name"); LOGS+=("$logfile"); RESTARTS+=("$RESTART_WITH"); STARTED+=("$SECONDS")
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
    [ -n "$pid" ] && is_alive "$pid" || continue
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

# The line of a log that says why the process failed: our launchers' one-line error, else the exception
# that killed vLLM's engine core (the last one before vLLM's "Engine core initialization failed", which
# only points at it), else the last exception in the log.
failure_cause() {  # LOGFILE
  awk '
    /^(dynamo\.vllm|flexkv_dynamo\.vllm): error: / { ours = $0 }
    match($0, /([A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_][A-Za-z0-9_]*(Error|Exception|InUse|Interrupt): .*/) {
      found = substr($0, RSTART, RLENGTH)
      if (found ~ /Engine core initialization failed/) { if (root == "") root = last }
      else last = found
    }
    END { if (ours != "") print ours; else if (root != "") print root; else print last }
  ' "$1" 2>/dev/null
}

_report_death() {  # INDEX STATUS
  local i="$1" cause
  cause="$(failure_cause "${LOGS[$i]}")"
  log "${NAMES[$i]} (pid ${PIDS[$i]}) exited with status $2${cause:+: $cause}"
  log "last lines of ${LOGS[$i]}:"
  tail -n 30 "${LOGS[$i]}" >&2
}

# After a started process has died: exit (stopping everything), or restart it once `supervise` is on and
# it has a restart command and had been up for MIN_UPTIME seconds.
check_alive() {
  local i pid status deadline
  for i in "${!PIDS[@]}"; do
    pid="${PIDS[$i]}"
    [ -n "$pid" ] && ! is_alive "$pid" || continue
    status=0; wait "$pid" 2>/dev/null || status=$?
    _report_death "$i" "$status"
    if [ "$SUPERVISING" = 0 ] || [ -z "${RESTARTS[$i]}" ]; then exit 1; fi
    if [ $((SECONDS - STARTED[i])) -lt "$MIN_UPTIME" ]; then
      log "${NAMES[$i]} died within ${MIN_UPTIME}s of its start: not restarting it"
      exit 1
    fi
    # What it left behind (vLLM's engine core holds the cache's endpoint) must go before it starts again.
    # Its group id is its pid (setsid), which is gone: signal the group directly.
    kill -KILL -- "-$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while kill -0 -- "-$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    PIDS[i]=""
    log "restarting ${NAMES[$i]}"
    RESTART_WITH="${RESTARTS[$i]}" RESTARTING=1
    eval "${RESTARTS[$i]}"
    RESTART_WITH="" RESTARTING=0
  done
}

# From now on a dead worker is restarted instead of stopping everything.
supervise() { SUPERVISING=1; }

# Block until a signal arrives (then the traps run), or a started process dies and is not restarted
# (then exit 1; see check_alive).
monitor() {
  while true; do
    check_alive
    [ "${#AWAITING[@]}" -eq 0 ] || report_restarted_ready
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
  KV_BASE=""
  METRICS_BASE=""
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
  --kv-events-base-port B    worker i publishes KV events on tcp://*:B+i, every interface (default: on
                             ipc://<ipc-dir>/kv_events_i, which only this node reaches)
  --system-base-port S       worker i serves /health on S+i (default 18081; must stay below 32768)
  --metrics-base-port M      worker i serves its cache's flexkv_* metrics on M+i (FLEXKV_METRICS_PORT;
                             default: not served; vLLM's and Dynamo's are on the system port)
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
    --metrics-base-port) METRICS_BASE="${2:-}" ;;
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
  WORKER_MODULE="$(pick_launcher "$LAUNCHER")"
  [ "$WORKER_MODULE" = dynamo.vllm ] || log "the dynamo.vllm hook is not installed: starting workers with python -m $WORKER_MODULE"
  export DYNAMO_USE_FLEXKV="${DYNAMO_USE_FLEXKV:-1}"
  local i
  for ((i = 0; i < WORKERS; i++)); do
    RESTART_WITH="restart_worker $i" start_worker "$i"
  done
}

# Where worker i publishes KV events for Dynamo's relay (a process of the same worker): an ipc socket by
# default, which only this node can reach; tcp://*:B+i (every interface) when --kv-events-base-port asks.
kv_events_endpoint() {  # I
  if [ -n "$KV_BASE" ]; then printf 'tcp://*:%s' "$(($KV_BASE + $1))"; else printf 'ipc://%s/kv_events_%s' "$IPC_DIR" "$1"; fi
}

start_worker() {  # I
  local i="$1" cfg worker_env
  worker_env=(
    "FLEXKV_SERVER_RECV_PORT=ipc://$IPC_DIR/flexkv_server_$i"
    "FLEXKV_SSD_CACHE_DIR=$SSD_ROOT/worker_$i"
    "DYN_SYSTEM_PORT=$((SYSTEM_BASE + i))"
  )
  cfg="$(config_path_for "$i")"
  [ -n "$cfg" ] && worker_env+=("FLEXKV_CONFIG_PATH=$cfg")
  [ -z "$METRICS_BASE" ] || worker_env+=("FLEXKV_METRICS_PORT=$((METRICS_BASE + i))")
  if [ "$GPUS_PER_WORKER" -gt 0 ]; then
    worker_env+=("CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER_WORKER)) $((i * GPUS_PER_WORKER + GPUS_PER_WORKER - 1)))")
  fi
  mkdir -p "$SSD_ROOT/worker_$i"
  start_bg "worker $i" "$LOG_DIR/worker_$i.log" "${worker_env[@]}" -- \
    "$PY" -m "$WORKER_MODULE" --model "$MODEL" --tensor-parallel-size "$TP" --connector flexkv \
    --kv-events-config "$(kv_events_json "$(kv_events_endpoint "$i")")" "${EXTRA[@]}"
}

AWAITING=()  # workers restarted and not ready yet: "I:START_SECONDS"

restart_worker() {  # I
  start_worker "$1"
  AWAITING+=("$1:$SECONDS")
}

worker_ready() {  # I
  local host="${DYN_SYSTEM_HOST:-127.0.0.1}"
  [ "$host" = "0.0.0.0" ] && host=127.0.0.1
  { http_get "http://$host:$((SYSTEM_BASE + $1))/health" || true; } | grep -q '"status":"ready"'
}

# All workers of this node answer "ready" on their system port.
workers_ready() {
  local i
  for ((i = 0; i < WORKERS; i++)); do worker_ready "$i" || return 1; done
}

# Say when a restarted worker serves again (called by `monitor`).
report_restarted_ready() {
  local entry left=()
  for entry in "${AWAITING[@]}"; do
    if worker_ready "${entry%%:*}"; then
      log "worker ${entry%%:*} ready again, $((SECONDS - ${entry##*:}))s after its restart"
    else
      left+=("$entry")
    fi
  done
  AWAITING=("${left[@]}")
}
