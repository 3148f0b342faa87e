"""Why do 16 newcomers' packed prefills take ~0.6 s on the H100 (S5)? Time forward_batch of 16
short prompts against one, and profile the packed call."""
import sys, time, torch
from flashmoe.config import EngineConfig
from flashmoe.engine import Engine
from torch.profiler import profile, ProfilerActivity
e = Engine(sys.argv[1], EngineConfig(device="cuda", preload=True, decode_slots=32))
prompts = [[(17 * i + j) % 5000 + 300 for j in range(24)] for i in range(16)]
def run(ps):
    st = [e.new_state() for _ in ps]
    torch.cuda.synchronize(); t = time.perf_counter()
    if len(ps) == 1: e.forward(ps[0], st[0])
    else: e.forward_batch(ps, st)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    for s in st: e.release(s)
    return dt
for rep in range(3):
    print(f"one {run(prompts[:1])*1e3:.1f} ms, 4 packed {run(prompts[:4])*1e3:.1f} ms, 16 packed {run(prompts)*1e3:.1f} ms", flush=True)
st = [e.new_state() for _ in prompts]
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    e.forward_batch(prompts, st); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
