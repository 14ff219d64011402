#!/usr/bin/env bash
# Builds meft and runs every test: installs missing Debian packages, creates the pinned Python
# environment (scripts/python-env.sh), fetches and converts the real SmolLM2-135M model
# (scripts/fetch-model.sh; both cached under ~/.cache/meft, instant when up to date), configures
# with both paths (CMake cache variables MEFT_VENV and MEFT_SMOLLM2_DIR, which the tests receive
# as environment variables), builds (tests and benchmarks), and runs ctest; then the CUDA build
# (scripts/build-cuda.sh: the whole tree again against PyPI's CUDA LibTorch, compile and link
# only), the device kit from it (scripts/gpu-kit.sh) and the kit's dry run on the CPU at the tiny
# shape, so the kit cannot rot between GPU loans. Exits non-zero on any failure. Warnings are
# errors when CI is set (the CUDA build always). Build folders: $MEFT_BUILD_DIR (default build/),
# $MEFT_CUDA_BUILD_DIR (default build-cuda/). MEFT_SKIP_CUDA=1 leaves out the CUDA part (for
# local runs; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build=${MEFT_BUILD_DIR:-build}
jobs=$(nproc)
werror=OFF
if [ -n "${CI:-}" ]; then werror=ON; fi
phase_start=$SECONDS
phase() {
  echo "== $1 (after $((SECONDS - phase_start)) s)"
}

phase "python environment and models"
venv=$(bash scripts/python-env.sh | tail -1)
smollm2=$(bash scripts/fetch-model.sh smollm2-135m | tail -1)
echo "venv: $venv; smollm2-135m: $smollm2"

phase "configure ($build, warnings as errors: $werror)"
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEFT_WERROR="$werror" "${launcher[@]}" \
  -DMEFT_VENV="$venv" -DMEFT_SMOLLM2_DIR="$smollm2"
phase "build"
cmake --build "$build" -j"$jobs"
phase "test"
ctest --test-dir "$build" --output-on-failure -j"$jobs" --timeout 600

if [ "${MEFT_SKIP_CUDA:-0}" = 1 ]; then
  phase "CUDA build, device kit and its dry run skipped (MEFT_SKIP_CUDA=1)"
  exit 0
fi
cuda_build=${MEFT_CUDA_BUILD_DIR:-build-cuda}
phase "CUDA build and device kit"
kit=${MEFT_KIT_DIR:-gpu-kit}
bash scripts/gpu-kit.sh
phase "device kit dry run ($kit/run.sh --dry-run)"
# The venv's torch stands in for the GPU machine's python3 torch.
MEFT_KIT_PYTHON="$venv/bin/python" \
  bash "$kit/run.sh" --dry-run "$cuda_build/kit-dry-run"
phase "done"
