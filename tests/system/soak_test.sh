#!/usr/bin/env bash
# Soak test (issue 20): real processes on loopback for a bounded number of steps.
#   reference: two server shards (layers 0-1, 2-3) and one worker training over gRPC, nothing else;
#   soak:      two fresh shards; a worker trains over shared memory with periodic checkpoints and
#              periodic evaluation (train.eval_every) while two more worker processes evaluate
#              the live adapter in a loop (`eval --checkpoint none`), one over gRPC and one over
#              shared memory; in the middle, shard 0 is killed with -9 and restarted with
#              `--restore latest`, and the trainer reconnects and resumes.
# One adapter has one trainer (several trainers on one adapter is data parallel, issue 15), so
# the other worker processes read the adapter while it trains.
# Afterwards:
#   - every process exited 0, every evaluation succeeded, no log line at error level (an
#     evaluation that starts while a Step has reached one shard and not yet the other is refused,
#     the shards being one step apart, and one that reaches shard 0 while it is down cannot
#     reach it: those are retried and counted);
#   - no shared-memory arena of its workers left in /dev/shm (names carry the worker's pid);
#   - the shard that ran throughout has as many file descriptors as before the first worker
#     connected and no more threads than it ran in the first half (gRPC's pools grow to the load
#     and stay; ~half the evaluators' connections come later), and the trainer has no more of
#     either after the restart than before it;
#   - resident memory flat after warm-up: sampled every 0.25 s, the mean of the last third of
#     the samples after warm-up (the first quarter of the steps) exceeds the mean of the first
#     third by at most RSS_TOLERANCE_MIB (below) for the trainer and the shard that ran throughout;
#   - the final adapter and optimizer state (both shards' checkpoints) and the trainer's
#     trainer_state.json (timings aside) are byte-identical to the reference's.
# Usage: soak_test.sh MEFT_WORKER MEFT_PARAM_SERVER [--steps N]
#   (default 300, a minute or two; MEFT_SOAK_STEPS=N in the environment does the same)
set -euo pipefail
worker=$1
server_bin=$2
shift 2
steps=${MEFT_SOAK_STEPS:-300}
while [ $# -gt 0 ]; do
  case $1 in
    --steps) steps=$2; shift 2 ;;
    *) echo "unknown argument: $1 (usage: soak_test.sh MEFT_WORKER MEFT_PARAM_SERVER [--steps N])"; exit 2 ;;
  esac
done
[ "$steps" -ge 40 ] || { echo "--steps must be at least 40"; exit 2; }
# Growth of the mean resident memory between the first and last third of the samples after
# warm-up that counts as a leak, in MiB. Seen at 300 steps: the trainer +4.3 MiB (199 to 203),
# shard 1 +3.2 MiB (24 to 28). A leak of one lookup's x per step and layer (8 x 64 tokens x
# d = 64 in fp32, 128 KiB; shard 1 serves two layers) would add about 37 MiB between the two
# means, which lie about 150 steps apart at 300 steps.
RSS_TOLERANCE_MIB=${MEFT_SOAK_RSS_TOLERANCE_MIB:-12}

source "$(dirname "$0")/lib.sh"
dir=$(mktemp -d)
trap cleanup EXIT

"$worker" make-facts --output "$dir/facts" --entities 8 --vocab-size 320 >/dev/null
save_every=$((steps / 10))
cat >"$dir/run.yaml" <<YAML
model_dir: $dir/facts/model
data: {train: $dir/facts/train.jsonl, eval: $dir/facts/eval.jsonl, max_length: 64,
       template_without_input: "{instruction}"}
train: {max_steps: $steps, micro_batch_size: 8, lr: 0.02, save_every: $save_every,
        log_every: $save_every, eval_every: $((steps / 4)), eval_limit: 16}
meft: {reconnect_timeout_seconds: 60}
YAML
final="checkpoint-$steps"

# 0. The reference: gRPC, no evaluators, no restart.
start_server ref0 127.0.0.1:0 "$dir/ref/server0" --adapter-layers 0-1
start_server ref1 127.0.0.1:0 "$dir/ref/server1" --adapter-layers 2-3
"$worker" train --config "$dir/run.yaml" --meft-transport grpc \
  --meft-servers "127.0.0.1:$port_ref0,127.0.0.1:$port_ref1" \
  --output-dir "$dir/ref/out" >"$dir/ref.log" 2>&1 || fail "reference run"
stop_server ref0
stop_server ref1

# 1. The soak.
start_server soak0 127.0.0.1:0 "$dir/soak/server0" --adapter-layers 0-1
start_server soak1 127.0.0.1:0 "$dir/soak/server1" --adapter-layers 2-3
servers="127.0.0.1:$port_soak0,127.0.0.1:$port_soak1"
shard1=${server_pids[soak1]}
fds_before=$(count_fds "$shard1")
threads_before=$(count_threads "$shard1")

