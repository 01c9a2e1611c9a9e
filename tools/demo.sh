#!/usr/bin/env bash
# README command 1: set up; fetch + export SmolLM2 (cached); build the int4 model (source grid kept
# exactly); generate with it; print the headline comparison (PyTorch eager vs dense ORT vs int4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
echo "== cscompile model fetch smollm2"
cscompile model fetch smollm2
echo "== cscompile quantize smollm2 -o out/smollm2-int4"
rm -rf out/smollm2-int4
cscompile quantize smollm2 -o out/smollm2-int4
echo "== cscompile run out/smollm2-int4 (greedy, 64 tokens)"
cscompile run out/smollm2-int4 "Explain in two sentences why the sky is blue." -n 64 --threads 2 --stats
echo "== headline: PyTorch eager vs dense ONNX Runtime vs cscompile int4, side by side"
python tools/bench_dense.py --quick --with out/smollm2-int4 --out out/headline_quick.json
