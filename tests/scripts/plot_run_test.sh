#!/usr/bin/env bash
# scripts/plot-run.py (given as $1) with the Python environment $MEFT_VENV: a PNG with the loss,
# learning-rate and (only when the log has eval_* figures) evaluation panels; clear errors naming
# the file and line for a missing or malformed train_log.jsonl.
set -euo pipefail
plot=$1
source "$(dirname "$0")/../require_venv.sh"
py=$MEFT_VENV/bin/python
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# png_size FILE: "WIDTH HEIGHT" from the PNG signature and IHDR chunk.
png_size() {
  [ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || return 1
  local b
  read -r -a b <<<"$(od -An -tu1 -j16 -N8 "$1")"
  echo "$(((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3])) $(((b[4] << 24) | (b[5] << 16) | (b[6] << 8) | b[7]))"
}

# A log as meft-worker writes it: every 10th step, evaluation at steps 20 and 40, a null loss
# (nlohmann::json writes a non-finite number as null) that is left out of the plot.
mkdir -p "$dir/run"
for step in 10 20 30 40 50; do
  eval=""
  case $step in 20) eval=', "eval_nq_substring_em": 0.25' ;; 40) eval=', "eval_nq_substring_em": 0.5' ;; esac
  loss=$(awk "BEGIN { print 3.0 / $step }")
  [ $step = 30 ] && loss=null
  echo "{\"epoch\": $step, \"grad_norm\": 1.5, \"learning_rate\": 0.001, \"loss\": $loss, \"step\": $step, \"tokens_per_second\": 90.5$eval}"
done >"$dir/run/train_log.jsonl"
out=$("$py" "$plot" "$dir/run" 2>&1) || fail "plot-run failed: $out"
grep -q "5 records (steps 10-50): loss, learning_rate, eval_nq_substring_em -> $dir/run/train_log.png" <<<"$out" ||
  fail "summary line: $out"
# 8 x 2.6 inches per panel at 100 dpi: three panels.
[ "$(png_size "$dir/run/train_log.png")" = "800 780" ] || fail "three-panel PNG: $(png_size "$dir/run/train_log.png" || echo not a PNG)"

# Without evaluation figures: two panels, into --output.
grep -v eval_ "$dir/run/train_log.jsonl" >"$dir/noeval.jsonl"
mkdir -p "$dir/noeval" && mv "$dir/noeval.jsonl" "$dir/noeval/train_log.jsonl"
out=$("$py" "$plot" "$dir/noeval" --output "$dir/two.png" 2>&1) || fail "plot-run without eval: $out"
grep -q "3 records (steps 10-50): loss, learning_rate -> $dir/two.png" <<<"$out" || fail "summary without eval: $out"
[ "$(png_size "$dir/two.png")" = "800 520" ] || fail "two-panel PNG: $(png_size "$dir/two.png" || echo not a PNG)"

# Bad input: exit status 1 and a message naming the file (and line).
expect_error() {  # RUN_DIR PATTERN
  local out code
  set +e
  out=$("$py" "$plot" "$1" 2>&1); code=$?
  set -e
  [ $code -eq 1 ] && grep -qF "$2" <<<"$out" || fail "expected exit 1 and '$2', got $code: $out"
  [ ! -e "$1/train_log.png" ] || fail "a PNG was written for a bad log in $1"
}
mkdir -p "$dir/empty"
expect_error "$dir/empty" "plot-run: error: $dir/empty/train_log.jsonl: not found"
mkdir -p "$dir/corrupt"
printf '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": \n' >"$dir/corrupt/train_log.jsonl"
expect_error "$dir/corrupt" "$dir/corrupt/train_log.jsonl:3: not JSON"
mkdir -p "$dir/nostep"
printf '{"step": 1, "loss": 2.0}\n{"loss": 1.5}\n' >"$dir/nostep/train_log.jsonl"
expect_error "$dir/nostep" "$dir/nostep/train_log.jsonl:2: field \"step\" is missing or not an integer"
mkdir -p "$dir/text"
printf '{"step": 1, "loss": "low"}\n' >"$dir/text/train_log.jsonl"
expect_error "$dir/text" "$dir/text/train_log.jsonl:1: field \"loss\" is not a number"
echo "plot_run_test: all checks passed"
