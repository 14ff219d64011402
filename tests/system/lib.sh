# Shared by the tests that run real meft processes (sourced, not run). The sourcing script sets
# worker, server_bin and dir (a temporary folder) and installs `trap cleanup EXIT`.
declare -A server_pids=()
worker_pid=""

# cleanup: kills every process the test started and removes $dir.
cleanup() {
  local name
  for name in "${!server_pids[@]}"; do kill -9 "${server_pids[$name]}" 2>/dev/null || true; done
  # (`|| true`: under `set -e` a failed kill, of a process already reaped, would end the trap)
  [ -z "$worker_pid" ] || kill -9 "$worker_pid" 2>/dev/null || true
  local jobs_left
  jobs_left=$(jobs -p)
  [ -z "$jobs_left" ] || kill -9 $jobs_left 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}

# fail MESSAGE: prints it and the end of every log, and exits 1.
fail() {
  echo "FAIL: $*"
  local f
  for f in "$dir"/*.log; do
    [ -e "$f" ] || continue
    echo "--- $f"
    tail -n 30 "$f"
  done
  exit 1
}

# start_server NAME LISTEN CHECKPOINT_DIR [FLAGS...]: starts a tiny-adapter server logging to
# $dir/server-NAME.log, waits until it serves, sets port_NAME and server_pids[NAME]. A command
# prefix (e.g. `ip netns exec ns`) may be given in SERVER_PREFIX.
start_server() {
  local name=$1 listen=$2 ckpt=$3 log="$dir/server-$1.log" before
  shift 3
  # The log exists before the loop below reads it (under `set -eo pipefail` a sed on a file the
  # background process has not opened yet would end the test).
  touch "$log"
  before=$(grep -c 'serving meft.v1' "$log" || true)
  ${SERVER_PREFIX:-} "$server_bin" --listen "$listen" --metrics-port 0 --adapter-dim 64 \
    --adapter-rows 512 --adapter-top-k 16 --checkpoint-dir "$ckpt" "$@" >>"$log" 2>&1 &
  server_pids[$name]=$!
  local p
  for _ in $(seq 1 200); do
    p=$(sed -n 's/.*serving meft.v1.ParamServer on .* (port \([0-9]*\)).*/\1/p' "$log" | tail -n 1)
    if [ -n "$p" ] && [ "$(grep -c 'serving meft.v1' "$log")" -gt "${before:-0}" ]; then
      printf -v "port_$name" '%s' "$p"
      return 0
    fi
    sleep 0.1
  done
  fail "server $name did not start"
}

# stop_server NAME: SIGTERM (the server writes a final checkpoint) and wait.
stop_server() {
  kill "${server_pids[$1]}"
  wait "${server_pids[$1]}" || true
  unset "server_pids[$1]"
}

# wait_for FILE SECONDS: waits until FILE exists.
wait_for() {
  for _ in $(seq 1 $(($2 * 20))); do
    [ -e "$1" ] && return 0
    sleep 0.05
  done
  fail "timed out waiting for $1"
}

# trainer_state.json without the log_history figures that are timings (they differ from run to run).
untimed() { grep -Ev '"(compute_seconds|step_seconds|tokens_per_second|transfer_seconds|wait_seconds)":' "$1"; }

# same_checkpoints REF RUN CHECKPOINT SERVER_DIR...: each REF/SERVER_DIR/CHECKPOINT's adapter
# and optimizer state equal RUN's byte for byte.
same_checkpoints() {
  local ref=$1 run=$2 ckpt=$3 server file
  shift 3
  for server in "$@"; do
    for file in adapter_model.safetensors optimizer.safetensors; do
      cmp -s "$ref/$server/$ckpt/$file" "$run/$server/$ckpt/$file" || {
        echo "$run/$server/$ckpt/$file differs from $ref's"
        return 1
      }
    done
  done
}

# Process gauges from /proc.
count_fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
count_threads() { ls "/proc/$1/task" 2>/dev/null | wc -l; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
