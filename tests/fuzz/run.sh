#!/usr/bin/env bash
# Builds the libFuzzer targets (a separate clang project, see tests/fuzz/CMakeLists.txt) into
# ${MEFT_BUILD_DIR:-build}/fuzz and runs each one for MEFT_FUZZ_SECONDS (default 30) seconds.
# Each target first replays tests/fuzz/regressions/<target>/ (inputs that once crashed it), then
# fuzzes from tests/fuzz/corpus/<target>/. New corpus entries go to the build folder, never into
# the source tree. Exits non-zero if any target crashes, leaks or times out; the crashing input
# is left in the build folder as crash-*/leak-*/timeout-*.
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${MEFT_BUILD_DIR:-build}/fuzz"
seconds="${MEFT_FUZZ_SECONDS:-30}"
jobs="${MEFT_FUZZ_JOBS:-2}"
targets=(safetensors_fuzzer tensor_codec_fuzzer param_server_request_fuzzer tokenizer_fuzzer)

mkdir -p "$build"
build="$(cd "$build" && pwd)"
CC="${CC:-clang}" CXX="${CXX:-clang++}" cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}" >"$build/build.log" 2>&1 || {
  tail -n 60 "$build/build.log"
  echo "fuzz: build failed (log: $build/build.log)"
  exit 1
}

failed=0
for t in "${targets[@]}"; do
  exe="$build/$t"
  work="$build/work/$t"
  mkdir -p "$work/corpus" "$work/artifacts"
  log="$work/fuzz.log"
  common=(-rss_limit_mb=2048 -timeout=10 -artifact_prefix="$work/artifacts/")

  # Regressions first: every kept input must run cleanly.
  reg="$src/regressions/$t"
  if [ -d "$reg" ] && [ -n "$(ls -A "$reg" 2>/dev/null)" ]; then
    if ! "$exe" "${common[@]}" "$reg"/* >"$work/regressions.log" 2>&1; then
      tail -n 40 "$work/regressions.log"
      echo "fuzz: $t FAILED on a regression input (log: $work/regressions.log)"
      failed=1
      continue
    fi
  fi

  seeds=("$src/corpus/$t")
  [ -d "$reg" ] && seeds+=("$reg")
  start=$(date +%s)
  if "$exe" "${common[@]}" -max_total_time="$seconds" -print_final_stats=1 \
      "$work/corpus" "${seeds[@]}" >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=1
    tail -n 60 "$log"
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || true)
  echo "fuzz: $t $status runs=${runs:-?} cov=${cov:-?} time=$(( $(date +%s) - start ))s" \
       "(log: $log)"
  if [ "$status" = FAILED ]; then
    ls "$work/artifacts" | sed "s|^|fuzz:   artifact $work/artifacts/|"
  fi
done
exit "$failed"
