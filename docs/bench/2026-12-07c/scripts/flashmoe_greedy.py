import sys, json
from flashmoe.config import EngineConfig
from flashmoe.demo import DEMO_MODEL
from flashmoe.engine import Engine
from flashmoe.runtime.sampling import SamplingParams
prompt = sys.argv[1]; n = int(sys.argv[2]); dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
e = Engine(DEMO_MODEL, EngineConfig(device="cpu", dtype=dtype, threads=1))
ids = e.tokenizer.encode(prompt)
print("prompt ids", ids, file=sys.stderr)
out = [s.token for s in e.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))]
print(json.dumps({"ids": out, "text": e.tokenizer.decode(out)}))
