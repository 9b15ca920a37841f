#!/usr/bin/env bash
# Whisper TorchServe: one entry point, the same in the container and on a plain machine.
#
#   ./serve.sh               install what is missing, get the model, build whisper.mar,
#                            start TorchServe and stay in the foreground (as in the container)
#   ./serve.sh --background  the same, but return once /ping is healthy
#   ./serve.sh --stop        stop the TorchServe started from this run directory
#   ./serve.sh --install     only install (.venv with pinned requirements, ffmpeg, Java)
#   ./serve.sh --prepare     install, get the model and build whisper.mar; do not start
#   ./serve.sh --status      print whether it runs and where
#   --openai                 with a start: also run nginx in front, mapping OpenAI's
#                            POST /v1/audio/transcriptions to /predictions/whisper
#
# Environment (all optional):
#   WHISPER_MODEL        tiny.en | base | small ...            (default: base)
#   WHISPER_DEVICE       auto | gpu | cpu                      (default: auto)
#   WHISPER_WORKERS, WHISPER_WINDOW_BUDGET, WHISPER_MAX_INFLIGHT_AUDIO_S, ...  model-config overrides (handler/settings.py)
#   TS_INFERENCE_ADDRESS, TS_MANAGEMENT_ADDRESS, TS_METRICS_ADDRESS   move the ports
#   WHISPER_VENV         virtual environment to use/create     (default: ./.venv)
#   WHISPER_RUN_DIR      pid file and TorchServe temp files    (default: ./.run)
#   WHISPER_LOG_DIR      TorchServe logs                       (default: ./logs)
#   WHISPER_MODEL_STORE  where whisper.mar is built            (default: ./model-store)
#   WHISPER_HEALTH_TIMEOUT  seconds to wait for /ping          (default: 600)
#   WHISPER_OPENAI_LISTEN   where the OpenAI-compatible proxy listens (default: 0.0.0.0:8000)
#   WHISPER_DRAIN_TIMEOUT_S  seconds a stop waits for requests in flight (default: 300)
#   WHISPER_TORCH_INDEX_URL  --install: take torch from this index (another CUDA build, or CPU)
#
# Stopping drains: SIGTERM or Ctrl-C (and --stop) makes /ping answer 503 Draining and new
# requests 503 draining, waits until the requests in flight are answered (at most
# WHISPER_DRAIN_TIMEOUT_S), then stops TorchServe and exits 0; a second signal stops at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

MODEL="${WHISPER_MODEL:-base}"
VENV="${WHISPER_VENV:-$ROOT/.venv}"
RUN_DIR="${WHISPER_RUN_DIR:-$ROOT/.run}"
LOG_DIR="${WHISPER_LOG_DIR:-$ROOT/logs}"
MODEL_STORE="${WHISPER_MODEL_STORE:-$ROOT/model-store}"
TS_CONFIG="$ROOT/config/config.properties"
HEALTH_TIMEOUT="${WHISPER_HEALTH_TIMEOUT:-600}"
DRAIN_TIMEOUT="${WHISPER_DRAIN_TIMEOUT_S:-300}"
DRAIN_DIR="$RUN_DIR/drain"  # serve.sh marks "draining" here; each worker reports its requests in flight
PLUGINS_DIR="$MODEL_STORE/plugins"
PYTHON_BIN="${PYTHON:-python3}"

log() { printf '[serve.sh] %s\n' "$*" >&2; }
die() { printf '[serve.sh] error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

# The address TorchServe will use: the environment wins (enable_envvars_config=true),
# then config.properties.
ts_address() {  # $1 = inference|management|metrics
  local key="${1}_address" env_name
  env_name="TS_$(echo "$key" | tr '[:lower:]' '[:upper:]')"
  if [ -n "${!env_name:-}" ]; then
    echo "${!env_name}"
  else
    sed -n "s/^${key}=//p" "$TS_CONFIG" | tail -n 1
  fi
}

# 0.0.0.0 is where TorchServe listens, not where a client connects.
local_url() { echo "$1" | sed 's#//0\.0\.0\.0#//127.0.0.1#'; }

install_system_packages() {
  local missing=()
  [ "$OPENAI" = 1 ] && ! command -v nginx >/dev/null 2>&1 && ! [ -x /usr/sbin/nginx ] && missing+=(nginx-light)
  command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
  # the JDK: TorchServe runs on Java 17, and javac builds the /ping plugin (config/ping-plugin)
  command -v java >/dev/null 2>&1 && command -v javac >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
  command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    for pkg in "${missing[@]}"; do
      case "$pkg" in
        ffmpeg) log "warning: ffmpeg not found (m4a, webm, opus... uploads will be refused); install it, e.g. apt-get install ffmpeg" ;;
        curl|ca-certificates) die "curl is required (health checks); install it" ;;
        nginx-light) die "nginx is required for --openai; install it, e.g. apt-get install nginx-light" ;;
        *) command -v java >/dev/null 2>&1 \
             && log "warning: javac not found: /ping will not report draining (install openjdk-17-jdk-headless)" \
             || die "Java 17 is required by TorchServe; install it, e.g. apt-get install openjdk-17-jdk-headless" ;;
      esac
    done
  fi
}

