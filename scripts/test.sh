#!/usr/bin/env bash
# Builds meft and runs every test: installs missing Debian packages, configures, builds (tests
# and benchmarks), and runs ctest. Exits non-zero on any failure. Warnings are errors when CI is
# set. Build folder: $MEFT_BUILD_DIR, default build/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build=${MEFT_BUILD_DIR:-build}
jobs=$(nproc)
werror=OFF
if [ -n "${CI:-}" ]; then werror=ON; fi

echo "== configure ($build, warnings as errors: $werror)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEFT_WERROR="$werror"
echo "== build"
cmake --build "$build" -j"$jobs"
echo "== test"
ctest --test-dir "$build" --output-on-failure -j"$jobs" --timeout 600
