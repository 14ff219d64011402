#!/usr/bin/env bash
# Creates (once) the cached Python virtual environment for the tools around meft and prints its
# path as the last line. Everything comes from scripts/python/requirements.txt, where every
# package is pinned; the environment is rebuilt when that file changes. pip's own cache keeps
# the wheels between runs, so a rebuild downloads nothing new.
#
#   venv=$(scripts/python-env.sh | tail -1); "$venv/bin/python" ...
#
# Location: $MEFT_VENV, default ~/.cache/meft/venv. Needs python3 >= 3.10 with venv and PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
req="$here/python/requirements.txt"
venv=${MEFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meft/venv}
python=${MEFT_PYTHON:-python3}

want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -f "$venv/.meft-requirements" ] && [ "$(cat "$venv/.meft-requirements")" = "$want" ]; then
  echo "python-env: $venv is up to date" >&2
  echo "$venv"
  exit 0
fi

if ! "$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "python-env: $python must be Python >= 3.10 with the venv module (Debian: python3-venv)" >&2
  exit 1
fi
echo "python-env: creating $venv from $req (the first time downloads about 3 GB: torch with its CUDA libraries)" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req" >&2
echo "$want" > "$venv/.meft-requirements"
echo "python-env: ready" >&2
echo "$venv"
