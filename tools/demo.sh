#!/usr/bin/env bash
# README command 1: set up, fetch + export SmolLM2 (cached), generate, print the headline comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
echo "== cscompile model fetch smollm2"
cscompile model fetch smollm2
echo "== cscompile run smollm2 (greedy, 64 tokens)"
cscompile run smollm2 "Explain in two sentences why the sky is blue." -n 64 --threads 2 --stats
echo "== headline: dense ONNX Runtime vs PyTorch eager, side by side"
python tools/bench_dense.py --quick --out out/dense_baseline_quick.json
