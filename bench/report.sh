#!/usr/bin/env bash
# The benchmark report (issue 5): runs the real meft-param-server and meft-worker on the built-in
# synthetic facts benchmark (meft-worker make-facts) with generated YAML configs, collects every
# run's numbers as JSON lines under bench/report/data/, and has bench/report/make_report.py write
# the PNG figures and bench/report/REPORT.md.
#
#   bench/report.sh [--size smoke|default|full] [--only EXP[,EXP...]] [--no-build] [--report-only]
#
# Experiments (in this order): capacity efficiency memory topk experts batch variants.
# Sizes: `default` is budgeted for <= 30 minutes on an idle 2-core CPU machine; `smoke` is a
# few minutes (fewer steps and runs, for checking the harness); `full` trains longer.
# Environment: MEFT_BUILD_DIR (default build-report), MEFT_REPORT_RUNS (scratch, default
# runs/report; model files, checkpoints and logs land there, never committed),
# MEFT_REPORT_STEPS (overrides every experiment's training steps; for testing the harness).
set -euo pipefail
cd "$(dirname "$0")/.."
{ # The whole script is one compound command, read before it runs: editing this file while it
  # runs cannot change what it does.

size=default
only=""
build=1
report_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --report-only) report_only=1; shift ;;
    -h | --help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "bench/report.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------------------------------------
# Sizes. R is the adapter size (key-value pairs per layer) of the capacity claim; every
# experiment's training budget is STEPS optimizer steps of BATCH questions.
case "$size" in
  smoke)
    STEPS=150; EFF_STEPS=20; BATCH=16; R=640
    CAP_PARALLEL="32 128 640"; CAP_LORA="73 366"; CAP_MEFT="128 640"
    TOPK_LIST="4 16 64"; EXPERT_LIST="1 80 640"; BATCH_LIST="1 4 16"
    MEM_ROWS="640 65536" ;;
  default)
    STEPS=600; EFF_STEPS=40; BATCH=16; R=640
    CAP_PARALLEL="32 128 640 2560"; CAP_LORA="18 73 366"; CAP_MEFT="128 640 2560"
    TOPK_LIST="4 16 64 640"; EXPERT_LIST="1 10 80 640"; BATCH_LIST="1 2 4 8 16 32"
    MEM_ROWS="640 16384 65536 262144" ;;
  full)
    STEPS=1500; EFF_STEPS=100; BATCH=16; R=640
    CAP_PARALLEL="8 32 128 640 2560"; CAP_LORA="5 18 73 366 1463"; CAP_MEFT="128 640 2560"
    TOPK_LIST="1 4 16 64 640"; EXPERT_LIST="1 10 40 80 160 640"; BATCH_LIST="1 2 4 8 16 32 64"
    MEM_ROWS="640 16384 65536 262144" ;;
  *) echo "bench/report.sh: --size must be smoke, default or full, not '$size'" >&2; exit 2 ;;
esac
TOPK=64  # the paper's K
# MEFT_REPORT_STEPS overrides the training steps of every experiment (for testing the harness).
if [ -n "${MEFT_REPORT_STEPS:-}" ]; then STEPS=$MEFT_REPORT_STEPS; EFF_STEPS=$MEFT_REPORT_STEPS; fi

out_dir=bench/report
runs=${MEFT_REPORT_RUNS:-runs/report}
bdir=${MEFT_BUILD_DIR:-build-report}
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3  # Debian's, where python3-matplotlib lives

if [ "$report_only" = 1 ]; then
  exec "$py" "$out_dir/make_report.py" --size "$size"
fi

if [ "$build" = 1 ]; then
  bash scripts/install-deps.sh
  echo "== build ($bdir)"
  cmake -S . -B "$bdir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEFT_BUILD_TESTS=OFF >/dev/null
  cmake --build "$bdir" -j"$(nproc)" --target meft-param-server meft-worker
fi
server_bin=$bdir/param_server/meft-param-server
worker_bin=$bdir/gpu_worker/meft-worker
for b in "$server_bin" "$worker_bin"; do
  [ -x "$b" ] || { echo "bench/report.sh: $b is missing (build it, or drop --no-build)" >&2; exit 1; }
