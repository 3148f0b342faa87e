#!/bin/sh
cd /work/llama-cpu && export PYTHONPATH=/work/llama-cpu
/work/main/.venv/bin/python docs/bench/2026-12-07c/scripts/prefill_probe.py --threads 1
/work/main/.venv/bin/python docs/bench/2026-12-07c/scripts/prefill_probe.py --threads 2
