#!/usr/bin/env bash
# cscompile against its peers on a fresh machine, one command: set up (with the peers extra;
# llama-cpp-python compiles once), fetch + export SmolLM2 (cached), build the bundle the benchmark
# runs (int4 + motif family, cached), then measure every system side by side.
# Extra arguments go to tools/bench_peers.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --peers
. .venv/bin/activate
python tools/bench_peers.py "$@"
