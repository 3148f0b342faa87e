"""Grammar-constrained decoding with llguidance: JSON output that always parses and matches its
schema, and tool calls that are always well-formed calls of an offered tool, at any quantization.

Each request that needs structure gets a Lark grammar (llguidance's dialect, with `%json` for
JSON schemas) and an `LLMatcher`; `GrammarProcessor` plugs it into the engine's logits hook and
masks every token the grammar does not allow next. The tokenizer side is built once from the
model's own tokenizer.json, so no transformers import is needed at run time.

Tool calls follow the model's chat template: the XML body (`<function=...><parameter=...>`) when
the template writes calls that way (Qwen3.5), else the JSON body (`{"name", "arguments"}`).
In the XML form, parameters come in the schema's order and string values are plain text; enum,
const, minLength and maxLength are enforced there, pattern and format are not (they are in JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import llguidance
import torch

from ..tokenizer import Tokenizer
from ..tool_calls import THINK_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_schemas

if TYPE_CHECKING:
    from ..engine import Engine


class GrammarError(ValueError):
    """A schema or tool definition the grammar library cannot compile (a client error); `param`
    names the request field at fault, where known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GrammarProcessor:
    """The engine's logits processor for one generation: feeds each sampled token to the matcher
    and leaves only the tokens the grammar allows next (EOS once the grammar is complete)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self._fed = 0

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self._matcher.consume_tokens(generated[self._fed :]):
            raise RuntimeError(f"grammar rejected a sampled token: {self._matcher.get_error()}")
        self._fed = len(generated)
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8).bool()
        return torch.where(allowed, logits, float("-inf"))


class Grammars:
    """Builds grammars for one model's tokenizer and chat template."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_json: str, vocab_size: int, stop_ids: Iterable[int]) -> None:
        # n_vocab = the model's logits width (may exceed the tokenizer's): ids past it are never allowed.
        # A grammar ends on the stop tokens the tokenizer has: llguidance refuses an end token past
        # the tokenizer's own vocabulary (a config's eos id beyond a smaller tokenizer, as in a bench
        # model's byte-level one), and a grammar could never allow one anyway.
        ends = sorted(i for i in stop_ids if i < tokenizer.vocab_size)
        if not ends:
            raise ValueError(f"none of the stop tokens {sorted(stop_ids)} is in the tokenizer's vocabulary of "
                             f"{tokenizer.vocab_size}: the tokenizer does not belong to this model")
        self._lltok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=ends)
        self._special = tokenizer.special_tokens
        self.call_format = "xml" if "<function=" in (tokenizer.chat_template or "") else "json"

    @classmethod
    def for_engine(cls, engine: Engine) -> Grammars:
        """Grammars for the engine's model: its tokenizer.json, logits width and stop tokens."""
        tokenizer_json = (Path(engine.dir) / "tokenizer.json").read_text(encoding="utf-8")
        return cls(engine.tokenizer, tokenizer_json, engine.args.vocab_size, engine.stop_ids)

    def processor(self, lark: str) -> GrammarProcessor:
        """A fresh processor for one generation; GrammarError if the grammar does not compile."""
        matcher = llguidance.LLMatcher(self._lltok, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return GrammarProcessor(matcher)

    # -- grammar sources -----------------------------------------------------------------------
    def json(self, schema: dict[str, Any] | None, strict: bool = False, reasoning: bool = False) -> str:
        """Output that is one JSON value of `schema` (any JSON object when None).

        Not `strict`: keywords llguidance does not support (some string formats) are ignored
        rather than refused."""
        schema = {"type": "object"} if schema is None else schema
        return self._start(reasoning, "body") + f"body: %json {_json_options(schema, not strict)}\n"

    def tool_calls(self, tools: list[dict[str, Any]], choice: str, parallel: bool = True,
                   reasoning: bool = False) -> str:
        """`choice` "auto": free text, and any `<tool_call>` it opens must be a valid call;
        "required": one or more calls and nothing else; a function name: exactly that call."""
        schemas = tool_schemas(tools)
        lenient = {name: not fn.get("strict") for name, fn in _functions(tools)}
        if choice not in ("auto", "required"):
            if choice not in schemas:
                raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
            schemas, parallel = {choice: schemas[choice]}, False
        if not schemas:
            raise GrammarError("tool_choice needs at least one tool in `tools`", "tool_choice")
        lines = [self._call_rules(schemas, lenient)]
        open_, more = self._lit(TOOL_CALL_OPEN), f' ("\\n" {self._lit(TOOL_CALL_OPEN)} call)*' if parallel else ""
        if choice != "auto":
            lines.append(self._start(reasoning, "calls") + f"calls: {open_} call{more}")
        elif TOOL_CALL_OPEN in self._special:
            # A special token cannot occur inside the text terminal: the text ends where a call opens.
            lines.append(self._start(reasoning, "TEXT? calls?") + f"calls: {open_} call{more}\nTEXT: /(?s:.+)/")
        else:
            # Text that never spells "<tool_call>"; once it does (lazy head), a call must follow.
            lines.append(self._start(reasoning, "(TEXT | head call" + more + ")"))
            lines.append(f"TEXT: /(?s:.*)/ & ~/(?s:.*){_re(TOOL_CALL_OPEN)}(?s:.*)/\nhead[lazy]: /(?s:.*){_re(TOOL_CALL_OPEN)}/")
        return "\n".join(lines) + "\n"

    def _start(self, reasoning: bool, body: str) -> str:
        if not reasoning:
            return f"start: {body}\n"
        # The prompt opened <think>: free reasoning, then its close, then the constrained part.
        if THINK_CLOSE in self._special:
            think = f"think: THINK {self._lit(THINK_CLOSE)} /[ \\t\\r\\n]{{0,8}}/\nTHINK: /(?s:.*)/\n"
        else:
            think = f"think: think_text /[ \\t\\r\\n]{{0,8}}/\nthink_text[lazy]: /(?s:.*){_re(THINK_CLOSE)}/\n"
        return f"start: think {body}\n{think}"

    def _call_rules(self, schemas: dict[str, dict[str, Any]], lenient: dict[str, bool]) -> str:
        close = self._lit(TOOL_CALL_CLOSE)
        if self.call_format == "json":
            bodies = [
                {"type": "object", "properties": {"name": {"const": name}, "arguments": params or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for name, params in schemas.items()
            ]
            # x-guidance options apply to a whole %json: lenient unless every tool is strict.
            return f'call: "\\n" %json {_json_options({"anyOf": bodies}, any(lenient.values()))} "\\n" {close}'
        rules = [f"call: \"\\n\" ({' | '.join(f'fn_{i}' for i in range(len(schemas)))}) {close}"]
        for i, (name, params) in enumerate(schemas.items()):
            rules += _xml_function_rules(f"fn_{i}", name, params, lenient[name])
        return "\n".join(rules)

    def _lit(self, text: str) -> str:
        """A grammar literal: the special token's id when the tokenizer has `text` as one, else the text."""
        token_id = self._special.get(text)
        return f"<[{token_id}]>" if token_id is not None else _str(text)


def _xml_function_rules(rule: str, name: str, params: dict[str, Any], lenient: bool) -> list[str]:
    """`<function=NAME>` with one `<parameter=...>` block per property, in schema order."""
    properties = _keyword(params, "properties", dict, name) or {}
    required = _keyword(params, "required", list, name) or []
    if not all(isinstance(key, str) for key in required):
        raise GrammarError(f"tool {name!r}: `required` must list property names", "tools")
    parts, rules = [], []
    for j, (key, schema) in enumerate(properties.items()):
        head = _str(f"<parameter={key}>\n")
        value, extra = _xml_value_rule(f"{rule}_{j}", schema if isinstance(schema, dict) else {}, lenient, name)
        rules += [f"{rule}_{j}: {head} {value}"] + extra
        parts.append(f"{rule}_{j}" if key in required else f"{rule}_{j}?")
    if not properties and params.get("additionalProperties") is not False:  # free-form: any names, text values
        rules += [f'{rule}_any: "<parameter=" /[^>\\n]+/ ">\\n" {rule}_anyv', f"{rule}_anyv[lazy]: /(?s:.*){_PARAM_END_RE}/"]
        parts.append(f"{rule}_any*")
    body = " ".join(parts)
    return [f'{rule}: {_str(f"<function={name}>")} "\\n" {body} {_str("</function>")} "\\n"'] + rules


_PARAM_END = "\n</parameter>\n"
_PARAM_END_RE = "\\n<\\/parameter>\\n"


# Keywords that make a parameter more than free text.
_STRUCTURAL = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "items", "not"}


def _xml_value_rule(rule: str, schema: dict[str, Any], lenient: bool, tool: str) -> tuple[str, list[str]]:
    """(what follows `<parameter=...>\\n`, extra rules): plain text for strings and untyped
    values (the parser decodes what looks like JSON), a JSON value of the schema otherwise."""
    end = _str(_PARAM_END)
    choices = _keyword(schema, "enum", list, tool)
    if choices is None and "const" in schema:
        choices = [schema["const"]]
    if choices and all(isinstance(c, str) for c in choices):
        return f"({' | '.join(_str(c) for c in choices)}) {end}", []
    if (schema.get("type") == "string" and choices is None) or not _STRUCTURAL & schema.keys():
        low, high = _keyword(schema, "minLength", int, tool) or 0, _keyword(schema, "maxLength", int, tool)
        count = f"{{{low},{'' if high is None else high}}}"
        return f"{rule}_v", [f"{rule}_v[lazy]: /(?s:.{count}){_PARAM_END_RE}/"]
    return f"{rule}_v {end}", [f"{rule}_v: %json {_json_options(schema, lenient)}"]


def _keyword(schema: dict[str, Any], key: str, kind: type, tool: str) -> Any:
    """`schema[key]` (None if absent) when its JSON type is the one the keyword takes (`int`: a
    non-negative integer); a GrammarError naming the tool otherwise. The XML form reads these
    keywords itself; inside %json, llguidance checks its schemas on its own."""
    value = schema.get(key)
    if value is None:
        return None
    if kind is int and not (type(value) is int and value >= 0):
        raise GrammarError(f"tool {tool!r}: {key} must be a non-negative integer", "tools")
    if not isinstance(value, kind):
        raise GrammarError(f"tool {tool!r}: {key} must be a JSON {'object' if kind is dict else 'array'}", "tools")
    return value


# JSON whitespace: any amount by default, which lets a weak model pad forever; this bound still
# allows pretty-printing (a newline and indentation) at every place JSON allows whitespace.
_WHITESPACE = "[\\x20\\x0A\\x0D\\x09]{1,24}"


def _json_options(schema: dict[str, Any], lenient: bool) -> str:
    """`schema` as %json source, with llguidance's options (its "x-guidance" key) added."""
    options = {"whitespace_pattern": _WHITESPACE, "lenient": lenient, **schema.get("x-guidance", {})}
    return json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def _functions(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(fn["name"], fn) for t in tools if isinstance(fn := t.get("function", t), dict) and isinstance(fn.get("name"), str)]


def _str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _re(text: str) -> str:
    """`text` as a literal inside a /.../ regex."""
    return "".join("\\" + c if c in "\\/.^$|?*+()[]{}" else c for c in text)
