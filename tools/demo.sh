#!/usr/bin/env bash
# README command 1: set up; fetch + export SmolLM2 (cached); build its bundle (int4, the source grid
# kept exactly); verify it; generate with it; print the headline comparison (PyTorch eager vs dense ORT
# vs the bundle).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
echo "== cscompile model fetch smollm2"
cscompile model fetch smollm2
echo "== cscompile build smollm2 -o out/smollm2.csb"
cscompile build smollm2 -o out/smollm2.csb
cscompile verify out/smollm2.csb
echo "== cscompile run out/smollm2.csb (greedy, 64 tokens)"
cscompile run out/smollm2.csb "Explain in two sentences why the sky is blue." -n 64 --threads 2 --stats
echo "== headline: PyTorch eager vs dense ONNX Runtime vs the cscompile bundle, side by side"
python tools/bench_dense.py --quick --with out/smollm2.csb --out out/headline_quick.json
