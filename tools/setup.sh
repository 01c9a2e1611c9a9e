#!/usr/bin/env bash
# Create ./.venv and install cscompile with its dev extra (export tools, serve + ray, pytest, ruff, mypy).
# `--peers` also installs the peers extra (llama-cpp-python, onnxruntime-genai) for
# `cscompile bench --peers`; llama-cpp-python compiles from source once (about 4 min) and its
# wheel is kept in $CSCOMPILE_CACHE/wheels. Idempotent: a second run only checks the install.
# torch is pinned to 2.13.0 (the CPU wheel on the build machines' disk); everything else comes
# from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check -e ".[dev]"
if [ "${1:-}" = "--peers" ]; then
  WHEELS="${CSCOMPILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cscompile}/wheels"
  mkdir -p "$WHEELS"
  LLAMA=$(sed -n 's/.*"llama-cpp-python\(\[[a-z,]*\]\)\{0,1\}==\([0-9.]*\)".*/\2/p' pyproject.toml)
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA from source (once; about 4 minutes on 2 cores)"
    python -m pip wheel -q --disable-pip-version-check --no-deps "llama-cpp-python==$LLAMA" -w "$WHEELS"
  fi
  python -m pip install -q --disable-pip-version-check --find-links "$WHEELS" -e ".[dev,peers]"
fi
