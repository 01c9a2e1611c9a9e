#!/usr/bin/env bash
# Create ./.venv and install cscompile with its dev extra (export tools, pytest, ruff, mypy).
# Idempotent: a second run only checks the install. torch is pinned to 2.13.0 (the CPU wheel
# on the build machines' disk); everything else comes from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check -e ".[dev]"
