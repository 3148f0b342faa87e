"""Pair each round's flashmoe rates with the same round's llama.cpp rates; round 0 is the warm-up."""
import json, re, statistics, sys
from collections import defaultdict
kind, fm_file, lc_file = sys.argv[1:4]  # kind: decode | prefill
pat = r"threads=(\d+).*?(?:decode|median) ([\d.]+) tok/s"
fm = [(int(t), float(r)) for t, r in re.findall(pat, open(fm_file).read())]
rounds_fm = [dict(fm[i:i + 2]) for i in range(0, len(fm), 2)]
lines = [json.loads(l) for l in open(lc_file) if l.strip()]
per = 8
rounds_lc = []
for i in range(0, len(lines), per):
    r = {}
    for d in lines[i:i + per]:
        q = d["model_type"].split()[-1]
        r[(q, d["n_threads"])] = statistics.median(d["samples_ts"])
    rounds_lc.append(r)
assert len(rounds_fm) == len(rounds_lc), (len(rounds_fm), len(rounds_lc))
counted = list(range(1, len(rounds_fm)))
print(f"{kind}: {len(counted)} counted rounds (round 0 = warm-up, not counted); llama.cpp: median of its 5 samples per round")
print("flashmoe fp32 threads 1 per round:", [rounds_fm[i][1] for i in counted])
print("flashmoe fp32 threads 2 per round:", [rounds_fm[i][2] for i in counted])
fm1 = statistics.median(rounds_fm[i][1] for i in counted)
fm2 = statistics.median(rounds_fm[i][2] for i in counted)
print(f"flashmoe fp32: threads 1 median {fm1:.1f} tok/s, threads 2 median {fm2:.1f} tok/s")
for key in rounds_lc[0]:
    vals = [rounds_lc[i][key] for i in counted]
    rat = [rounds_lc[i][key] / rounds_fm[i][key[1]] for i in counted]
    print(f"llama.cpp {key[0]:>5} threads {key[1]}: median {statistics.median(vals):7.1f} tok/s "
          f"(rounds {', '.join(f'{v:.0f}' for v in vals)}); per-round ratio to flashmoe threads {key[1]}: "
          f"median {statistics.median(rat):.2f}x (min {min(rat):.2f}, max {max(rat):.2f})")