install_python_packages() {
  # Reinstall only when requirements.txt changed since the last install into this venv.
  local stamp="$VENV/.requirements.sha256" want
  want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
  fi
  log "installing pinned requirements into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  if [ -n "${WHISPER_TORCH_INDEX_URL:-}" ]; then
    # another build of the pinned torch (another CUDA, or CPU only) from the index named
    log "torch from $WHISPER_TORCH_INDEX_URL"
    "$VENV/bin/python" -m pip install --quiet --index-url "$WHISPER_TORCH_INDEX_URL" \
      "$(grep -E '^torch==' "$ROOT/requirements.txt")"
  fi
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  echo "$want" > "$stamp"
}

do_install() {
  install_system_packages
  install_python_packages
}

do_prepare() {
  do_install
  export PATH="$VENV/bin:$PATH"
  log "model: $MODEL"
  python "$ROOT/scripts/download_model.py" --model "$MODEL" --output-dir "$ROOT/whisper-models"
  WHISPER_MODEL="$MODEL" WHISPER_MODEL_STORE="$MODEL_STORE" \
    "$ROOT/model-archiver/create_model_archive.sh"
  build_ping_plugin
}

# The /ping endpoint that answers 503 Draining while the server drains (config/ping-plugin),
# compiled against this TorchServe's own jar; rebuilt when its source changes.
build_ping_plugin() {
  local src="$ROOT/config/ping-plugin" jar="$PLUGINS_DIR/whisper-ping.jar" stamp want build
  stamp="$PLUGINS_DIR/.whisper-ping.sha256"
  want="$(cat "$src"/org/whispertorchserve/*.java "$src"/META-INF/services/* | sha256sum | cut -d' ' -f1)"
  [ -f "$jar" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  if ! command -v javac >/dev/null 2>&1; then
    log "warning: javac not found: /ping will not report draining"
    return 0
  fi
  mkdir -p "$PLUGINS_DIR"
  build="$(mktemp -d)"
  javac -nowarn -d "$build" -cp "$("$VENV/bin/python" -c 'import ts, os; print(os.path.join(os.path.dirname(ts.__file__), "frontend", "model-server.jar"))')" \
    "$src"/org/whispertorchserve/*.java
  cp -r "$src/META-INF" "$build/"
  (cd "$build" && jar cf "$jar.tmp" .) && mv -f "$jar.tmp" "$jar"
  rm -rf "$build"
  echo "$want" > "$stamp"
  log "built $jar"
}

ts_env() {
  # TorchServe keeps its pid file in the temp dir: one run dir, one instance.
  mkdir -p "$RUN_DIR/tmp" "$LOG_DIR"
  export TMPDIR="$RUN_DIR/tmp" TEMP="$RUN_DIR/tmp"
  export LOG_LOCATION="$LOG_DIR" METRICS_LOCATION="$LOG_DIR"
  # The handler's custom metrics are declared beside TorchServe's own.
  export TS_METRICS_CONFIG="${TS_METRICS_CONFIG:-$ROOT/config/metrics.yaml}"
  export PATH="$VENV/bin:$PATH"
  export WHISPER_DRAIN_DIR="$DRAIN_DIR"  # the workers and the /ping plugin look here
}

# --- draining -------------------------------------------------------------------------

frontend_pid() { cat "$RUN_DIR/tmp/.model_server.pid" 2>/dev/null || true; }

# Processes read from /proc (slim images have no procps): "pid ppid sid" per line.
processes() {
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    line="$(cat "$stat" 2>/dev/null)" || continue
    fields="${line##*) }"  # after "pid (comm) ": state ppid pgrp session ...
    # shellcheck disable=SC2086
    set -- $fields
    echo "${stat//[^0-9]/} $2 $4"
  done
}

session_of() { processes | awk -v pid="$1" '$1 == pid { print $3 }'; }
session_pids() { processes | awk -v sid="$1" '$3 == sid { print $1 }'; }

# The frontend's model workers (its children running ts/model_service_worker.py).
worker_pids() {
  local pid
  for pid in $(processes | awk -v ppid="$1" '$2 == ppid { print $1 }'); do
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q model_service_worker && echo "$pid"
  done
  return 0
}

start_drain() {
  mkdir -p "$DRAIN_DIR"
  : > "$DRAIN_DIR/draining"
  log "draining: /ping answers 503, new requests get 503 draining; waiting up to ${DRAIN_TIMEOUT}s for the requests in flight"
}

# Every worker of the frontend has seen the mark and has nothing in flight (each writes
# its count to worker-<pid>; handler/drain.py).
workers_drained() {
  local frontend worker count
  frontend="$(frontend_pid)"
  [ -n "$frontend" ] || return 0
  for worker in $(worker_pids "$frontend"); do
    count="$(cat "$DRAIN_DIR/worker-$worker" 2>/dev/null || echo unknown)"
    [ "$count" = 0 ] || return 1
  done
  return 0
}

# Drain (bounded), unless a second signal asks to stop at once.
drain() {
  local deadline=$(( $(date +%s) + DRAIN_TIMEOUT ))
  start_drain
  while [ "$SIGNALS" -lt 2 ]; do
    if workers_drained; then log "drained: nothing in flight"; return 0; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then log "drain bound (${DRAIN_TIMEOUT}s) reached: stopping with requests in flight"; return 0; fi
    sleep 0.5 & wait $! || true  # a signal ends the wait at once
  done
  log "second signal: stopping now"
}

is_running() {
  local pid_file="$RUN_DIR/tmp/.model_server.pid"
  [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

worker_deaths() {
  grep -c "Backend worker process died" "$LOG_DIR/model_log.log" 2>/dev/null || true
}

wait_healthy() {  # $1 = pid of the server process (foreground) or empty
  local url model_url deadline deaths_before
  url="$(local_url "$(ts_address inference)")/ping"
  # /ping answers Healthy as soon as the frontend is up, even while the worker is still
  # loading (or crashing): ready means a worker of the model reports READY.
  model_url="$(local_url "$(ts_address management)")/models/whisper"
  deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
  deaths_before="$(worker_deaths)"
  log "waiting for $url and a READY worker"
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if curl -fsS --max-time 5 "$url" 2>/dev/null | grep -q '"Healthy"' \
      && curl -fsS --max-time 5 "$model_url" 2>/dev/null | grep -q '"status": "READY"'; then
      return 0
    fi
    if [ $(( $(worker_deaths) - deaths_before )) -ge 3 ]; then
      grep -E "MODEL_LOG - [A-Za-z]*(Error|Exception)" "$LOG_DIR/model_log.log" | tail -n 3 >&2 || true
      die "the model worker keeps dying at start-up; see $LOG_DIR/model_log.log"
    fi
    if [ -n "${1:-}" ] && ! kill -0 "$1" 2>/dev/null; then
      die "TorchServe exited during start-up; see $LOG_DIR/ts_log.log and $LOG_DIR/model_log.log"
    fi
    if [ -z "${1:-}" ] && ! is_running; then
      die "TorchServe is not running; see $LOG_DIR/ts_log.log and $LOG_DIR/model_log.log"
    fi
    sleep 1
  done
  die "TorchServe did not become healthy within ${HEALTH_TIMEOUT}s; see $LOG_DIR/model_log.log"
}

NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"

start_openai_proxy() {
  local listen upstream conf
  listen="${WHISPER_OPENAI_LISTEN:-0.0.0.0:8000}"
  upstream="$(local_url "$(ts_address inference)" | sed 's#^https\{0,1\}://##')"
  conf="$RUN_DIR/nginx-openai.conf"
  mkdir -p "$RUN_DIR"
  sed -e "s#@LISTEN@#$listen#g" -e "s#@UPSTREAM@#$upstream#g" -e "s#@RUN_DIR@#$RUN_DIR#g" \
    "$ROOT/config/nginx-openai.conf" > "$conf"
  "$NGINX_BIN" -e "$RUN_DIR/nginx-error.log" -p "$RUN_DIR" -c "$conf" -t -q
  "$NGINX_BIN" -e "$RUN_DIR/nginx-error.log" -p "$RUN_DIR" -c "$conf"
  log "OpenAI-compatible API: http://$(echo "$listen" | sed 's#0\.0\.0\.0#127.0.0.1#')/v1/audio/transcriptions"
}

stop_openai_proxy() {
  local pid_file="$RUN_DIR/nginx.pid"
  if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    kill -QUIT "$(cat "$pid_file")" 2>/dev/null || true
    for _ in $(seq 1 20); do [ -f "$pid_file" ] || break; sleep 0.25; done
    log "stopped the OpenAI proxy"
  fi
}

print_endpoints() {
  local inference management metrics
  inference="$(local_url "$(ts_address inference)")"
  management="$(local_url "$(ts_address management)")"
  metrics="$(local_url "$(ts_address metrics)")"
  cat >&2 <<EOF
[serve.sh] Whisper TorchServe is healthy (model: $MODEL)
  transcribe:  curl -F file=@samples/jfk.flac $inference/predictions/whisper
  inference:   $inference   (health: $inference/ping)
  metrics:     $metrics/metrics   (Prometheus)
  management:  $management   (loopback only)
  logs:        $LOG_DIR   (ts_log.log, model_log.log, access_log.log)
  stop:        ./serve.sh --stop
EOF
}

TS_START_ARGS=(--ncs --model-store "$MODEL_STORE" --ts-config "$TS_CONFIG" --models whisper=whisper.mar
  --log-config "$ROOT/config/log4j2.xml")
SIGNALS=0  # SIGTERM/SIGINT received: the first drains, the second stops at once

do_start() {  # $1 = foreground|background
  is_running && die "already running (pid $(cat "$RUN_DIR/tmp/.model_server.pid")); ./serve.sh --stop first"
  do_prepare
  ts_env
  # the driver, torch's CUDA build and the device chosen; a GPU asked for and unusable stops here
  python "$ROOT/scripts/check_device.py" --device "${WHISPER_DEVICE:-auto}" || die "no usable device (above)"
  rm -rf "$DRAIN_DIR"
  [ -f "$PLUGINS_DIR/whisper-ping.jar" ] && TS_START_ARGS+=(--plugins-path "$PLUGINS_DIR")
  if [ "$1" = background ]; then
    # In a session of its own: --stop can then end every process it started, workers that
    # replaced dead ones included, without touching the caller's session.
    setsid -w torchserve --start "${TS_START_ARGS[@]}" >"$LOG_DIR/serve_stdout.log" 2>&1
    wait_healthy ""
    [ "$OPENAI" = 1 ] && start_openai_proxy
    print_endpoints
  else
    torchserve --start --foreground "${TS_START_ARGS[@]}" &
    local pid=$!
    trap 'SIGNALS=$((SIGNALS + 1))' INT TERM
    wait_healthy "$pid"
    [ "$OPENAI" = 1 ] && start_openai_proxy
    print_endpoints
    while [ "$SIGNALS" -eq 0 ] && kill -0 "$pid" 2>/dev/null; do
      wait "$pid" || true  # returns when TorchServe exits or a signal comes
    done
    if kill -0 "$pid" 2>/dev/null; then
      drain
      log "stopping"
      stop_openai_proxy
      torchserve --stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    fi
    wait "$pid" || true
    exit 0
  fi
}

do_stop() {
  ts_env
  stop_openai_proxy
  if ! is_running; then
    log "not running"
    return 0
  fi
  local pid sid
  pid="$(cat "$RUN_DIR/tmp/.model_server.pid")"
  sid="$(session_of "$pid")"
  trap 'SIGNALS=$((SIGNALS + 1))' INT TERM
  SIGNALS=1  # as if signalled once: a signal to --stop itself stops at once
  drain
  torchserve --stop >/dev/null 2>&1 || true
  # torchserve --stop only signals the frontend; wait until it and its workers are gone.
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "frontend did not stop in 30 s, killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
  # A worker the frontend did not stop (one started to replace a dead worker while it shut
  # down) would live on orphaned: end what is left of the frontend's own session.
  local left
  left="$( [ -n "$sid" ] && [ "$sid" != "$(session_of $$)" ] && session_pids "$sid" || true)"
  if [ -n "$left" ]; then
    log "killing $(echo "$left" | wc -l) process(es) left in the server's session"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
  fi
  log "stopped"
}

do_status() {
  ts_env
  if is_running; then
    log "running (pid $(cat "$RUN_DIR/tmp/.model_server.pid"))"
    print_endpoints
  else
    log "not running"
    return 1
  fi
}

OPENAI=0
ACTION=""
for arg in "$@"; do
  case "$arg" in
    --openai) OPENAI=1 ;;
    *) [ -z "$ACTION" ] || { usage; exit 2; }; ACTION="$arg" ;;
  esac
done

case "$ACTION" in
  "") do_start foreground ;;
  --background) do_start background ;;
  --stop) do_stop ;;
  --install) do_install ;;
  --prepare) do_prepare ;;
  --status) do_status ;;
  -h|--help) usage ;;
  *) usage; exit 2 ;;
esac
