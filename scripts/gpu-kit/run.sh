#!/usr/bin/env bash
# The device kit's entry point (copied into the kit by scripts/gpu-kit.sh). On a GPU machine
# (H100/H200 class, 16 cores, 128 GiB, python3 with torch 2.11.0+cu130, no Debian -dev packages):
#
#   gpu-kit/run.sh OUTDIR              # (1) the CUDA tests, (2) the 7B-shape benchmark
#   gpu-kit/run.sh --dry-run OUTDIR    # the same on the CPU at the tiny shape (the test command)
#
# Writes OUTDIR/results.json and OUTDIR/results.md (one row per step), OUTDIR/run.log (everything
# printed), and each step's own files under OUTDIR/tests/ and OUTDIR/bench/. Exits 0 when every
# step passed, 1 when one failed or ran out of time, 2 on a setup error (no torch, wrong torch,
# a library missing) after writing what it knows.
#
# LibTorch is not in the kit: the lib/ folder of python3's torch (and the nvidia wheels' lib/
# folders beside it) is put on LD_LIBRARY_PATH for the kit's programs only, with the kit's lib/
# (the SentencePiece module) and the Debian libraries the machine lacks (debian-libs.tar.xz,
# unpacked into a temporary folder) in front.
#
# Time: everything within MEFT_KIT_BUDGET_S (default 470 s, under the 8-minute loan); each step
# is cut by `timeout` at its own cap or at what is left, whichever is first.
#
# Environment: MEFT_KIT_PYTHON (default python3: whose torch to use), MEFT_KIT_SHAPE (7b or tiny;
# default 7b, tiny with --dry-run), MEFT_KIT_BUDGET_S.
set -uo pipefail

kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
rm -rf "$out/tests" "$out/bench" "$out/steps.tsv" "$out/results.json" "$out/results.md"
mkdir -p "$out/tests" "$out/bench"
exec > >(tee "$out/run.log") 2>&1

start=$(date +%s)
budget=${MEFT_KIT_BUDGET_S:-470}
deadline=$((start + budget))
if [ "$dry_run" = 1 ]; then shape=${MEFT_KIT_SHAPE:-tiny}; else shape=${MEFT_KIT_SHAPE:-7b}; fi
python=${MEFT_KIT_PYTHON:-python3}
mode=gpu
[ "$dry_run" = 1 ] && mode=dry-run

say() { echo "[run.sh $(($(date +%s) - start))s] $*"; }
# One line per step for results.py: name, status, seconds, detail.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$out/steps.tsv"; }
left() { echo $((deadline - $(date +%s))); }
# The smaller of a step's cap and the time left (at least 1 s, so `timeout` always cuts).
cap() {
  local l
  l=$(left)
  if [ "$l" -lt "$1" ]; then echo $((l > 1 ? l : 1)); else echo "$1"; fi
}
finish() {
  "$python" "$kit/results.py" --kit "$kit" --out "$out" --mode "$mode" --shape "$shape" \
    --seconds $(($(date +%s) - start)) --budget "$budget" ||
    echo "run.sh: results.py failed; the raw step list is $out/steps.tsv"
  say "results: $out/results.json, $out/results.md"
}

say "kit $kit, mode $mode, shape $shape, budget ${budget}s, output $out"