done

mkdir -p "$runs" "$out_dir/data" "$out_dir/configs"
"$py" "$out_dir/make_report.py" --machine  # cores, CPU, BLAS, date, load: data/machine.json
facts=$runs/facts
if [ ! -f "$facts/model/model.safetensors" ]; then
  echo "== make-facts ($facts)"
  "$worker_bin" make-facts --output "$facts"
fi
# Benchmark shape (make-facts defaults): 4 layers, d = 64.
LAYERS=4
DIM=64

wants() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

# ---------------------------------------------------------------------------------------------
# One run. run_one EXP NAME METHOD key=value...
# Keys: r (parallel rows / meft rows), rank (lora), top_k, experts, n_probe, mode, gated,
# prefetch, overlap, steps, batch, eval (1 = evaluate after training).
# Writes configs/EXP/NAME.worker.yaml (+ NAME.server.yaml for meft), keeps logs and metrics in
# $runs/EXP/NAME/, and appends one JSON line to data/EXP.jsonl (collect.py).
server_pid=""
worker_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
stop_all() {
  if [ -n "$worker_pid" ]; then pkill -P "$worker_pid" 2>/dev/null || true; fi
  stop_server
}
trap stop_all EXIT

run_one() {
  local exp=$1 name=$2 method=$3
  shift 3
  local r=$R rank=0 top_k=$TOPK experts="" n_probe=8 mode=per_token gated=true prefetch=0
  local steps=$STEPS batch=$BATCH do_eval=1 overlap=true kv
  for kv in "$@"; do
    case "${kv%%=*}" in
      r) r=${kv#*=} ;; rank) rank=${kv#*=} ;; top_k) top_k=${kv#*=} ;;
      experts) experts=${kv#*=} ;; n_probe) n_probe=${kv#*=} ;; mode) mode=${kv#*=} ;;
      gated) gated=${kv#*=} ;; prefetch) prefetch=${kv#*=} ;; steps) steps=${kv#*=} ;;
      batch) batch=${kv#*=} ;; eval) do_eval=${kv#*=} ;; overlap) overlap=${kv#*=} ;;
      *) echo "run_one: unknown key $kv" >&2; return 2 ;;
    esac
  done
  # E = r / 16 unless given: n_k = 16 keys per expert, so the n_probe = 8 probed experts offer
  # 128 candidates per token, twice top_k = 64 (the server's own default, 4 ceil(sqrt(r)), gives
  # n_k = 5 at r = 640: 40 candidates, fewer than top_k).
  [ -n "$experts" ] || experts=$((r >= 16 ? r / 16 : 1))
  local cfg_dir=$out_dir/configs/$exp rdir=$runs/$exp/$name
  rm -rf "$rdir"
  mkdir -p "$cfg_dir" "$rdir"
  local wcfg=$cfg_dir/$name.worker.yaml scfg=$cfg_dir/$name.server.yaml
  rm -f "$scfg"
  {
    echo "# bench/report.sh --size $size: experiment $exp, run $name"
    echo "model_dir: $facts/model"
    echo "output_dir: $rdir/out"
    echo "metrics: {listen: \"127.0.0.1:0\", linger_seconds: 2}"
    echo "data:"
    echo "  train: $facts/train.jsonl"
    echo "  eval: $facts/eval.jsonl"
    echo "  max_length: 64"
    echo "  template_without_input: \"{instruction}\""
    echo "adapter:"
    echo "  type: $method"
    case "$method" in
      parallel) echo "  rows: $r" ;;
      lora) echo "  lora_rank: $rank"; echo "  lora_alpha: $rank" ;;
    esac
    if [ "$method" = meft ]; then
      echo "meft: {server: \"127.0.0.1:PORT\", prefetch_layers: $prefetch, overlap: $overlap}"
    fi
    echo "train:"
    echo "  max_steps: $steps"
    echo "  micro_batch_size: $batch"
    echo "  lr: 0.02"
    echo "  warmup_ratio: 0.02"
    echo "  log_every: $((steps / 4 > 0 ? steps / 4 : 1))"
    echo "eval:"
    echo "  metrics: nq_substring_em"
    echo "  max_new_tokens: 8"
  } >"$wcfg"

  local port="" murl="" wflags=()
  if [ "$method" = meft ]; then
    {
      echo "# bench/report.sh --size $size: experiment $exp, run $name"
      echo "listen: 127.0.0.1:0"
      echo "metrics_port: 0"
      echo "adapter:"
      echo "  layers: 0-$((LAYERS - 1))"
      echo "  rows: $r"
      echo "  dim: $DIM"
      echo "  experts: $experts"
      echo "  n_probe: $n_probe"
      echo "  top_k: $top_k"
      echo "  mode: $mode"
      echo "  gated: $gated"
      echo "checkpoint_dir: $rdir/server"
    } >"$scfg"
    : >"$rdir/server.log"
    "$server_bin" --config "$scfg" >"$rdir/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 600); do
      port=$(sed -n 's/.*serving meft.v1.ParamServer on .* (port \([0-9]*\)).*/\1/p' "$rdir/server.log")
      [ -n "$port" ] && break
      kill -0 "$server_pid" 2>/dev/null || { cat "$rdir/server.log"; return 1; }
      sleep 0.1
    done
    [ -n "$port" ] || { echo "$exp/$name: the parameter server did not start" >&2; return 1; }
    murl=$(sed -n 's/.*metrics on \(http[^ ]*\).*/\1/p' "$rdir/server.log" | head -1)
    wflags=(--meft-server "127.0.0.1:$port")
  fi

  echo "== $exp/$name: $method r=$r rank=$rank top_k=$top_k E=$experts n_probe=$n_probe $mode gated=$gated prefetch=$prefetch, $steps steps x $batch"
  local t0 t1 t2
  t0=$(date +%s.%N)
  : >"$rdir/train.log"  # exists before the loop below reads it
  /usr/bin/time -f '%M %e' -o "$rdir/worker.time" \
    "$worker_bin" train --config "$wcfg" "${wflags[@]}" >"$rdir/train.log" 2>&1 &
  local wpid=$! wurl=""
  worker_pid=$wpid  # /usr/bin/time; the worker is its child
  # Scrape the worker's metrics once training is done (it lingers 2 s for that).
  while kill -0 "$wpid" 2>/dev/null; do
    [ -n "$wurl" ] || wurl=$(sed -n 's/.*worker metrics on \(http[^ ]*\).*/\1/p' "$rdir/train.log" | head -1)
    if grep -q '^trained ' "$rdir/train.log"; then
      [ -n "$wurl" ] && curl -sf "$wurl" >"$rdir/worker.metrics" || true
      break
    fi
    sleep 0.2
  done
  wait "$wpid" || { echo "$exp/$name: training failed" >&2; tail -20 "$rdir/train.log" >&2; stop_server; return 1; }
  worker_pid=""
  t1=$(date +%s.%N)
  if [ -n "$murl" ]; then
    curl -sf "$murl" >"$rdir/server.metrics" || true
    grep -E '^Vm(HWM|RSS)' "/proc/$server_pid/status" >"$rdir/server.status" || true
  fi
  if [ "$do_eval" = 1 ]; then
    local ck=()
    [ "$method" = meft ] || ck=(--checkpoint "$rdir/out/checkpoint-$steps")
    "$worker_bin" eval --config "$wcfg" "${wflags[@]}" "${ck[@]}" --output "$rdir/eval" \
      >"$rdir/eval.log" 2>&1 || { echo "$exp/$name: eval failed" >&2; tail -20 "$rdir/eval.log" >&2; stop_server; return 1; }
  fi
  t2=$(date +%s.%N)
  stop_server
  "$py" "$out_dir/collect.py" --run-dir "$rdir" --out "$out_dir/data/$exp.jsonl" \
    --config "$wcfg" --server-config "$([ "$method" = meft ] && echo "$scfg")" \
    exp="$exp" name="$name" method="$method" r="$r" rank="$rank" top_k="$top_k" \
    experts="$experts" n_probe="$n_probe" mode="$mode" gated="$gated" prefetch="$prefetch" \
    overlap="$overlap" steps="$steps" batch="$batch" layers="$LAYERS" dim="$DIM" size="$size" \
    train_wall_s="$(echo "$t1 - $t0" | bc)" eval_wall_s="$(echo "$t2 - $t1" | bc)"
  rm -rf "$rdir/server" "$rdir/out"  # checkpoints (up to GBs); the logs and metrics stay
}

