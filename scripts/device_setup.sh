# Sourced by a device run's script (docs/bench/*/): installs the wheels the call carried in .whl
# (the server's dependencies the device's python3 lacks) into /tmp/site, puts them and the tree on
# PYTHONPATH, records the GPU, and defines `step SECONDS NAME CMD...`, which runs CMD under a time
# limit with its output in $OUT/NAME.txt and its last $TAIL lines (default 25) shown.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$t" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -"${TAIL:-25}"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
