#!/usr/bin/env bash
# Fine-tunes a real pretrained model on this machine: fetches and converts SmolLM2-135M-Instruct
# (scripts/fetch-model.sh), writes the built-in synthetic facts (16 invented countries x 3 facts:
# their answers are new words no pretrained model knows), starts meft-param-server on loopback
# with a MEFT adapter on all 30 layers, evaluates the bare model, trains the adapter on the CPU
# (scripts/finetune-smollm2.yaml), evaluates again on the training templates and on held-out
# templates, and answers one question in plain words. About 15-20 minutes on 2 cores after the
# build. Outputs land in runs/smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
build=${MEFT_BUILD_DIR:-build}
echo "== build ($build)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)" --target meft-param-server meft-worker
server_bin=$build/param_server/meft-param-server
worker_bin=$build/gpu_worker/meft-worker

echo "== model"
model=$(bash scripts/fetch-model.sh smollm2-135m | tail -1)
out=runs/smollm2
rm -rf "$out"
mkdir -p "$out"
echo "== make-facts"
"$worker_bin" make-facts --output "$out/facts" --entities 16 >/dev/null

echo "== start meft-param-server (30 layers, r = 4096, d = 576)"
"$server_bin" --listen 127.0.0.1:0 --metrics-port 0 --adapter-layers 0-29 --adapter-dim 576 \
  --adapter-rows 4096 --checkpoint-dir "$out/server" >"$out/server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's/.*serving meft.v1.ParamServer on .* (port \([0-9]*\)).*/\1/p' "$out/server.log")
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$out/server.log"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "the parameter server did not start"; cat "$out/server.log"; exit 1; }

worker() {
  "$worker_bin" "$1" --config scripts/finetune-smollm2.yaml --model-dir "$model" \
    --data-train "$out/facts/train.jsonl" --data-eval "$out/facts/eval.jsonl" \
    --meft-server "127.0.0.1:$port" "${@:2}"
}
em() { sed -n 's/.*nq_substring_em = \([0-9.e-]*\).*/\1/p'; }
question=$(sed -n '1s/.*"instruction":"\([^"]*\)".*"output":"\([^"]*\)".*/\1/p' "$out/facts/eval.jsonl")
answer=$(sed -n '1s/.*"output":"\([^"]*\)".*/\1/p' "$out/facts/eval.jsonl")

echo "== evaluate the bare model"
before=$(worker eval --adapter-type none --output "$out/eval-before" | tee /dev/stderr | em)
before_heldout=$(worker eval --adapter-type none --data-eval "$out/facts/heldout.jsonl" \
  --output "$out/eval-before-heldout" | tee /dev/stderr | em)
before_answer=$(worker generate --adapter-type none --prompt "$question" 2>/dev/null)
echo "== train"
start=$(date +%s)
worker train 2>&1 | tee "$out/train.out"
end=$(date +%s)
echo "== evaluate after training"
after=$(worker eval --output "$out/eval-after" | tee /dev/stderr | em)
heldout=$(worker eval --data-eval "$out/facts/heldout.jsonl" --output "$out/eval-heldout" \
  | tee /dev/stderr | em)
after_answer=$(worker generate --prompt "$question" 2>/dev/null)
tokens_per_second=$(sed -n 's/.*| \([0-9.]*\) tok\/s.*/\1/p' "$out/train.out" | tail -1)

cat <<SUMMARY

== SmolLM2-135M-Instruct + MEFT done (training took $((end - start)) s, last logged $tokens_per_second tokens/s)
exact match, facts asked with training templates:  before $before  after $after
exact match, facts asked with held-out templates:  before $before_heldout  after $heldout
question:            $question   (answer: $answer)
bare model answers:  $before_answer
after training:      $after_answer
predictions and metrics:  $out/eval-{before,after,heldout}/
server checkpoint:        $out/server/
SUMMARY
