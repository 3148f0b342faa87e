"""The grammars on their own, driven by random logits (the harshest "model"): every output they
let through parses and matches its schema, with the tiny byte-level tokenizer (tool-call tags
are plain text) and with the real Qwen3.5 tokenizer (they are special tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from flashmoe.server.grammar import GrammarError, Grammars
from flashmoe.tokenizer import Tokenizer
from flashmoe.tokenizer_build import write_qwen35_tokenizer
from flashmoe.tool_calls import parse_output

PARAMS = {"type": "object", "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["c", "f \"quoted\""]},
    "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "when": {"type": "object", "properties": {"hour": {"type": "integer", "maximum": 23}}, "additionalProperties": False}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "additionalProperties": False}}}]


class Harness:
    def __init__(self, model_dir: Path, vocab: int, template: str | None = None) -> None:
        self.tok = Tokenizer.from_dir(model_dir)
        if template is not None:
            self.tok.chat_template = template
        self.stops = {self.tok.token_to_id("<|im_end|>")}
        self.vocab = vocab
        self.grammars = Grammars(self.tok, (model_dir / "tokenizer.json").read_text(), vocab, self.stops)

    def drive(self, lark: str, forced: list[int] = (), seed: int = 0, steps: int = 2000) -> str:
        """Random tokens through the grammar, uniform over what it allows, after the `forced` ones
        (which it must allow). The text up to the first stop token."""
        proc, gen, out = self.grammars.processor(lark), torch.Generator().manual_seed(seed), []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # vocabulary-sized ops are too small to gain from threads; they only stall on a busy machine
        try:
            return self._drive(proc, gen, out, forced, steps)
        finally:
            torch.set_num_threads(threads)

    def _drive(self, proc, gen, out, forced, steps) -> str:
        for _ in range(steps):
            allowed = proc(out, torch.zeros(self.vocab)) == 0  # the grammar's mask, nothing else
            if len(out) < len(forced):
                token = forced[len(out)]
                assert allowed[token], f"grammar refused {self.tok.decode(out + [token])!r}"
            else:
                choices = allowed.nonzero()[:, 0]
                token = int(choices[torch.randint(len(choices), (1,), generator=gen)])
            if token in self.stops:
                return self.tok.decode(out)
            out.append(token)
        raise AssertionError(f"no end after {steps} tokens: {self.tok.decode(out)!r}")

    def ids(self, *parts: str) -> list[int]:
        """Token ids of text parts; a part that is a special token (e.g. "<tool_call>") becomes its id."""
        return [i for p in parts for i in ([self.tok.special_tokens[p]] if p in self.tok.special_tokens else self.tok.encode(p))]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Harness:
    return Harness(tiny_model, 320)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Harness:
    d = tmp_path_factory.mktemp("qwen35_tokenizer")
    write_qwen35_tokenizer(d)
    return Harness(d, 248320)


def _valid_calls(text: str, reasoning: bool = False) -> list:
    out = parse_output(text, TOOLS, reasoning=reasoning)
    assert out.tool_calls, text
    for call in out.tool_calls:
        assert call.name in ("weather", "ping")
        if call.name == "weather":
            jsonschema.validate(call.arguments, PARAMS)
    return out.tool_calls


@pytest.mark.parametrize("h", ["tiny", "qwen"])
def test_forced_and_required_calls(h, request):
    h = request.getfixturevalue(h)
    for seed in range(3):
        (call,) = _valid_calls(h.drive(h.grammars.tool_calls(TOOLS, "weather"), seed=seed))
        assert call.name == "weather"
        _valid_calls(h.drive(h.grammars.tool_calls(TOOLS, "required"), seed=seed))


@pytest.mark.parametrize("h", ["tiny", "qwen"])
def test_auto_mode_constrains_a_call_once_opened(h, request):
    h = request.getfixturevalue(h)
    lark = h.grammars.tool_calls(TOOLS, "auto")
    _valid_calls(h.drive(lark, forced=h.ids("Checking.\n", "<tool_call>")))  # a special token for qwen
    text = h.drive(lark, forced=h.ids("No tools needed.") + [next(iter(h.stops))])  # or free text that ends
    assert text == "No tools needed."


@pytest.mark.parametrize("h", ["tiny", "qwen"])
def test_json_schema_with_reasoning_first(h, request):
    h = request.getfixturevalue(h)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}, "required": ["ok", "n"],
              "additionalProperties": False}
    for seed in range(3):
        text = h.drive(h.grammars.json(schema, reasoning=True), h.ids("I should answer in JSON.\n", "</think>", "\n\n"), seed)
        out = parse_output(text, reasoning=True)
        assert out.reasoning == "I should answer in JSON."
        jsonschema.validate(json.loads(out.content), schema)


def test_json_body_calls_for_templates_that_write_them(tiny_model):
    h = Harness(tiny_model, 320, template="{{ messages }}")  # no <function=...> in it: JSON bodies
    assert h.grammars.call_format == "json"
    text = h.drive(h.grammars.tool_calls(TOOLS, "weather"))
    assert text.startswith('<tool_call>\n{') and _valid_calls(text)[0].name == "weather"


def test_what_cannot_be_compiled(tiny):
    with pytest.raises(GrammarError, match="'nope'"):
        tiny.grammars.tool_calls(TOOLS, "nope")
    with pytest.raises(GrammarError):
        tiny.grammars.tool_calls([], "required")
    with pytest.raises(GrammarError):
        tiny.grammars.processor(tiny.grammars.json({"type": "string", "format": "no-such-format"}, strict=True))
    tiny.grammars.processor(tiny.grammars.json({"type": "string", "format": "no-such-format"}))  # lenient by default


def test_grammars_end_on_the_stop_tokens_the_tokenizer_has(tiny_model):
    """A config's eos id past a smaller tokenizer's vocabulary (a bench model's byte-level one with a
    released model's eos) is left out of the grammar's ends (llguidance refuses it) instead of
    failing the server's start; a model none of whose stop tokens the tokenizer has is refused."""
    h = Harness(tiny_model, 320)
    im_end = h.tok.token_to_id("<|im_end|>")
    grammars = Grammars(h.tok, (tiny_model / "tokenizer.json").read_text(), 320, {im_end, 248046})
    h.grammars = grammars
    assert h.drive(grammars.json({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    with pytest.raises(ValueError, match=r"none of the stop tokens \[248046\] is in the tokenizer's vocabulary"):
        Grammars(h.tok, (tiny_model / "tokenizer.json").read_text(), 320, {248046})