"$worker" train --config "$dir/run.yaml" --meft-transport shm --meft-servers "$servers" \
  --output-dir "$dir/soak/out" >"$dir/soak.log" 2>&1 &
worker_pid=$!
echo "$worker_pid" >>"$dir/worker_pids"

# evaluate_in_a_loop NAME TRANSPORT: evaluations of the live adapter until $dir/stop exists,
# holding off while $dir/pause exists ($dir/NAME.busy marks one in flight); each must exit 0.
evaluate_in_a_loop() {
  local name=$1 transport=$2 i=0 skewed=0 retried=0
  while [ ! -e "$dir/stop" ]; do
    if [ -e "$dir/pause" ]; then sleep 0.1; continue; fi
    touch "$dir/$name.busy"
    if [ -e "$dir/pause" ]; then rm -f "$dir/$name.busy"; continue; fi
    i=$((i + 1))
    local restarted_before=0
    [ -e "$dir/restarted" ] && restarted_before=1
    "$worker" eval --config "$dir/run.yaml" --meft-transport "$transport" \
      --meft-servers "$servers" --checkpoint none --limit 8 --output "$dir/evals/$name-$i" \
      >"$dir/eval-$name-$i.log" 2>&1 &
    local pid=$!
    echo "$pid" >>"$dir/worker_pids"
    if ! wait "$pid"; then
      # Started while a Step had reached one shard and not yet the other: the worker refuses
      # shards at different steps. Once in a row is that; twice is a failure.
      # Or it overlapped the restart of shard 0 (the pause is best effort: under load an
      # evaluation has been seen to start as shard 0 went down); eval does not wait for a server.
      # Both are retried and counted.
      if { [ "$skewed" -eq 0 ] && grep -q "is at optimizer step .* but .* is at step" \
        "$dir/eval-$name-$i.log"; } ||
        { [ "$restarted_before" -eq 0 ] && [ -e "$dir/restarted" ] &&
          grep -q "127.0.0.1:$port_soak0" "$dir/eval-$name-$i.log"; }; then
        skewed=1
        retried=$((retried + 1))
        rm -f "$dir/$name.busy"
        continue
      fi
      echo "$i" >"$dir/$name.failed"
      rm -f "$dir/$name.busy"
      return 1
    fi
    skewed=0
    rm -f "$dir/$name.busy" "$dir/eval-$name-$i.log"
  done
  echo "$i $retried" >"$dir/$name.runs"
}
evaluate_in_a_loop grpc grpc &
eval_pids=($!)
evaluate_in_a_loop shm shm &
eval_pids+=($!)

# Samples: elapsed seconds, last logged step, then RSS (KiB), fds and threads of the trainer
# and of shard 1.
sample_in_a_loop() {
  local start=$SECONDS step
  while kill -0 "$worker_pid" 2>/dev/null; do
    step=$(tail -n 1 "$dir/soak/out/train_log.jsonl" 2>/dev/null | grep -o '"step":[0-9]*' | cut -d: -f2 || true)
    echo "$((SECONDS - start)) ${step:-0} $(rss_kib "$worker_pid") $(count_fds "$worker_pid")" \
      "$(count_threads "$worker_pid") $(rss_kib "$shard1") $(count_fds "$shard1")" \
      "$(count_threads "$shard1")" >>"$dir/samples"
    sleep 0.25
  done
}
sample_in_a_loop &
sampler_pid=$!

