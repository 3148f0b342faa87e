#!/usr/bin/env bash
# S3 decode on the 2-core VM, in turn: flashmoe before this session (worktree of d2bfef5 at
# /tmp/base), flashmoe now, llama.cpp Q4_0 on the same weights (docs/bench/2026-12-07c/README.md:
# export_hf.py, the converter with the tokenizer-hash patch, llama-quantize). One thread.
ROUNDS=${ROUNDS:-5}
for r in $(seq "$ROUNDS"); do
  echo "round $r base $(PYTHONPATH=/tmp/base .venv/bin/python /tmp/base/scripts/cpu_decode_probe.py --threads 1)"
  echo "round $r new  $(.venv/bin/python scripts/cpu_decode_probe.py --threads 1)"
  echo "round $r llama $(/tmp/llama-build/bin/llama-bench -m /tmp/demo-q4_0.gguf -t 1 -p 0 -n 128 -r 5 -o jsonl | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["avg_ts"])')"
done
