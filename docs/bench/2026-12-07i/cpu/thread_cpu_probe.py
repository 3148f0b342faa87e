import sys, time, os
sys.path.insert(0, "/work/main/scripts")
from bench_server import Server, concurrency
from flashmoe.demo import DEMO_MODEL
s = Server(DEMO_MODEL, 8557, "--threads", "2", "--parallel", "16")
def cpu(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{tid}/stat").read()
            name = st[st.index("(")+1:st.rindex(")")]
            f = st[st.rindex(")")+2:].split()
            out[(tid, name)] = int(f[11]) + int(f[12])
        except FileNotFoundError: pass
    return out
try:
    concurrency(s.url, 16, 4, ignore_eos=True)
    a = cpu(s.proc.pid); me = os.times(); t = time.perf_counter()
    for _ in range(5): r = concurrency(s.url, 16, 2, ignore_eos=True)
    b = cpu(s.proc.pid); me2 = os.times(); wall = time.perf_counter() - t
    print("wall %.2f s; client cpu %.2f s" % (wall, (me2.user - me.user) + (me2.system - me.system)))
    for k in sorted(b, key=lambda k: -(b[k] - a.get(k, 0)))[:8]:
        print(k, (b[k] - a.get(k, 0)) / os.sysconf("SC_CLK_TCK"), "s")
finally:
    s.stop()
