#!/usr/bin/env bash
# py-spy of `flashmoe serve` (its child) while 16 streams decode: where a round's host time goes.
M=$1; OUTF=$2
python3 -m pip install -q --no-index --no-deps --target /tmp/spy .devrun/py_spy*.whl 2>&1 | grep -v WARN | tail -1
SPY=$(ls /tmp/spy/bin/py-spy 2>/dev/null || find /tmp/spy -name py-spy -type f | head -1)
$SPY record -r 250 -f raw -o $OUTF --threads --nonblocking -d 45 -- python3 -m flashmoe serve -m "$M" --device cuda --preload --parallel 32 --port 8500 > $OUTF.log 2>&1 &
for i in $(seq 60); do curl -s localhost:8500/health >/dev/null && break; sleep 1; done
python3 - <<'PY'
import sys, time; sys.path.insert(0, "scripts")
from bench_server import concurrency
url = "http://127.0.0.1:8500"
t0 = time.time()
while time.time() - t0 < 25:
    try:
        r = concurrency(url, 16, 128, ignore_eos=True)
    except Exception as e:
        print("load:", e); break
    print(f"16 streams: {r['tok_per_s']:.0f} tok/s, decode {r['decode_tok_per_s']:.0f}, ITL p50 {r['itl_p50_ms']:.1f} ms", flush=True)
PY
wait
pkill -f "flashmoe serve -m" ; sleep 2
ls -la $OUTF; tail -3 $OUTF.log
