#!/usr/bin/env bash
# README command 2: set up, then run both test tiers (unit on tiny models, integration on the
# real SmolLM2, which is fetched and exported into the cache on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
# one command a line: under `set -e` a failure inside an `a && b` list does not stop the script
ruff check .
ruff format --check .
mypy cscompile
lint-imports
python -m pytest -q "$@"
