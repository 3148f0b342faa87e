#!/usr/bin/env bash
# Twenty-fourth session, first device call: bench/2026-12-07j/next.sh's part a (the GPU tests of the
# resident replay and the pooled graphs; S5 on the Qwen3-Next slice, EXPERIMENTS 117's ~8x at 16
# streams), then the CPU expert kernel's record rate on this host's cores with the 4-bit rows as
# integer dot products (EXPERIMENTS 118), beside its DRAM read bandwidth. Carry [".whl"].
source scripts/device_setup.sh
TAIL=6 step 100 gputests python3 -m pytest -q --basetemp=/tmp/t -p no:cacheprovider tests/test_gpu.py -x -k "replay or pooled"
TAIL=3 step 90 nextbuild python3 -m flashmoe bench --preset qwen3-next-80b-a3b --layers 8 --preload --tokens 8 --prefill 0 --k 10
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
TAIL=10 step 150 s5next python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 32 --tokens 256 --warmup-tokens 32 --json $OUT/s5next.json -- --device cuda --preload --parallel 32
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*\(avx512_vnni\|avx2\).*/Flags: ...\1.../' | tee $OUT/lscpu.txt
TAIL=40 step 100 matvec python3 scripts/cpu_expert_matvec.py --repeats 5 --json $OUT/matvec.json
echo "== done ($(date +%T))"
