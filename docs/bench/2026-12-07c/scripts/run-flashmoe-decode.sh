#!/bin/sh
# flashmoe decode, threads 1 then 2 (scripts/cpu_decode_probe.py: median of 5 generations of 127 greedy tokens)
cd /work/llama-cpu && export PYTHONPATH=/work/llama-cpu
/work/main/.venv/bin/python scripts/cpu_decode_probe.py --threads 1
/work/main/.venv/bin/python scripts/cpu_decode_probe.py --threads 2
