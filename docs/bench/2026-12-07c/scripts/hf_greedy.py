import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]; prompt = sys.argv[2]; n = int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
print(type(m).__name__, file=sys.stderr)
ids = tok(prompt, return_tensors="pt").input_ids
print("prompt ids", ids[0].tolist(), file=sys.stderr)
with torch.no_grad():
    out = m.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
new = out[0, ids.shape[1]:].tolist()
print(json.dumps({"ids": new, "text": tok.decode(new)}))
