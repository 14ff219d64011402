#!/usr/bin/env bash
# The real Prometheus server from Debian scrapes a meft-param-server and a training meft-worker on
# loopback. Checks: `promtool check metrics` accepts both endpoints; through Prometheus's HTTP API
# both targets are up and the meft_ series of both processes arrive; every meft_ metric the
# Grafana dashboard's PromQL uses is exported by one of the two live endpoints.
# Usage: prometheus_test.sh MEFT_WORKER MEFT_PARAM_SERVER DEPLOY_DIR
set -euo pipefail
worker=$1
server_bin=$2
deploy=$3
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
pids=()
# Stops the processes newest first: the worker before the server, so a worker that lost its server
# does not wait for it to come back.
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$dir"/*.log; do echo "--- $f"; tail -20 "$f"; done
  exit 1
}
wait_for() {  # file sed-regex -> first capture group, within 20 s
  for _ in $(seq 1 200); do
    v=$(sed -n "s/$2/\1/p" "$1" | head -1)
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.1
  done
  return 1
}

"$worker" make-facts --output "$dir/facts" --entities 8 --vocab-size 320 >/dev/null
"$server_bin" --listen 127.0.0.1:0 --metrics-port 0 --adapter-layers 0-3 --adapter-dim 64 \
  --adapter-rows 512 --adapter-top-k 16 >"$dir/server.log" 2>&1 &
pids+=($!)
port=$(wait_for "$dir/server.log" '.*(port \([0-9]*\)).*') || fail "server did not start"
server_metrics=$(wait_for "$dir/server.log" '.*metrics on http:\/\/\([^/]*\)\/metrics.*') ||
  fail "no server metrics URL in the log"

# Trains until killed, so Prometheus scrapes it during training.
"$worker" train --model-dir "$dir/facts/model" --data-train "$dir/facts/train.jsonl" \
  --output-dir "$dir/run" --meft-server "127.0.0.1:$port" --train-max-steps 1000000 \
  --train-micro-batch-size 8 --data-template-without-input "{instruction}" \
  --metrics-listen 127.0.0.1:0 >"$dir/worker.log" 2>&1 &
pids+=($!)
worker_metrics=$(wait_for "$dir/worker.log" '.*worker metrics on http:\/\/\([^/]*\)\/metrics.*') ||
  fail "no worker metrics URL in the log"
echo "[$SECONDS s] worker up at $worker_metrics"
stepped=""
for _ in $(seq 1 600); do
  if curl -sf "http://$worker_metrics/metrics" | grep -q '^meft_worker_steps_total [1-9]'; then
    stepped=1
    break
  fi
  sleep 0.1
done
[ -n "$stepped" ] || fail "the worker recorded no optimizer step"

for endpoint in "$server_metrics" "$worker_metrics"; do
  curl -sf "http://$endpoint/metrics" >"$dir/scrape.txt" || fail "cannot scrape $endpoint"
  promtool check metrics <"$dir/scrape.txt" || fail "promtool rejected $endpoint"
  cat "$dir/scrape.txt" >>"$dir/all.txt"
done

# The dashboard's metrics must exist on a live endpoint (sample names, so histogram series such
# as *_bucket count).
python3 "$here/dashboard_metrics.py" "$deploy/grafana/dashboards/meft.json" >"$dir/dashboard.txt" ||
  fail "cannot read the dashboard"
sed -n 's/^\(meft_[A-Za-z0-9_:]*\).*/\1/p' "$dir/all.txt" | sort -u >"$dir/exported.txt"
missing=$(comm -23 "$dir/dashboard.txt" "$dir/exported.txt")
[ -z "$missing" ] || fail "the dashboard uses metrics no endpoint exports: $missing"

cat >"$dir/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: meft-param-server
    static_configs: [{targets: ["$server_metrics"]}]
  - job_name: meft-gpu-worker
    static_configs: [{targets: ["$worker_metrics"]}]
YAML
started=""
for _ in $(seq 1 10); do
  pport=$((20000 + RANDOM % 30000))
  prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="127.0.0.1:$pport" >"$dir/prometheus.log" 2>&1 &
  ppid=$!
  for _ in $(seq 1 150); do
    if curl -sf "http://127.0.0.1:$pport/-/ready" >/dev/null 2>&1; then started=1; break; fi
    kill -0 "$ppid" 2>/dev/null || break
    sleep 0.2
  done
  if [ -n "$started" ]; then pids+=("$ppid"); break; fi
  kill "$ppid" 2>/dev/null || true
  wait "$ppid" 2>/dev/null || true
done
[ -n "$started" ] || fail "prometheus did not start"
echo "[$SECONDS s] prometheus up on 127.0.0.1:$pport"

# query PROMQL MIN -> succeeds once the instant query returns at least MIN series
query() {
  curl -sf --get "http://127.0.0.1:$pport/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); sys.exit(0 if r["status"]=="success" and len(r["data"]["result"])>=int(sys.argv[1]) else 1)' "$2"
}
expect() {  # PROMQL MIN: waits up to 60 s
  for _ in $(seq 1 300); do
    if query "$1" "$2"; then return 0; fi
    sleep 0.2
  done
  fail "Prometheus has fewer than $2 series for $1"
}
expect 'up{job="meft-param-server"} == 1' 1
expect 'up{job="meft-gpu-worker"} == 1' 1
expect 'meft_process_resident_memory_bytes > 0' 2
for metric in meft_ps_rows_served_total meft_ps_lookup_seconds_count meft_ps_optimizer_step \
              meft_ps_bytes_sent_total meft_worker_loss meft_worker_step meft_worker_tokens_total \
              meft_worker_tokens_per_second meft_worker_gpu_memory_bytes; do
  expect "$metric" 1
done
expect 'meft_worker_step_phase_seconds_total' 3
expect 'meft_worker_bytes_total > 0' 2
expect 'meft_worker_steps_total > 0' 1
expect 'meft_ps_rows_served_total > 0' 1
echo "[$SECONDS s] prometheus_test: both processes' meft_ series arrived in Prometheus; promtool accepted both;" \
  "the dashboard's $(wc -l <"$dir/dashboard.txt") metrics are exported"
