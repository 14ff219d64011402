#!/usr/bin/env bash
# Fault tolerance and sharding with real processes on loopback (issue 4):
#   0. reference: one meft-param-server, an uninterrupted meft-worker train;
#   1. the server is killed with -9 after the worker wrote a checkpoint and restarted with
#      `--restore latest` on the same port: the worker reconnects, resumes and finishes;
#   2. the worker is killed with -9 and restarted with --resume;
#   3. SIGTERM on the worker writes a checkpoint and exits 0; --resume continues from it;
#   4. two server processes owning layers 0-1 and 2-3 (meft.servers).
# The final adapter and optimizer state (the server's checkpoint-30) and the worker's final
# trainer_state.json (its log_history's timings aside) must be byte-identical to the reference's
# (the sharded run's tensors, which lie in two files, tensor by tensor), and train_log.jsonl must
# hold every logged step once.
# Usage: fault_tolerance_test.sh MEFT_WORKER MEFT_PARAM_SERVER
set -euo pipefail
worker=$1
server_bin=$2
source "$(dirname "$0")/../system/lib.sh"
dir=$(mktemp -d)
trap cleanup EXIT

"$worker" make-facts --output "$dir/facts" --entities 8 --vocab-size 320 >/dev/null

cat >"$dir/run.yaml" <<YAML
model_dir: $dir/facts/model
data: {train: $dir/facts/train.jsonl, eval: $dir/facts/eval.jsonl, max_length: 64,
       template_without_input: "{instruction}"}
train: {max_steps: 30, micro_batch_size: 8, lr: 0.02, save_every: 5, log_every: 5}
meft: {reconnect_timeout_seconds: 60}
YAML

# train_in_background RUN PORT [FLAGS...]: a worker training into $dir/RUN/out, logging to
# $dir/RUN.log; sets worker_pid.
train_in_background() {
  local run=$1 port=$2
  shift 2
  "$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port" \
    --output-dir "$dir/$run/out" "$@" >"$dir/$run.log" 2>&1 &
  worker_pid=$!
}

# same_result RUN: the run's final checkpoints equal the reference's (paths of the run's own
# folders replaced by the reference's in trainer_state.json, timings left out).
same_result() {
  local run=$1
  same_checkpoints "$dir/ref" "$dir/$run" checkpoint-30 server ||
    fail "$run: final adapter or optimizer state differs from the uninterrupted run"
  untimed "$dir/$run/out/checkpoint-30/trainer_state.json" | sed "s#$dir/$run/#$dir/ref/#g" |
    cmp -s - <(untimed "$dir/ref/out/checkpoint-30/trainer_state.json") ||
    fail "$run: final trainer_state.json differs from the uninterrupted run"
  local want got
  want=$(grep -o '"step":[0-9]*' "$dir/ref/out/train_log.jsonl" | tr '\n' ' ')
  got=$(grep -o '"step":[0-9]*' "$dir/$run/out/train_log.jsonl" | tr '\n' ' ')
  [ "$got" = "$want" ] || fail "$run: train_log.jsonl steps '$got', the reference's '$want'"
}

# 0. The reference.
start_server ref 127.0.0.1:0 "$dir/ref/server" --adapter-layers 0-3
"$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port_ref" \
  --output-dir "$dir/ref/out" >"$dir/ref.log" 2>&1 || fail "reference run"
grep -q "trained 30 steps" "$dir/ref.log" || fail "reference summary"
stop_server ref

# 1. kill -9 of the server after the worker's checkpoint-5; restart it from its latest checkpoint.
start_server kill 127.0.0.1:0 "$dir/kill/server" --adapter-layers 0-3
train_in_background kill "$port_kill"
wait_for "$dir/kill/out/checkpoint-5/trainer_state.json" 120
kill -9 "${server_pids[kill]}"
wait "${server_pids[kill]}" 2>/dev/null || true
sleep 1
start_server kill "127.0.0.1:$port_kill" "$dir/kill/server" --adapter-layers 0-3 --restore latest
wait "$worker_pid" || fail "worker after the server restart"
worker_pid=""
grep -q "parameter server lost" "$dir/kill.log" || fail "kill: the worker never lost the server"
grep -q "server unavailable; retrying in" "$dir/kill.log" || fail "kill: no backoff logged"
restored=$(sed -n 's/.*resumed from .*checkpoint-[0-9]* at step \([0-9]*\).*/\1/p' "$dir/server-kill.log")
[ -n "$restored" ] || fail "kill: the restarted server did not restore its latest checkpoint"
grep -q "server back at step $restored; resuming from $dir/kill/out/checkpoint-$restored" \
  "$dir/kill.log" || fail "kill: no resume from checkpoint-$restored logged"
