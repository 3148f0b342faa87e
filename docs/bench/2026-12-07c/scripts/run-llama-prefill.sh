#!/bin/sh
cd /tmp/lc && exec /tmp/llama-build/bin/llama-bench -m demo-q4_0.gguf,demo-q8_0.gguf,demo-bf16.gguf,demo-f32.gguf -t 1,2 -p 512 -n 0 -r 5 -o jsonl
