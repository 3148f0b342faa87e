"""The markup in an assistant's output: reasoning (`<think>...</think>`) and tool calls.

Qwen-format models write each tool call as a `<tool_call>` block whose body is either JSON,
`{"name": ..., "arguments": {...}}` (Qwen3, Hermes style), or XML (Qwen3.5, Qwen3-Coder style):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

`OutputParser` splits generated text into reasoning, content and complete tool calls as it
arrives, holding back whatever may still turn out to be markup: a server streams content and
tool-call deltas from it and never shows the markup itself.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(slots=True)
class Content:
    text: str


@dataclass(slots=True)
class Reasoning:
    text: str


@dataclass(slots=True)
class CallText:
    """A piece of a tool call's body as it is written (only from OutputParser(show_calls=True)):
    a terminal shows the call while it grows; the ToolCall (or Content, if it does not parse) follows."""

    text: str


Event = Union[Content, Reasoning, ToolCall, CallText]


def tool_schemas(tools: Iterable[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{name: parameters schema} from tools in OpenAI form ({"type": "function", "function": {...}})
    or flat ({"name": ..., "parameters": ...})."""
    out = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def parse_tool_call(body: str, schemas: Mapping[str, Mapping[str, Any]] | None = None) -> ToolCall | None:
    """The call in the body of one `<tool_call>` block (JSON or XML), or None if it is malformed.

    With the tool's parameter schema, an XML value of a "string" parameter stays text as written;
    other values are decoded when they are JSON (numbers, booleans, objects...), else kept as text."""
    body = body.strip()
    if body.startswith("{"):
        return _parse_json_body(body)
    return _parse_xml_body(body, schemas or {})


def _parse_json_body(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _parse_xml_body(body: str, schemas: Mapping[str, Mapping[str, Any]]) -> ToolCall | None:
    match = _FUNCTION.fullmatch(body)
    if match is None:
        return None
    name, inner = match.group(1).strip(), match.group(2)
    properties = schemas.get(name, {}).get("properties", {})
    args: dict[str, Any] = {}
    end = 0
    for param in _PARAMETER.finditer(inner):
        if inner[end : param.start()].strip():
            return None  # stray text between parameters: not the format we know
        end = param.end()
        key = param.group(1).strip()
        args[key] = _xml_value(_strip_one_newline(param.group(2)), properties.get(key))
    return ToolCall(name, args) if not inner[end:].strip() else None


def _strip_one_newline(value: str) -> str:
    # The format puts the value on its own line(s): drop exactly that framing, keep the rest.
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _xml_value(text: str, schema: Any) -> Any:
    if isinstance(schema, Mapping) and schema.get("type") == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


class _Trimmed:
    """One section of streamed text without its leading and trailing whitespace.

    Trailing whitespace is held until more text follows, so the blank lines a model writes before
    `</think>` or a tool call never reach the client."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body) :]
        return out


_REASONING, _CONTENT, _CALL = "reasoning", "content", "call"


class OutputParser:
    """Splits streamed assistant text into Reasoning, Content and ToolCall events.

    `reasoning`: the prompt opened a `<think>` block, so the output starts inside it.
    `parse_tool_calls`: False keeps `<tool_call>` blocks as plain content (no tools offered).
    `show_calls`: also emit each piece of a call's body as CallText while it is written.
    A complete block that does not parse is passed on as content rather than lost."""

    def __init__(self, tools: Iterable[Mapping[str, Any]] | None = None, reasoning: bool = False,
                 parse_tool_calls: bool = True, show_calls: bool = False) -> None:
        self._schemas = tool_schemas(tools)
        self._parse_calls, self._show_calls = parse_tool_calls, show_calls
        self._mode = _REASONING if reasoning else _CONTENT
        self._section = _Trimmed()
        self._buffer = ""
        self._call_body = ""
        self._at_start = True  # nothing but whitespace so far: a `<think>` here opens reasoning

    def push(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            markers = self._markers()
            hits = [(i, m) for m in markers if (i := self._buffer.find(m)) >= 0]
            # <think> opens reasoning only before anything else was written
            hits = [(i, m) for i, m in hits if m != THINK_OPEN or not self._buffer[:i].strip()]
            if not hits:
                keep = max((k for m in markers for k in range(1, len(m)) if self._buffer.endswith(m[:k])), default=0)
                self._emit(self._buffer[: len(self._buffer) - keep], events)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return events
            at, marker = min(hits)
            self._emit(self._buffer[:at], events)
            self._buffer = self._buffer[at + len(marker) :]
            self._switch(marker, events)

    @property
    def open_call_chars(self) -> int:
        """Characters of the tool call being written (0 outside a call)."""
        return len(self._call_body) + len(self._buffer) if self._mode == _CALL else 0

    def finish(self) -> list[Event]:
        """Flushes what is held back. An unterminated tool call counts if its body is complete
        (the model stopped right before `</tool_call>`); a truncated one is dropped, not shown."""
        events: list[Event] = []
        if self._mode == _CALL:
            call = parse_tool_call(self._call_body + self._buffer, self._schemas)
            if call is not None:
                events.append(call)
        else:
            self._emit(self._buffer, events)
        self._buffer = ""
        return events

    def _markers(self) -> list[str]:
        if self._mode == _REASONING:
            return [THINK_CLOSE]
        if self._mode == _CALL:
            return [TOOL_CALL_CLOSE]
        markers = [TOOL_CALL_OPEN] if self._parse_calls else []
        return (markers + [THINK_OPEN]) if self._at_start else markers

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._mode == _CALL:
            self._call_body += text
            if self._show_calls:
                events.append(CallText(text))
            return
        if text.strip():
            self._at_start = False
        piece = self._section.push(text)
        if piece:
            events.append(Reasoning(piece) if self._mode == _REASONING else Content(piece))

    def _switch(self, marker: str, events: list[Event]) -> None:
        self._at_start = False
        self._section = _Trimmed()
        if marker == THINK_OPEN:
            self._mode = _REASONING
        elif marker == THINK_CLOSE:
            self._mode = _CONTENT
        elif marker == TOOL_CALL_OPEN:
            self._mode, self._call_body = _CALL, ""
        else:
            self._end_call(events)

    def _end_call(self, events: list[Event]) -> None:
        call = parse_tool_call(self._call_body, self._schemas)
        self._mode = _CONTENT
        events.append(call if call is not None else Content(f"{TOOL_CALL_OPEN}{self._call_body}{TOOL_CALL_CLOSE}"))


@dataclass(slots=True)
class ParsedOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, events: Iterable[Event]) -> None:
        for e in events:
            if isinstance(e, Content):
                self.content += e.text
            elif isinstance(e, Reasoning):
                self.reasoning += e.text
            elif isinstance(e, ToolCall):
                self.tool_calls.append(e)


def parse_output(text: str, tools: Iterable[Mapping[str, Any]] | None = None, reasoning: bool = False,
                 parse_tool_calls: bool = True) -> ParsedOutput:
    """The whole output at once: the same result as streaming it through an OutputParser."""
    parser = OutputParser(tools, reasoning, parse_tool_calls)
    out = ParsedOutput()
    out.add(parser.push(text))
    out.add(parser.finish())
    return out
