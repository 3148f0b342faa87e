#!/usr/bin/env bash
# One device call, the highest-value items first: issue 21's layer diff, the MXFP4 v2 quick sweep,
# the GPU tests of the new kernels and families, gpt-oss-120b S1/S2 resident, generate with no flags.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $OUT/env.txt 2>&1
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
step 60 diff python3 scripts/gpu_layer_diff.py qwen3_moe glm4_moe qwen3_5_moe
TAIL=30 step 70 kernels python3 scripts/bench_kernels.py --only mxfp4 --quick --hidden 2880 --intermediate 2880 --slots 128
TAIL=30 step 150 tests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/kernels/test_moe_mxfp4.py tests/kernels/test_host_handoff.py tests/test_gpu.py -k "every_family or cpu_share or mxfp4" --durations=5
TAIL=30 step 170 bench120 python3 -m flashmoe bench --preset gpt-oss-120b --layers 8 --k 4 --preload --prefill 2048 --tokens 64 --json $OUT/bench120.json
MODEL=$(ls -d /tmp/flashmoe-bench/*/ 2>/dev/null | head -1)
[ -n "$MODEL" ] && TAIL=12 step 60 generate python3 -m flashmoe generate -m "$MODEL" -p "The quick brown fox" --tokens 128 --temperature 0
