#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.whl/llg:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout $t "$@" 2>&1 | tee $OUT/$name.txt | tail -${TAIL:-25}; }
NEXT=$(ls -d /tmp/flashmoe-bench/qwen3-next*/ 2>/dev/null | head -1)
TAIL=20 step 200 s5 python3 scripts/bench_s5.py "$NEXT" --streams 1 4 16 --tokens 64 --long-prompt 32000 --json $OUT/s5.json -- --device cuda --preload --parallel 16