begin_exp() {  # begin_exp EXP: clears its data and configs, times it
  rm -f "$out_dir/data/$1.jsonl"
  rm -rf "$out_dir/configs/$1"
  exp_start=$(date +%s)
  exp_load=$(cut -d' ' -f1-3 /proc/loadavg)
}
end_exp() {  # the experiment's wall time, data/timing/EXP.json
  mkdir -p "$out_dir/data/timing"
  echo "{\"exp\": \"$1\", \"wall_s\": $(($(date +%s) - exp_start)), \"size\": \"$size\"," \
    "\"load_start\": \"$exp_load\", \"load_end\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" \
    >"$out_dir/data/timing/$1.json"
}

# 1. Capacity (Fig. 1, Table 2): EM against adapter size.
if wants capacity; then
  begin_exp capacity
  for r in $CAP_PARALLEL; do run_one capacity "parallel-r$r" parallel r="$r"; done
  for k in $CAP_LORA; do run_one capacity "lora-rank$k" lora rank="$k"; done
  for r in $CAP_MEFT; do run_one capacity "meft-r$r" meft r="$r"; done
  end_exp capacity
fi

# 2. Efficiency (Fig. 5) and communication: short runs at r = R, no evaluation, server calls
# synchronous (meft.overlap: false) so that compute, server time and transport add up.
if wants efficiency; then
  begin_exp efficiency
  e=(steps="$EFF_STEPS" eval=0 overlap=false)
  run_one efficiency meft meft "${e[@]}"
  run_one efficiency meft-no-experts meft experts=1 n_probe=1 gated=false "${e[@]}"
  run_one efficiency meft-no-sparsity meft mode=union top_k="$R" n_probe=1000000 "${e[@]}"
  run_one efficiency meft-neither meft experts=1 n_probe=1 gated=false mode=union top_k="$R" \
    "${e[@]}"
  run_one efficiency parallel parallel "${e[@]}"
  end_exp efficiency
