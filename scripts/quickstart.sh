#!/usr/bin/env bash
# The quick start: installs what is missing, builds, writes the built-in synthetic facts
# benchmark (a tiny random LLaMA, its tokenizer, train/eval/held-out questions), starts
# meft-param-server, evaluates, trains the MEFT adapter on the CPU, evaluates again, prints exact
# match before and after, and stops the server. About 2 minutes on 2 cores after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
build=${MEFT_BUILD_DIR:-build}
echo "== build ($build)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)" --target meft-param-server meft-worker
server_bin=$build/param_server/meft-param-server
worker_bin=$build/gpu_worker/meft-worker

rm -rf runs/facts runs/quickstart
mkdir -p runs/quickstart
echo "== make-facts"
"$worker_bin" make-facts --output runs/facts

echo "== start meft-param-server (4 layers, r = 4096, d = 64)"
"$server_bin" --listen 127.0.0.1:0 --metrics-port 0 --adapter-layers 0-3 --adapter-dim 64 \
  --adapter-rows 4096 --adapter-top-k 32 --checkpoint-dir runs/quickstart/server \
  >runs/quickstart/server.log 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's/.*serving meft.v1.ParamServer on .* (port \([0-9]*\)).*/\1/p' runs/quickstart/server.log)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat runs/quickstart/server.log; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "the parameter server did not start"; cat runs/quickstart/server.log; exit 1; }
metrics_url=$(sed -n 's/.*metrics on \(http[^ ]*\).*/\1/p' runs/quickstart/server.log)
echo "parameter server on 127.0.0.1:$port, metrics at $metrics_url"

worker() { "$worker_bin" "$1" --config scripts/quickstart.yaml --meft-server "127.0.0.1:$port" "${@:2}"; }
em() { sed -n 's/.*nq_substring_em = \([0-9.e-]*\).*/\1/p'; }

echo "== evaluate before training"
before=$(worker eval --checkpoint none --output runs/quickstart/eval-before | tee /dev/stderr | em)
echo "== train"
start=$(date +%s)
worker train
end=$(date +%s)
echo "== evaluate after training"
after=$(worker eval --output runs/quickstart/eval-after | tee /dev/stderr | em)
heldout=$(worker eval --data-eval runs/facts/heldout.jsonl --output runs/quickstart/eval-heldout \
  | tee /dev/stderr | em)

cat <<SUMMARY

== quick start done (training took $((end - start)) s)
exact match, facts asked with training templates:  before $before  after $after
exact match, facts asked with held-out templates:  after $heldout
predictions and metrics:  runs/quickstart/eval-{before,after,heldout}/
worker checkpoint:        runs/quickstart/checkpoint-1500/
server checkpoint:        runs/quickstart/server/checkpoint-1500/
server log:               runs/quickstart/server.log
SUMMARY
