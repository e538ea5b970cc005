#!/usr/bin/env bash
# Creates ./.venv (if missing), installs the project and its test requirements into it, and runs
# the test suite. Arguments replace the default target `tests`, e.g. `bash scripts/run_tests.sh tests/unit/core`.
# TORCH_SPEC overrides the torch wheel installed when the venv has none (default torch==2.13.0,
# the CPU build these machines carry locally).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
# Editable install of the project itself (setuptools prints a harmless warning: shown only on failure).
if ! out=$("$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1); then
    echo "$out" >&2
    exit 1
fi
exec "$VENV/bin/python" -m pytest -q "${@:-tests}"
