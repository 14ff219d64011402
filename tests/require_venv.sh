# Sourced by the tests that run Python: fails, saying how to set it up, unless $MEFT_VENV is a
# Python environment (scripts/python-env.sh makes one; CMake passes -DMEFT_VENV=... on).
if [ -z "${MEFT_VENV:-}" ] || [ ! -x "$MEFT_VENV/bin/python" ]; then
  echo "MEFT_VENV='${MEFT_VENV:-}' is not a Python environment: run scripts/python-env.sh and" \
       "configure with -DMEFT_VENV=<the path it prints> (scripts/test.sh does)" >&2
  exit 1
fi