fi

# 3. Memory: the server's peak RSS against the adapter size (DESIGN §4's 16 B per parameter).
if wants memory; then
  begin_exp memory
  for r in $MEM_ROWS; do run_one memory "meft-r$r" meft r="$r" steps=10 eval=0; done
  end_exp memory
fi

# 4. Sweeps at r = R (Fig. 6, 7, 8 and the mode/gating/prefetch variants).
if wants topk; then
  begin_exp topk
  # E = R / 16 (n_k = 16); n_probe = max(8, top_k / 8): at least 2 top_k candidates per token
  # (all r keys once n_probe reaches E).
  for k in $TOPK_LIST; do
    run_one topk "meft-topk$k" meft top_k="$k" n_probe=$((k / 8 > 8 ? k / 8 : 8))
  done
  end_exp topk
fi
if wants experts; then
  begin_exp experts
  # n_probe = max(8, ceil(2 top_k E / R)): at least 2 top_k candidate keys per token.
  for e in $EXPERT_LIST; do
    np=$(((2 * TOPK * e + R - 1) / R)); [ "$np" -lt 8 ] && np=8
    run_one experts "meft-E$e" meft experts="$e" n_probe="$np"
  done
  end_exp experts
fi
if wants batch; then
  begin_exp batch
  for b in $BATCH_LIST; do run_one batch "meft-batch$b" meft batch="$b" steps=10 eval=0; done
  end_exp batch
fi
if wants variants; then
  begin_exp variants
  run_one variants meft-union meft mode=union
  run_one variants meft-ungated meft gated=false
  run_one variants meft-prefetch1 meft prefetch=1
  end_exp variants
fi

"$py" "$out_dir/make_report.py" --size "$size"
exit
}