# --- Setup: python3's torch, the library path, every kit binary resolvable -------------------
if ! torch_info=$("$python" -c 'import os, torch
print(os.path.dirname(torch.__file__)); print(torch.__version__); print(torch.version.cuda or "")' 2>&1); then
  say "setup: $python cannot import torch: $torch_info"
  record setup failed 0 "no torch in $python"
  finish
  exit 2
fi
torch_dir=$(sed -n 1p <<<"$torch_info")
torch_version=$(sed -n 2p <<<"$torch_info")
torch_cuda=$(sed -n 3p <<<"$torch_info")
kit_torch=$(sed -n 's/^torch_version=//p' "$kit/kit.env")
say "torch $torch_version (CUDA ${torch_cuda:-none}) at $torch_dir; the kit was built against $kit_torch"
# LibTorch's C++ ABI changes between releases: the local version must be the kit's (the
# "+cu130"-style suffix may differ between equal builds from different indexes).
if [ "${torch_version%%+*}" != "${kit_torch%%+*}" ] || [ -z "$torch_cuda" ]; then
  say "setup: the kit needs torch ${kit_torch} with CUDA; $python has $torch_version (CUDA ${torch_cuda:-none})"
  record setup failed 0 "torch $torch_version, kit built for $kit_torch"
  finish
  exit 2
fi
# The Debian libraries, unpacked with python3 (its tarfile reads xz everywhere) into a temporary
# folder that is removed at exit, so they never land in OUTDIR.
libdir=$(mktemp -d "${TMPDIR:-/tmp}/meft-kit-lib.XXXXXX") || exit 2
trap 'rm -rf "$libdir"' EXIT
if ! unpacked=$("$python" - "$kit/debian-libs.tar.xz" "$libdir" 2>&1 <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    try:
        tar.extractall(sys.argv[2], filter="data")
    except TypeError:  # a python3 without extraction filters
        tar.extractall(sys.argv[2])
PY
); then
  say "setup: cannot unpack $kit/debian-libs.tar.xz: $unpacked"
  record setup failed $(($(date +%s) - start)) "debian-libs.tar.xz did not unpack"
  finish
  exit 2
fi
libpath="$kit/lib:$libdir:$torch_dir/lib"
for d in "$(dirname "$torch_dir")"/nvidia/*/lib; do
  [ -d "$d" ] && libpath+=":$d"
done
libpath+="${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The kit's programs only: python3 and the system tools keep their own libraries.
kenv() { env LD_LIBRARY_PATH="$libpath" "$@"; }

if command -v ldd >/dev/null; then
  missing=$(for f in "$kit"/bin/* "$kit"/tests/* "$kit"/lib/*.so* "$libdir"/*.so*; do
    # "libx.so => not found", or a glibc/libstdc++ older than the build machine's ("version
    # `GLIBCXX_3.4.30' not found").
    kenv ldd "$f" 2>&1 | grep 'not found' | sed "s|^[[:space:]]*|${f##*/}: |"
  done | sort -u)
  if [ -n "$missing" ]; then
    say "setup: libraries not found:"
    echo "$missing"
    record setup failed $(($(date +%s) - start)) "missing: $(tr '\n' ' ' <<<"$missing")"
    finish
    exit 2
  fi
fi

# Both binaries start (LibTorch with CUDA, gRPC, the Debian libraries all load).
for b in meft-worker meft-param-server; do
  if ! help=$(kenv "$kit/bin/$b" --help 2>&1); then
    say "setup: $b does not start:"
    echo "$help" | tail -n 20
    record setup failed $(($(date +%s) - start)) "$b --help failed"
    finish
    exit 2
  fi
done

gpus=""
if command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpus.csv" 2>/dev/null
fi
if [ "$dry_run" = 0 ] && [ -z "$gpus" ]; then
  say "setup: no GPU visible to nvidia-smi; use --dry-run on a machine without one"
  record setup failed $(($(date +%s) - start)) "no GPU visible"
  finish
  exit 2
fi
say "GPUs: ${gpus:-none}"
record setup passed $(($(date +%s) - start)) "torch $torch_version; ${gpus:-no GPU}"

status=0

# --- (1) The CUDA tests ------------------------------------------------------------------------
# Every test whose suite or name contains "Cuda", from every test program in the kit. They skip
# without a GPU (the dry run); on the GPU machine a skipped one means CUDA did not work there,
# which fails the step. MEFT_GOLDEN_DIR names the kit's copy of tests/golden/: the path compiled
# into the test programs is the build machine's.
t0=$(date +%s)
filter='*Cuda*'
# The SmolLM2 golden needs the converted model (about 540 MB), which the kit cannot carry: it
# runs only when MEFT_SMOLLM2_DIR names a copy on the GPU machine, and fails there if it is wrong.
if [ -z "${MEFT_SMOLLM2_DIR:-}" ]; then
  filter="$filter:-CudaGoldenTest.SmolLm2InBf16MatchesTransformers"
  say "tests: CudaGoldenTest.SmolLm2InBf16MatchesTransformers left out (MEFT_SMOLLM2_DIR not set)"
