import sys, time
sys.path.insert(0, "/work/wt-diag/scripts")
from bench_server import Server, concurrency
from flashmoe.demo import DEMO_MODEL
s = Server(DEMO_MODEL, 8556, "--threads", "2", "--parallel", "16")
try:
    concurrency(s.url, 16, 4, ignore_eos=True)
    s.log.seek(0, 2); mark = s.log.tell()
    t = time.perf_counter()
    r = concurrency(s.url, 16, 4, ignore_eos=True)
    print("start %.4f ttft p50 %.3f p90 %.3f" % (t, r["ttft_median_s"], r["ttft_p90_s"]), flush=True)
    time.sleep(0.5)
    s.log.seek(mark); print(s.log.read().decode()[-6000:])
finally:
    s.stop()