# The restart, once the trainer has written the checkpoint halfway.
half=$(((steps / 2 / save_every) * save_every))
wait_for "$dir/soak/out/checkpoint-$half/trainer_state.json" 600
trainer_fds_before=$(count_fds "$worker_pid")
trainer_threads_before=$(count_threads "$worker_pid")
touch "$dir/pause"
while ls "$dir"/*.busy >/dev/null 2>&1; do sleep 0.1; done
touch "$dir/restarted"
kill -9 "${server_pids[soak0]}"
wait "${server_pids[soak0]}" 2>/dev/null || true
sleep 1
start_server soak0 "127.0.0.1:$port_soak0" "$dir/soak/server0" --adapter-layers 0-1 --restore latest
# The evaluators wait until the trainer has rolled both shards back to one step and gone on.
wait_for "$dir/soak/out/checkpoint-$((half + save_every))/trainer_state.json" 600
rm -f "$dir/pause"
trainer_fds_after=$(count_fds "$worker_pid")
trainer_threads_after=$(count_threads "$worker_pid")

wait "$worker_pid" || fail "the soak's trainer"
worker_pid=""
wait "$sampler_pid" || true
touch "$dir/stop"
for pid in "${eval_pids[@]}"; do wait "$pid" || true; done
for name in grpc shm; do
  [ -e "$dir/$name.failed" ] &&
    fail "evaluation $(cat "$dir/$name.failed") over $name failed: $(tail -n 5 "$dir/eval-$name-$(cat "$dir/$name.failed").log")"
  [ -e "$dir/$name.runs" ] || fail "the $name evaluator did not finish"
done
sleep 1

# What the processes left behind.
grep -q "parameter server lost" "$dir/soak.log" || fail "the trainer never lost shard 0"
grep -q "server back at step" "$dir/soak.log" || fail "the trainer did not resume after the restart"
errors=$(grep -l -E '\[(error|critical)\]' "$dir"/*.log || true)
[ -z "$errors" ] || fail "error-level log lines in: $errors"
# Arenas are named meft-<pid of the worker>-<random>; other tests may run alongside.
leaked=$(ls /dev/shm | grep -E "^meft-($(paste -sd'|' "$dir/worker_pids"))-" | tr '\n' ' ' || true)
[ -z "${leaked// /}" ] || fail "shared-memory arenas of this test's workers left in /dev/shm: $leaked"
# The server unmaps the arenas of workers that left every 2 s: give it 5.
for _ in $(seq 1 50); do
  fds_end=$(count_fds "$shard1")
  [ "$fds_end" -le "$fds_before" ] && break
  sleep 0.1
done
threads_end=$(count_threads "$shard1")
[ "$fds_end" -le "$fds_before" ] ||
  fail "shard 1 holds $fds_end file descriptors after the workers left, $fds_before before they came"
# gRPC's thread pools grow to the load and stay (timers, sync-server pollers): compare with the
# most threads seen in the first half, when ~half the evaluations had come and gone.
threads_first_half=$(awk -v half="$half" '$2 < half && $8 > m {m = $8} END {print m + 0}' "$dir/samples")
[ "$threads_end" -le "$threads_first_half" ] ||
  fail "shard 1 runs $threads_end threads after the workers left, at most $threads_first_half in" \
    "the first half ($threads_before before any came): $(cat "/proc/$shard1/task/"*/comm | sort | uniq -c | tr '\n' ' ')"
[ "$trainer_fds_after" -le "$trainer_fds_before" ] ||
  fail "the trainer holds $trainer_fds_after file descriptors after the restart, $trainer_fds_before before"
[ "$trainer_threads_after" -le "$trainer_threads_before" ] ||
  fail "the trainer runs $trainer_threads_after threads after the restart, $trainer_threads_before before"
python3 - "$dir/samples" "$steps" "$RSS_TOLERANCE_MIB" <<'PY' || fail "resident memory grew after warm-up"
import sys
rows = [list(map(int, line.split())) for line in open(sys.argv[1]) if len(line.split()) == 8]
steps, tolerance = int(sys.argv[2]), float(sys.argv[3])
after = [r for r in rows if r[1] >= steps // 4]
if len(after) < 9:
    sys.exit(f"only {len(after)} samples after warm-up")
third = len(after) // 3
for name, col in (("trainer", 2), ("shard 1", 5)):
    first = sum(r[col] for r in after[:third]) / third / 1024
    last = sum(r[col] for r in after[-third:]) / third / 1024
    print(f"{name}: resident {first:.1f} MiB after warm-up, {last:.1f} MiB at the end "
          f"({len(after)} samples)")
    if last - first > tolerance:
        sys.exit(f"{name}: resident memory grew by {last - first:.1f} MiB (tolerance {tolerance} MiB)")
PY
same_checkpoints "$dir/ref" "$dir/soak" "$final" server0 server1 || fail "the soak's final adapter differs from the reference"
untimed "$dir/soak/out/$final/trainer_state.json" | sed "s#$dir/soak/#$dir/ref/#g" |
  cmp -s - <(untimed "$dir/ref/out/$final/trainer_state.json") ||
  fail "the soak's trainer_state.json differs from the reference's"
read -r grpc_runs grpc_retried <"$dir/grpc.runs"
read -r shm_runs shm_retried <"$dir/shm.runs"
echo "soak: $steps steps, $grpc_runs + $shm_runs evaluations alongside ($((grpc_retried + shm_retried))" \
  "retried: shards one Step apart or shard 0 down)," \
  "shard 0 restarted at step $half; shard 1: fds $fds_before -> $fds_end, threads $threads_before," \
  "at most $threads_first_half in the first half, $threads_end at the end; equal to the reference"
stop_server soak0
stop_server soak1
echo PASS
