#!/usr/bin/env bash
# README command 2: set up, then run both test tiers (unit on tiny models, integration on the
# real SmolLM2, which is fetched and exported into the cache on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# the chat page's browser test drives Debian's Chromium headless; where it cannot be installed
# (no apt, not root) that one test skips
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } ||
    echo "chromium could not be installed: the chat page's browser test will skip"
fi
. .venv/bin/activate
# one command a line: under `set -e` a failure inside an `a && b` list does not stop the script
ruff check .
ruff format --check .
mypy cscompile
lint-imports
python -m pytest -q "$@"
