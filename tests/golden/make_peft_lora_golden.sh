#!/usr/bin/env bash
# Writes tests/golden/peft/smollm2_lora/: checkpoint/, a LoRA trained by meft on
# SmolLM2-135M-Instruct (adapter_config.json, adapter_model.safetensors, trainer_state.json), and
# logits.json, Hugging Face PEFT's logits for it (scripts/python/peft_lora_logits.py). It runs the
# live check SmolLM2PeftTest.FreshCheckpointMatchesPeft, which trains, saves, compares meft's
# logits with PEFT's and, with MEFT_PEFT_GOLDEN_OUT set, keeps both here.
#
# usage: tests/golden/make_peft_lora_golden.sh BUILD_DIR SMOLLM2_DIR VENV
#   BUILD_DIR    a build with meft_worker_tests (cmake --build BUILD_DIR --target meft_worker_tests)
#   SMOLLM2_DIR  the folder scripts/fetch-model.sh smollm2-135m prints
#   VENV         the environment scripts/python-env.sh prints
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR SMOLLM2_DIR VENV}
model=${2:?usage: $0 BUILD_DIR SMOLLM2_DIR VENV}
venv=${3:?usage: $0 BUILD_DIR SMOLLM2_DIR VENV}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/peft/smollm2_lora"
MEFT_SMOLLM2_DIR=$model MEFT_VENV=$venv MEFT_PEFT_GOLDEN_OUT=$here/peft/smollm2_lora \
  "$build/tests/gpu_worker/meft_worker_tests" \
  --gtest_filter=SmolLM2PeftTest.FreshCheckpointMatchesPeft
du -sh "$here/peft/smollm2_lora"
