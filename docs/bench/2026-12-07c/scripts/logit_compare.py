import sys, torch
from transformers import AutoModelForCausalLM
from flashmoe.config import EngineConfig
from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
from flashmoe.engine import Engine
e = Engine(DEMO_MODEL, EngineConfig(device="cpu", dtype="float32", threads=1))
ids = e.tokenizer.encode(open(HELDOUT_TEXT).read()[:4000])[:256]
fm = e.forward(ids, e.new_state(), last_only=False).float()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    hf = m(torch.tensor([ids])).logits[0].float()
print("positions", len(ids), "max |diff|", (fm - hf).abs().max().item(), "max |logit|", hf.abs().max().item(),
      "argmax agree", (fm.argmax(-1) == hf.argmax(-1)).float().mean().item())
