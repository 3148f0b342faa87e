"""Parsing the assistant's markup: tool-call bodies (JSON and XML) and the streaming splitter."""

from __future__ import annotations

import pytest

from flashmoe.tool_calls import Content, OutputParser, Reasoning, ToolCall, parse_output, parse_tool_call

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}},
            "required": ["city"],
        },
    },
}

XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\n123\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=opts>\n{\"metric\": true}\n</parameter>\n</function>\n</tool_call>"
)
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'


def test_json_body():
    call = parse_tool_call('{"name": "f", "arguments": {"a": [1, 2]}}')
    assert (call.name, call.arguments) == ("f", {"a": [1, 2]})
    assert parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}').arguments == {"a": 1}  # double-encoded
    assert parse_tool_call('{"name": "f"}').arguments == {}
    assert parse_tool_call('{"name": "f", "arguments": [1]}') is None
    assert parse_tool_call('{"arguments": {}}') is None
    assert parse_tool_call('{"name": "f", "arguments": {') is None


def test_xml_body_types_follow_the_schema():
    body = XML_CALL.removeprefix("<tool_call>").removesuffix("</tool_call>")
    typed = parse_tool_call(body, {"get_weather": WEATHER["function"]["parameters"]})
    assert typed.arguments == {"city": "123", "days": 3, "opts": {"metric": True}}  # "string" stays text
    untyped = parse_tool_call(body)  # no schema: whatever looks like JSON is decoded
    assert untyped.arguments == {"city": 123, "days": 3, "opts": {"metric": True}}


def test_xml_values_keep_inner_newlines_and_text():
    call = parse_tool_call("<function=write>\n<parameter=text>\nline 1\n\nline 2\n</parameter>\n"
                           "<parameter=note>\nnot json: {x\n</parameter>\n</function>")
    assert call.arguments == {"text": "line 1\n\nline 2", "note": "not json: {x"}


@pytest.mark.parametrize("body", [
    "<function=f>\n<parameter=a>\n1\n</parameter>\n",  # no </function>
    "<function=f>\nstray text\n<parameter=a>\n1\n</parameter>\n</function>",
    "<function=f>\n</function>\n<function=g>\n</function>",
    "just text",
])
def test_malformed_xml_bodies(body):
    assert parse_tool_call(body) is None


def _stream(text: str, parser: OutputParser, step: int) -> list:
    events = []
    for i in range(0, len(text), step):
        events += parser.push(text[i : i + step])
    return events + parser.finish()


def _merge(events: list) -> list:
    """Adjacent text events of one kind joined, so chunkings can be compared."""
    out: list = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (Content, Reasoning)):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out


FULL = "Let me think.\nA call is needed.\n</think>\n\nChecking the weather.\n\n" + XML_CALL + "\n" + JSON_CALL


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streaming_matches_whole_parse_and_never_shows_markup(step):
    events = _merge(_stream(FULL, OutputParser([WEATHER], reasoning=True), step))
    assert [type(e) for e in events] == [Reasoning, Content, ToolCall, ToolCall]
    assert events[0].text == "Let me think.\nA call is needed."
    assert events[1].text == "Checking the weather."  # the blank lines before the call are held back, then dropped
    assert (events[2].name, events[2].arguments) == ("get_weather", {"city": "123", "days": 3, "opts": {"metric": True}})
    assert (events[3].name, events[3].arguments) == ("get_weather", {"city": "Oslo", "days": 2})
    whole = parse_output(FULL, [WEATHER], reasoning=True)
    assert (whole.reasoning, whole.content) == (events[0].text, events[1].text)
    assert [c.arguments for c in whole.tool_calls] == [events[2].arguments, events[3].arguments]


def test_think_block_opened_by_the_model():
    out = parse_output("<think>\nhmm\n</think>\n\nHello <b>there</b>")
    assert (out.reasoning, out.content) == ("hmm", "Hello <b>there</b>")
    assert parse_output("Answer: <think> is a tag").content == "Answer: <think> is a tag"  # not at the start


def test_truncated_call_is_dropped_but_an_unclosed_complete_one_counts():
    cut = parse_output("Sure. <tool_call>\n<function=get_weather>\n<parameter=ci")
    assert (cut.content, cut.tool_calls) == ("Sure.", [])
    unclosed = parse_output("<tool_call>\n<function=f>\n</function>\n")
    assert [c.name for c in unclosed.tool_calls] == ["f"]


def test_malformed_complete_block_stays_visible_and_markup_passes_without_tools():
    bad = parse_output("<tool_call>\nnot a call\n</tool_call>")
    assert bad.tool_calls == [] and "not a call" in bad.content
    plain = parse_output(XML_CALL, parse_tool_calls=False)
    assert plain.tool_calls == [] and plain.content == XML_CALL


def test_text_that_only_starts_like_markup_is_released():
    parser = OutputParser()
    assert parser.push("a <to") == [Content("a")]  # "<to" could still become <tool_call>
    assert _merge(parser.push("day") + parser.finish()) == [Content(" <today")]
    assert parse_output("ends with <tool_").content == "ends with <tool_"
