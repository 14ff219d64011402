#!/usr/bin/env bash
# A cut network (issue 20): the worker and the server run in two network namespaces joined by a
# veth pair that this test creates, with addresses that exist only inside them (10.231.x.1 and
# .2 /30), so the link can be dropped without touching anything else on the host.
#   reference: an uninterrupted run over the link;
#   cut:       the link goes down mid-run (after the worker's first checkpoint) for longer than
#              the worker's call deadline and comes back; the worker waits with its backoff,
#              rolls back to its last checkpoint (the server restores the matching one) and
#              finishes; the final adapter, optimizer state and trainer_state.json (timings
#              aside) equal the reference's;
#   down:      the link goes down and stays down: the worker stops after
#              meft.reconnect_timeout_seconds with an error naming it, exit status 1, and its
#              checkpoints stay on disk.
# Needs CAP_NET_ADMIN (root in CI). Without it the test says so and is skipped (exit 77).
# Usage: cut_network_test.sh MEFT_WORKER MEFT_PARAM_SERVER
set -euo pipefail
worker=$1
server_bin=$2
source "$(dirname "$0")/lib.sh"
dir=$(mktemp -d)

tag=$$
ns_server="meft-srv-$tag"
ns_worker="meft-wrk-$tag"
net="10.231.$((tag % 250)).0"
server_ip=${net%.0}.1
worker_ip=${net%.0}.2
if ! ip netns add "$ns_server" 2>/dev/null; then
  echo "SKIP: cannot create network namespaces (needs CAP_NET_ADMIN and iproute2)"
  rm -rf "$dir"
  exit 77
fi
cleanup_network() {
  cleanup
  ip netns del "$ns_server" 2>/dev/null || true
  ip netns del "$ns_worker" 2>/dev/null || true
}
trap cleanup_network EXIT
ip netns add "$ns_worker"
ip link add "ms$tag" type veth peer name "mw$tag"
ip link set "ms$tag" netns "$ns_server"
ip link set "mw$tag" netns "$ns_worker"
ip -n "$ns_server" addr add "$server_ip/30" dev "ms$tag"
ip -n "$ns_worker" addr add "$worker_ip/30" dev "mw$tag"
for ns in "$ns_server" "$ns_worker"; do ip -n "$ns" link set lo up; done
ip -n "$ns_server" link set "ms$tag" up
ip -n "$ns_worker" link set "mw$tag" up
link() { ip -n "$ns_worker" link set "mw$tag" "$1"; }
in_worker_ns() { ip netns exec "$ns_worker" "$@"; }
SERVER_PREFIX="ip netns exec $ns_server"

"$worker" make-facts --output "$dir/facts" --entities 8 --vocab-size 320 >/dev/null
# A short call deadline, so that a call caught by the cut fails within seconds.
cat >"$dir/run.yaml" <<YAML
model_dir: $dir/facts/model
data: {train: $dir/facts/train.jsonl, eval: $dir/facts/eval.jsonl, max_length: 64,
       template_without_input: "{instruction}"}
train: {max_steps: 40, micro_batch_size: 8, lr: 0.02, save_every: 10, log_every: 5}
meft: {reconnect_timeout_seconds: 60, timeout_seconds: 3}
YAML

# train RUN [FLAGS...]: a worker in its namespace training against the server in the other one.
train() {
  local run=$1
  shift
  in_worker_ns "$worker" train --config "$dir/run.yaml" --meft-server "$server_ip:$port" \
    --output-dir "$dir/$run/out" "$@" >"$dir/$run.log" 2>&1
}

# 0. The reference.
start_server ref "$server_ip:0" "$dir/ref/server" --adapter-layers 0-3 --insecure
port=$port_ref
train ref || fail "reference run"
stop_server ref

# 1. The link goes down after checkpoint-10 for 15 s (several 3 s deadlines: the failed call, the
#    probe, then backoff), then comes back.
start_server cut "$server_ip:0" "$dir/cut/server" --adapter-layers 0-3 --insecure
port=$port_cut
train cut &
worker_pid=$!
wait_for "$dir/cut/out/checkpoint-10/trainer_state.json" 120
link down
sleep 15
link up
wait "$worker_pid" || fail "cut: the worker did not finish after the link came back"
worker_pid=""
grep -q "parameter server lost" "$dir/cut.log" || fail "cut: the worker never noticed the cut"
grep -q "server unavailable; retrying in" "$dir/cut.log" || fail "cut: no backoff logged"
grep -q "resuming from $dir/cut/out/checkpoint-" "$dir/cut.log" || fail "cut: no resume logged"
same_checkpoints "$dir/ref" "$dir/cut" checkpoint-40 server ||
  fail "cut: final adapter or optimizer state differs from the uninterrupted run"
untimed "$dir/cut/out/checkpoint-40/trainer_state.json" | sed "s#$dir/cut/#$dir/ref/#g" |
  cmp -s - <(untimed "$dir/ref/out/checkpoint-40/trainer_state.json") ||
  fail "cut: final trainer_state.json differs from the uninterrupted run"
stop_server cut

# 2. The link goes down and stays down: the worker gives up after reconnect_timeout_seconds.
start_server down "$server_ip:0" "$dir/down/server" --adapter-layers 0-3 --insecure
port=$port_down
started=$SECONDS
train down --meft-reconnect-timeout-seconds 6 &
worker_pid=$!
wait_for "$dir/down/out/checkpoint-10/trainer_state.json" 120
link down
set +e
wait "$worker_pid"
code=$?
set -e
worker_pid=""
link up
[ "$code" -eq 1 ] || fail "down: exit status $code, expected 1"
grep -q "did not come back within meft.reconnect_timeout_seconds = 6" "$dir/down.log" ||
  fail "down: no error naming meft.reconnect_timeout_seconds"
[ -f "$dir/down/out/checkpoint-10/trainer_state.json" ] || fail "down: checkpoint-10 is gone"
[ -d "$dir/down/server/checkpoint-10" ] || fail "down: the server's checkpoint-10 is gone"
stop_server down
echo "cut_network_test: all checks passed ($((SECONDS - started)) s for the link that stayed down)"
