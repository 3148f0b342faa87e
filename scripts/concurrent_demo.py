"""S3 with company: N `flashmoe demo` processes started together on one machine, each one's decode
tok/s, for several rounds; docs/BENCHMARKS.md (S3) and docs/EXPERIMENTS.md entry 61.

    python scripts/concurrent_demo.py --procs 2 --rounds 3                # adaptive thread count
    python scripts/concurrent_demo.py --procs 2 --rounds 3 --threads 2    # fixed
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

DECODE = re.compile(r"decode \d+ tok in [\d.]+ s \(([\d.]+) tok/s\)")


def round_of(procs: int, tokens: int, threads: int | None) -> list[float]:
    cmd = [sys.executable, "-m", "flashmoe", "demo", "--tokens", str(tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(procs)]
    rates = []
    for p in running:
        out = p.communicate()[0]
        match = DECODE.search(out)
        if p.returncode or not match:
            raise SystemExit(f"a demo failed (exit {p.returncode}):\n{out[-2000:]}")
        rates.append(float(match.group(1)))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2, help="demos at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, help="pass --threads N to each (default: adaptive)")
    args = ap.parse_args()
    every = []
    for r in range(args.rounds):
        rates = round_of(args.procs, args.tokens, args.threads)
        every += rates
        print(f"round {r + 1}: " + ", ".join(f"{x:.1f}" for x in rates) + " tok/s", flush=True)
    print(f"{args.procs} at once, threads {args.threads or 'adaptive'}: median {statistics.median(every):.1f} tok/s "
          f"per process, range {min(every):.1f}-{max(every):.1f}")


if __name__ == "__main__":
    main()