fi
tests_rc=0
ran_any=0
for exe in "$kit"/tests/*; do
  [ -x "$exe" ] || continue
  name=${exe##*/}
  say "tests: $name --gtest_filter=$filter"
  ran_any=1
  kenv MEFT_GOLDEN_DIR="$kit/golden" timeout -k 10 "$(cap 240)" "$exe" --gtest_filter="$filter" \
    --gtest_output="json:$out/tests/$name.json" >"$out/tests/$name.log" 2>&1
  rc=$?
  tail -n 40 "$out/tests/$name.log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "tests: $name ran out of time"
    tests_rc=124
  elif [ "$rc" != 0 ]; then
    tests_rc=1
  fi
done
t1=$(date +%s)
if [ "$ran_any" = 0 ]; then
  record cuda_tests skipped $((t1 - t0)) "no test program with CUDA tests in this kit"
  [ "$dry_run" = 0 ] && status=1
else
  skipped=$(grep -l '"result": "SKIPPED"' "$out"/tests/*.json 2>/dev/null | wc -l)
  if [ "$tests_rc" = 124 ]; then
    record cuda_tests timeout $((t1 - t0)) "cut at the time limit"
    status=1
  elif [ "$tests_rc" != 0 ]; then
    record cuda_tests failed $((t1 - t0)) "see tests/*.log"
    status=1
  elif [ "$dry_run" = 0 ] && [ "$skipped" != 0 ]; then
    record cuda_tests failed $((t1 - t0)) "tests skipped on a GPU machine: CUDA unavailable to LibTorch"
    status=1
  else
    record cuda_tests passed $((t1 - t0)) ""
  fi
fi

# --- (2) The 7B-shape benchmark ----------------------------------------------------------------
# meft_gpu_shape_bench starts its own meft-param-server processes (the kit's, on loopback, so
# the worker's client carries tensors through the shared-memory arena) and writes results.json
# and results.md into --out. At the tiny shape of the dry run it runs on the CPU.
t0=$(date +%s)
bench="$kit/bin/meft_gpu_shape_bench"
bench_args=(--shape "$shape" --out "$out/bench" --server-binary "$kit/bin/meft-param-server")
[ "$dry_run" = 1 ] && bench_args+=(--device cpu)
if [ ! -x "$bench" ]; then
  if grep -qx 'bench=0' "$kit/kit.env"; then
    say "bench: this tree has no meft_gpu_shape_bench target"
    record benchmark skipped 0 "meft_gpu_shape_bench is not part of the tree this kit was built from"
    [ "$dry_run" = 0 ] && status=1
  else
    say "bench: $bench missing from the kit"
    record benchmark failed 0 "meft_gpu_shape_bench missing from the kit"
    status=1
  fi
else
  # What is left, less a few seconds for the results.
  limit=$(($(left) - 10))
  [ "$limit" -lt 1 ] && limit=1
  say "bench: meft_gpu_shape_bench ${bench_args[*]} (at most ${limit} s)"
  kenv timeout -k 10 "$limit" "$bench" "${bench_args[@]}" 2>&1 | tee "$out/bench/bench.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record benchmark timeout $(($(date +%s) - t0)) "cut at the time limit (bench/bench.log)"
    status=1
  elif [ "$rc" != 0 ]; then
    record benchmark failed $(($(date +%s) - t0)) "exit $rc (bench/bench.log)"
    status=1
  elif [ ! -s "$out/bench/results.json" ]; then
    record benchmark failed $(($(date +%s) - t0)) "no bench/results.json written"
    status=1
  else
    record benchmark passed $(($(date +%s) - t0)) ""
  fi
fi

finish
say "done in $(($(date +%s) - start)) s, $([ "$status" = 0 ] && echo passed || echo FAILED)"
exit "$status"
