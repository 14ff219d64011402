#!/usr/bin/env bash
# Builds meft and runs every test: installs missing Debian packages, creates the pinned Python
# environment (scripts/python-env.sh), fetches and converts the real SmolLM2-135M model
# (scripts/fetch-model.sh; both cached under ~/.cache/meft, instant when up to date), configures
# with both paths (CMake cache variables MEFT_VENV and MEFT_SMOLLM2_DIR, which the tests receive
# as environment variables), builds (tests and benchmarks), and runs ctest. Exits non-zero on any
# failure. Warnings are errors when CI is set. Build folder: $MEFT_BUILD_DIR, default build/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build=${MEFT_BUILD_DIR:-build}
jobs=$(nproc)
werror=OFF
if [ -n "${CI:-}" ]; then werror=ON; fi

echo "== python environment and models"
venv=$(bash scripts/python-env.sh | tail -1)
smollm2=$(bash scripts/fetch-model.sh smollm2-135m | tail -1)
echo "venv: $venv; smollm2-135m: $smollm2"

echo "== configure ($build, warnings as errors: $werror)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEFT_WERROR="$werror" \
  -DMEFT_VENV="$venv" -DMEFT_SMOLLM2_DIR="$smollm2"
echo "== build"
cmake --build "$build" -j"$jobs"
echo "== test"
ctest --test-dir "$build" --output-on-failure -j"$jobs" --timeout 600
