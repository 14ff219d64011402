#!/usr/bin/env bash
# Runs scripts/python/check_converted.py (given as $1) on the SmolLM2 folder $MEFT_SMOLLM2_DIR with
# the Python environment $MEFT_VENV; fails, naming what is missing, when either is not set up.
set -euo pipefail
check=$1
source "$(dirname "$0")/../require_venv.sh"
if [ -z "${MEFT_SMOLLM2_DIR:-}" ] || [ ! -f "$MEFT_SMOLLM2_DIR/config.json" ]; then
  echo "MEFT_SMOLLM2_DIR='${MEFT_SMOLLM2_DIR:-}' has no config.json: run" \
       "scripts/fetch-model.sh smollm2-135m and configure with -DMEFT_SMOLLM2_DIR=<the path it" \
       "prints> (scripts/test.sh does)" >&2
  exit 1
fi
exec "$MEFT_VENV/bin/python" "$check" --model-dir "$MEFT_SMOLLM2_DIR"
