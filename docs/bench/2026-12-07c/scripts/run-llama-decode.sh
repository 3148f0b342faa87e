#!/bin/sh
# llama.cpp decode tg128, Q4_0 and Q8_0 (and BF16, F32: the exact weights), threads 1 and 2, 5 repetitions each
cd /tmp/lc && exec /tmp/llama-build/bin/llama-bench -m demo-q4_0.gguf,demo-q8_0.gguf,demo-bf16.gguf,demo-f32.gguf -t 1,2 -p 0 -n 128 -r 5 -o jsonl
