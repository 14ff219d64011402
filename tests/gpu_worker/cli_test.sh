#!/usr/bin/env bash
# End-to-end test of the two binaries as users run them: make-facts, a real meft-param-server
# process on loopback, meft-worker train (with a checkpoint and train_log.jsonl), eval (of the
# newest checkpoint by default), resume, a moved run folder, and bad input.
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

# start_server [CHECKPOINT_DIR]
start_server() {
  "$server_bin" --listen 127.0.0.1:0 --metrics-port 0 --adapter-layers 0-3 --adapter-dim 64 \
    --adapter-rows 512 --adapter-top-k 16 --checkpoint-dir "${1:-$dir/server}" >"$dir/server.log" 2>&1 &
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
# steps FILE: the "step" of every line of a train_log.jsonl, or of a trainer_state.json's
# log_history, space-separated.
steps() { grep -o '"step": *[0-9]*' "$1" | sed 's/.*: *//' | tr '\n' ' ' | sed 's/ $//'; }

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
grep -q "no checkpoint-<step> in output_dir $dir/run: using the parameter server's current state" \
  "$dir/eval0.out" || fail "eval before training does not say what it evaluates"
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
# The training history: a line every train.log_every steps; each checkpoint carries the lines up
# to its step (the server's checkpoints lie outside the run folder: recorded absolute).
[ "$(steps "$dir/run/train_log.jsonl")" = "10 20 30" ] || fail "train_log.jsonl steps: $(steps "$dir/run/train_log.jsonl")"
[ "$(steps "$dir/run/checkpoint-15/trainer_state.json")" = "10" ] || fail "checkpoint-15 log_history"
[ "$(steps "$dir/run/checkpoint-30/trainer_state.json")" = "10 20 30" ] || fail "checkpoint-30 log_history"
grep -q "\"server_checkpoint\": \"/.*/server/checkpoint-30\"" "$dir/run/checkpoint-30/trainer_state.json" ||
  fail "server checkpoint outside the run folder not recorded as an absolute path"

"$worker" eval --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" --output "$dir/eval" \
  >"$dir/eval.out" 2>&1 || { cat "$dir/eval.out"; fail "eval"; }
grep -q "nq_substring_em" "$dir/eval/metrics.json" || fail "metrics.json"
grep -q "using $dir/run/checkpoint-30, the newest checkpoint in output_dir" "$dir/eval.out" ||
  fail "eval after training does not load the newest checkpoint: $(cat "$dir/eval.out")"
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
# The resumed run's history: checkpoint-15's (step 10), then its own lines.
[ "$(steps "$dir/resumed/train_log.jsonl")" = "10 20 30" ] || fail "resumed train_log.jsonl: $(steps "$dir/resumed/train_log.jsonl")"
cmp -s "$dir/straight.safetensors" "$dir/server/checkpoint-30/adapter_model.safetensors" ||
  fail "resumed adapter differs from the uninterrupted run"
cmp -s "$dir/straight-optimizer.safetensors" "$dir/server/checkpoint-30/optimizer.safetensors" ||
  fail "resumed optimizer state differs from the uninterrupted run"

stop_server

# A baseline: without --checkpoint, eval and generate use the newest checkpoint-<step> in
# output_dir (a folder still being written, checkpoint-<step>.tmp-<pid>, is not one);
# --checkpoint none, like a run folder without checkpoints, the untrained adapter.
par_config=(--config "$dir/run.yaml" --adapter-type parallel --adapter-rows 64)
par=("${par_config[@]}" --output-dir "$dir/par")
"$worker" train "${par[@]}" --train-max-steps 10 --train-save-every 5 >"$dir/par-train.out" 2>&1 ||
  { cat "$dir/par-train.out"; fail "train parallel"; }
mkdir "$dir/par/checkpoint-99.tmp-1" && cp "$dir/par/checkpoint-10/trainer_state.json" "$dir/par/checkpoint-99.tmp-1/"
"$worker" eval "${par[@]}" --output "$dir/par-eval" >"$dir/par-eval.out" 2>&1 ||
  { cat "$dir/par-eval.out"; fail "eval parallel"; }
grep -q "using $dir/par/checkpoint-10, the newest checkpoint in output_dir (--checkpoint none for the untrained adapter)" \
  "$dir/par-eval.out" || fail "eval parallel: $(cat "$dir/par-eval.out")"
"$worker" eval "${par[@]}" --checkpoint "$dir/par/checkpoint-10" --output "$dir/par-eval10" \
  >"$dir/par-eval10.out" 2>&1 || { cat "$dir/par-eval10.out"; fail "eval parallel checkpoint-10"; }
cmp -s "$dir/par-eval/predictions.jsonl" "$dir/par-eval10/predictions.jsonl" ||
  fail "eval without --checkpoint differs from eval of the newest checkpoint"
grep -q "\"checkpoint\": *\"$dir/par/checkpoint-10\"" "$dir/par-eval/metrics.json" || fail "metrics.json checkpoint"
"$worker" eval "${par[@]}" --checkpoint none --output "$dir/par-none" >"$dir/par-none.out" 2>&1 ||
  { cat "$dir/par-none.out"; fail "eval parallel --checkpoint none"; }
grep -q "\-\-checkpoint none: using the untrained adapter" "$dir/par-none.out" || fail "eval none: $(cat "$dir/par-none.out")"
"$worker" eval "${par_config[@]}" --output-dir "$dir/par-empty" --output "$dir/par-empty-eval" \
  >"$dir/par-empty.out" 2>&1 || { cat "$dir/par-empty.out"; fail "eval parallel without checkpoints"; }
grep -q "no checkpoint-<step> in output_dir $dir/par-empty: using the untrained adapter" "$dir/par-empty.out" ||
  fail "eval without checkpoints: $(cat "$dir/par-empty.out")"
cmp -s "$dir/par-none/predictions.jsonl" "$dir/par-empty-eval/predictions.jsonl" ||
  fail "--checkpoint none differs from a run folder without checkpoints"
"$worker" generate "${par[@]}" --prompt "What is the capital of Xyzland?" >"$dir/par-gen.out" 2>&1 ||
  { cat "$dir/par-gen.out"; fail "generate parallel"; }
grep -q "using $dir/par/checkpoint-10, the newest" "$dir/par-gen.out" || fail "generate: $(cat "$dir/par-gen.out")"

# A moved run folder: the server's checkpoints under it are recorded relative to it, so eval
# from the new place, with a server confined to the new place, gives the same answers.
start_server "$dir/mrun/server"
"$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" --output-dir "$dir/mrun" \
  --train-max-steps 5 --train-save-every 5 >"$dir/mrun-train.out" 2>&1 || { cat "$dir/mrun-train.out"; fail "train mrun"; }
grep -q '"server_checkpoint": "server/checkpoint-5"' "$dir/mrun/checkpoint-5/trainer_state.json" ||
  fail "server checkpoint under the run folder not recorded relative to it"
"$worker" eval --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" --output-dir "$dir/mrun" \
  --output "$dir/mrun-eval" >"$dir/mrun-eval.out" 2>&1 || { cat "$dir/mrun-eval.out"; fail "eval mrun"; }
stop_server
mv "$dir/mrun" "$dir/moved"
start_server "$dir/moved/server"
"$worker" eval --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" --output-dir "$dir/moved" \
  --output "$dir/moved-eval" >"$dir/moved-eval.out" 2>&1 || { cat "$dir/moved-eval.out"; fail "eval moved"; }
grep -q "using $dir/moved/checkpoint-5, the newest" "$dir/moved-eval.out" || fail "eval moved: $(cat "$dir/moved-eval.out")"
cmp -s "$dir/mrun-eval/predictions.jsonl" "$dir/moved-eval/predictions.jsonl" ||
  fail "the moved run's answers differ"

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
out=$("$worker" eval "${par[@]}" --checkpoint "$dir/nowhere" 2>&1); code=$?
[ $code -ne 0 ] && grep -q "checkpoint $dir/nowhere: .*$dir/nowhere/trainer_state.json" <<<"$out" || fail "bad --checkpoint: $code $out"
out=$("$worker" train --config "$dir/run.yaml" --meft-server 127.0.0.1:1 --meft-timeout-seconds 5 2>&1); code=$?
[ $code -ne 0 ] && grep -q "cannot reach the parameter server" <<<"$out" || fail "no server: $code $out"
set -e
echo "cli_test: all checks passed"
