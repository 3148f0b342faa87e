#!/usr/bin/env bash
# Second call: the family test's own setting in the layer diff, the MXFP4 kernel tests and sweep, gpt-oss-120b resident.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
TAIL=30 step 45 diff-copying python3 scripts/gpu_layer_diff.py qwen3_moe --no-preload --steps 8
TAIL=30 step 45 diff-threads python3 scripts/gpu_layer_diff.py qwen3_moe --steps 8 --cpu-threads 0
TAIL=12 step 45 mxtests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/kernels/test_moe_mxfp4.py
TAIL=30 step 60 kernels python3 scripts/bench_kernels.py --only mxfp4 --quick --hidden 2880 --intermediate 2880 --slots 128
TAIL=30 step 150 bench120 python3 -m flashmoe bench --preset gpt-oss-120b --layers 8 --k 4 --preload --prefill 2048 --tokens 64 --json $OUT/bench120.json
MODEL=$(ls -d /tmp/flashmoe-bench/*/ 2>/dev/null | head -1)
[ -n "$MODEL" ] && TAIL=12 step 40 generate python3 -m flashmoe generate -m "$MODEL" -p "The quick brown fox" --tokens 128 --temperature 0
