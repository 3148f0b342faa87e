#!/usr/bin/env bash
# Twenty-third session, call 1: S5 on the GPU-resident Qwen3-Next slice with the fixed load generator
# (one shared httpx client), 1..32 streams, and a short request's TTFT during a 32k-token prefill.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
git log --oneline -1 | tee $OUT/commit.txt
TAIL=3 step 120 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
TAIL=12 step 420 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 2 4 8 16 32 --tokens 64 --warmup-tokens 64 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 32
echo "== done ($(date +%T))"