same_result kill
stop_server kill

# 2. kill -9 of the worker; restart it with --resume from its latest checkpoint.
start_server wkill 127.0.0.1:0 "$dir/wkill/server" --adapter-layers 0-3
train_in_background wkill "$port_wkill"
wait_for "$dir/wkill/out/checkpoint-10/trainer_state.json" 120
kill -9 "$worker_pid"
wait "$worker_pid" 2>/dev/null || true
worker_pid=""
[ -e "$dir/wkill/out/checkpoint-30" ] && fail "wkill: the worker finished before it was killed"
latest="$dir/wkill/out/checkpoint-$(ls "$dir/wkill/out" | sed -n 's/^checkpoint-\([0-9]*\)$/\1/p' |
  sort -n | tail -n 1)"
"$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port_wkill" \
  --output-dir "$dir/wkill/out" --resume "$latest" >"$dir/wkill-resume.log" 2>&1 ||
  fail "worker --resume after kill -9"
same_result wkill
stop_server wkill

# 3. SIGTERM on the worker: a checkpoint, exit 0, and --resume continues from it.
start_server term 127.0.0.1:0 "$dir/term/server" --adapter-layers 0-3
train_in_background term "$port_term"
wait_for "$dir/term/out/checkpoint-5/trainer_state.json" 120
kill -TERM "$worker_pid"
wait "$worker_pid" || fail "term: the worker did not exit 0 on SIGTERM"
worker_pid=""
stopped=$(sed -n 's/.*stop requested at step \([0-9]*\).*/\1/p' "$dir/term.log")
[ -n "$stopped" ] || fail "term: no 'stop requested' line"
[ "$stopped" -lt 30 ] || fail "term: the worker finished before SIGTERM"
[ -f "$dir/term/out/checkpoint-$stopped/trainer_state.json" ] ||
  fail "term: no checkpoint-$stopped written on SIGTERM"
"$worker" train --config "$dir/run.yaml" --meft-server "127.0.0.1:$port_term" \
  --output-dir "$dir/term/out" --resume "$dir/term/out/checkpoint-$stopped" \
  >"$dir/term-resume.log" 2>&1 || fail "term: --resume"
same_result term
stop_server term

# 4. Two server processes, each owning half the layers.
start_server shard0 127.0.0.1:0 "$dir/shard/server0" --adapter-layers 0-1
start_server shard1 127.0.0.1:0 "$dir/shard/server1" --adapter-layers 2-3
"$worker" train --config "$dir/run.yaml" --meft-servers "127.0.0.1:$port_shard0,127.0.0.1:$port_shard1" \
  --output-dir "$dir/shard/out" >"$dir/shard.log" 2>&1 || fail "sharded run"
grep -q '"server_checkpoints"' "$dir/shard/out/checkpoint-30/trainer_state.json" ||
  fail "shard: the worker checkpoint does not record both server checkpoints"
python3 - "$dir" <<'PY' || fail "shard: tensors differ from the single-server run"
import hashlib, json, struct, sys
d = sys.argv[1]
def tensors(*paths):
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            body = f.read()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], hashlib.sha256(body[a:b]).hexdigest())
    return out
for file in ("adapter_model.safetensors", "optimizer.safetensors"):
    ref = tensors(f"{d}/ref/server/checkpoint-30/{file}")
    got = tensors(f"{d}/shard/server0/checkpoint-30/{file}", f"{d}/shard/server1/checkpoint-30/{file}")
    if ref != got:
        bad = sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))
        print(f"{file}: {len(bad)} tensors differ, e.g. {bad[:3]}")
        sys.exit(1)
PY
# A missing shard is a clear error naming its address.
stop_server shard1
set +e
out=$("$worker" train --config "$dir/run.yaml" \
  --meft-servers "127.0.0.1:$port_shard0,127.0.0.1:$port_shard1" --output-dir "$dir/shard/x" 2>&1)
code=$?
set -e
[ $code -ne 0 ] && grep -q "meft.servers: cannot reach the parameter server at 127.0.0.1:$port_shard1" <<<"$out" ||
  fail "shard: missing shard: $code $out"
set +e
out=$("$worker" train --config "$dir/run.yaml" --meft-server 127.0.0.1:1 \
  --meft-servers "127.0.0.1:$port_shard0" 2>&1)
code=$?
set -e
[ $code -eq 2 ] && grep -q "meft.server and meft.servers are both set" <<<"$out" ||
  fail "both keys: $code $out"
stop_server shard0
echo "fault_tolerance_test: all checks passed"
