#!/usr/bin/env bash
# README command 1: set up (with the peers extra: llama-cpp-python compiles once, about 4 min); fetch +
# export SmolLM2 (cached); build its bundle (int4, the source grid kept exactly); verify it; generate
# with it; print the headline comparison (the bundle against PyTorch, dense ORT, llama.cpp and
# onnxruntime-genai, each in its own process, side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh  # must succeed
bash tools/setup.sh --peers || echo "(peers not installed: the headline lists them as not run, with the reason)"
. .venv/bin/activate
echo "== cscompile model fetch smollm2"
cscompile model fetch smollm2
echo "== cscompile build smollm2 -o out/smollm2.csb"
cscompile build smollm2 -o out/smollm2.csb
cscompile verify out/smollm2.csb
echo "== cscompile run out/smollm2.csb (greedy, 64 tokens)"
cscompile run out/smollm2.csb "Explain in two sentences why the sky is blue." -n 64 --threads 2 --stats
echo "== headline: the bundle against PyTorch, dense ORT, llama.cpp and onnxruntime-genai, side by side"
python tools/bench_peers.py --quick --bundle out/smollm2.csb --out out/headline_quick.json \
  --systems pytorch,ort-dense,bundle,bundle-sensed,bundle-ort,llama.cpp,ort-genai-fp32,ort-genai-int4
