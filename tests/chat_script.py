"""`flashmoe chat` with the model's answers scripted, for the REPL tests (run as a script).

The tiny test model's weights are random, so it never decides to call a tool. This runs the real
chat command over the real engine, but forces each answer's tokens, one by one, through the
engine's logits hook: everything around the model (parsing, confirmation, running the tool, the
result going back through the chat template, prefix reuse, Ctrl-C) is real; the model's choice
of what to say is not. Settings come from the environment:

  FLASHMOE_CHAT_SCRIPT   JSON list of answers, one per model turn (tool-call markup included)
  FLASHMOE_CHAT_PROMPTS  file that receives each rendered prompt, as JSON lines
  FLASHMOE_CHAT_DELAY    seconds to wait per forced token (to have time for a Ctrl-C)
"""

from __future__ import annotations

import json
import os
import time

import torch

import flashmoe.chat
from flashmoe.cli import app

_load_engine = flashmoe.chat.load_engine


def scripted_engine(model, config):
    engine = _load_engine(model, config)
    answers = iter(json.loads(os.environ["FLASHMOE_CHAT_SCRIPT"]))
    delay = float(os.environ.get("FLASHMOE_CHAT_DELAY", "0"))
    tok = engine.tokenizer
    end = tok.token_to_id("<|im_end|>")
    generate, render = engine.generate, tok.apply_chat_template

    def record(messages, tools=None, add_generation_prompt=True, **kw):
        text = render(messages, tools, add_generation_prompt, **kw)
        if add_generation_prompt:
            with open(os.environ["FLASHMOE_CHAT_PROMPTS"], "a") as f:
                f.write(json.dumps(text) + "\n")
        return text

    def scripted(prompt, params=None, state=None, logits_processor=None, batched=False, checkpoints=None):
        if params is None or params.max_tokens == 1:  # a prefill segment: nothing to script
            return generate(prompt, params, state, logits_processor, batched, checkpoints)
        ids = tok.encode(next(answers)) + [end]

        def force(generated, logits):
            time.sleep(delay)
            forced = torch.full_like(logits, float("-inf"))
            forced[ids[len(generated)]] = 0.0
            return forced

        return generate(prompt, params, state, force, batched, checkpoints)

    tok.apply_chat_template, engine.generate = record, scripted
    return engine


if __name__ == "__main__":
    flashmoe.chat.load_engine = scripted_engine
    app(prog_name="flashmoe")
