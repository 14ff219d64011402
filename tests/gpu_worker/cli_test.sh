#!/usr/bin/env bash
# End-to-end test of the two binaries as users run them: make-facts, a real meft-param-server
# process on loopback, meft-worker train (with a checkpoint), eval, resume, and bad input.
# Usage: cli_test.sh MEFT_WORKER MEFT_PARAM_SERVER
set -euo pipefail
worker=$1
server_bin=$2
dir=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$worker" make-facts --output "$dir/facts" --entities 8 --vocab-size 320 >/dev/null

start_server() {
  "$server_bin" --listen 127.0.0.1:0 --metrics-port 0 --adapter-layers 0-3 --adapter-dim 64 \
    --adapter-rows 512 --adapter-top-k 16 --checkpoint-dir "$dir/server" "$@" >"$dir/server.log" 2>&1 &
  server_pid=$!
  port=""
  for _ in $(seq 1 100); do
    port=$(sed -n 's/.*(port \([0-9]*\)).*/\1/p' "$dir/server.log")
    [ -n "$port" ] && return 0
    sleep 0.1
  done
  cat "$dir/server.log"
  fail "server did not start"
}
stop_server() { kill "$server_pid"; wait "$server_pid" || true; server_pid=""; }

cat >"$dir/run.yaml" <<YAML
model_dir: $dir/facts/model
output_dir: $dir/run
data: {train: $dir/facts/train.jsonl, eval: $dir/facts/eval.jsonl, max_length: 64,
       template_without_input: "{instruction}"}
train: {max_steps: 30, micro_batch_size: 8, lr: 0.02, save_every: 15, log_every: 10}
eval: {max_new_tokens: 4}
YAML

start_server
# adapter.type none: the bare model, with no server (an unreachable address proves none is
# contacted). A fresh MEFT adapter has V = 0 and adds exactly nothing, so its answers must equal
# the bare model's.
"$worker" eval --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" --output "$dir/eval0" \
  >"$dir/eval0.out" 2>&1 || { cat "$dir/eval0.out"; fail "eval before training"; }
"$worker" eval --config "$dir/run.yaml" --adapter-type none --meft-server 127.0.0.1:1 \
  --output "$dir/eval-none" >"$dir/eval-none.out" 2>&1 || { cat "$dir/eval-none.out"; fail "eval none"; }
cmp -s "$dir/eval0/predictions.jsonl" "$dir/eval-none/predictions.jsonl" ||
  fail "adapter none answers differ from an untrained MEFT adapter's"
grep -q '"adapter": *"none"' "$dir/eval-none/metrics.json" || fail "metrics.json adapter none"
"$worker" generate --config "$dir/run.yaml" --adapter-type none --meft-server 127.0.0.1:1 \
  --prompt "What is the capital of Xyzland?" >"$dir/generate-none.out" 2>&1 ||
  { cat "$dir/generate-none.out"; fail "generate none"; }
"$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" >"$dir/train.out" 2>&1 ||
  { cat "$dir/train.out"; fail "train"; }
grep -q "trained 30 steps" "$dir/train.out" || fail "train summary missing"
[ -f "$dir/run/checkpoint-15/trainer_state.json" ] || fail "no checkpoint-15"
[ -f "$dir/run/checkpoint-30/trainer_state.json" ] || fail "no checkpoint-30"
[ -d "$dir/server/checkpoint-30" ] || fail "no server checkpoint-30"

"$worker" eval --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" --output "$dir/eval" \
  >"$dir/eval.out" 2>&1 || { cat "$dir/eval.out"; fail "eval"; }
grep -q "nq_substring_em" "$dir/eval/metrics.json" || fail "metrics.json"
[ "$(wc -l <"$dir/eval/predictions.jsonl")" -eq 24 ] || fail "predictions.jsonl lines"

# Resume from step 15 on a fresh server process (it restores the server checkpoint recorded
# there): the adapter after step 30 must be byte-identical to the uninterrupted run's.
cp "$dir/server/checkpoint-30/adapter_model.safetensors" "$dir/straight.safetensors"
cp "$dir/server/checkpoint-30/optimizer.safetensors" "$dir/straight-optimizer.safetensors"
stop_server
start_server
"$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" \
  --resume "$dir/run/checkpoint-15" --output-dir "$dir/resumed" >"$dir/resume.out" 2>&1 ||
  { cat "$dir/resume.out"; fail "resume"; }
grep -q "trained 15 steps" "$dir/resume.out" || fail "resume should train the last 15 steps"
cmp -s "$dir/straight.safetensors" "$dir/server/checkpoint-30/adapter_model.safetensors" ||
  fail "resumed adapter differs from the uninterrupted run"
cmp -s "$dir/straight-optimizer.safetensors" "$dir/server/checkpoint-30/optimizer.safetensors" ||
  fail "resumed optimizer state differs from the uninterrupted run"

# Bad input: a clear error naming the setting, file and line; exit code 2 for invalid arguments.
set +e
out=$("$worker" train --config "$dir/run.yaml" --train-lr -1 2>&1); code=$?
[ $code -eq 2 ] && grep -q "train-lr" <<<"$out" || fail "bad lr: $code $out"
printf '{"instruction": "x"}\n' >"$dir/bad.jsonl"
out=$("$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" \
  --data-train "$dir/bad.jsonl" 2>&1); code=$?
[ $code -ne 0 ] && grep -q "bad.jsonl:1" <<<"$out" || fail "bad jsonl: $code $out"
printf 'train:\n  max_stepz: 3\n' >"$dir/bad.yaml"
out=$("$worker" train --config "$dir/bad.yaml" 2>&1); code=$?
[ $code -eq 2 ] && grep -q "bad.yaml:2" <<<"$out" || fail "bad yaml: $code $out"
out=$("$worker" train --config "$dir/run.yaml" --adapter-type none 2>&1); code=$?
[ $code -eq 2 ] && grep -q "adapter.type: none trains nothing" <<<"$out" || fail "train none: $code $out"
out=$("$worker" eval --config "$dir/run.yaml" --adapter-type none --checkpoint "$dir/run/checkpoint-15" 2>&1); code=$?
[ $code -eq 2 ] && grep -q "adapter.type is none" <<<"$out" || fail "eval none with checkpoint: $code $out"
out=$("$worker" train --config "$dir/run.yaml" --meft-server 127.0.0.1:1 --meft-timeout-seconds 5 2>&1); code=$?
[ $code -ne 0 ] && grep -q "cannot reach the parameter server" <<<"$out" || fail "no server: $code $out"
set -e
echo "cli_test: all checks passed"
