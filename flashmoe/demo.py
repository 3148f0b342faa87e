"""The demo model that ships inside the package (flashmoe/demo_model): a 30M-parameter Qwen3.5-MoE
(8 layers in the 3:1 Gated DeltaNet / gated attention pattern, 64 experts of which 8 are routed per
token, a shared expert) trained by scripts/train_demo.py on the Python standard library's source and
synthetic tool-call chats, stored packed with 4-bit experts. Its model card is
flashmoe/demo_model/README.md; docs/QUALITY.md measures what quantization and pruning cost it.
"""

from pathlib import Path

DEMO_MODEL = Path(__file__).with_name("demo_model")
HELDOUT_TEXT = DEMO_MODEL / "heldout.txt"  # stdlib files the model never saw (docs/QUALITY.md)
EVAL_PROMPTS = DEMO_MODEL / "eval_prompts.jsonl"  # tool-call and JSON prompts about held-out functions
DEMO_PROMPT = 'def read_lines(path):\n    """Return the lines of the text file at path, without line endings."""\n'
