"""POST /v1/chat/completions: OpenAI's chat API, streamed or not, with tools and JSON output."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..generation import Step
from ..tool_calls import Content, ParsedOutput, Reasoning, ToolCall
from .errors import APIError
from .grammar import GrammarError
from .http import event_stream, parse_body, sse, unless_disconnected
from .logprobs import ChatLogprobs
from .schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice
from .service import ModelService, Plan, Usage


async def chat_completions(request: Request) -> Response:
    service: ModelService = request.app.state.service
    req = await parse_body(request, ChatCompletionRequest)
    plan = await asyncio.to_thread(chat_plan, service, req)  # tokenizing a long prompt takes a while
    job = await service.submit(plan)
    reply = _Reply(service.name, ChatLogprobs(service.token_text) if req.logprobs else None)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return event_stream(reply.stream(service.events(job, plan.parser()), include_usage), job)
    result = await unless_disconnected(request, job, reply.collect(service.events(job, plan.parser())))
    return JSONResponse(result) if result is not None else Response(status_code=499)


def chat_plan(service: ModelService, req: ChatCompletionRequest) -> Plan:
    choice = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice or "auto"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and choice != "none" else None
    if choice not in ("auto", "none") and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs a non-empty `tools` list", param="tool_choice")
    template_vars = dict(req.chat_template_kwargs or {})
    reasoning = bool(template_vars.get("enable_thinking"))
    fmt = req.response_format
    try:
        if tools and choice != "auto":
            grammar = service.grammars.tool_calls(tools, choice, req.parallel_tool_calls, reasoning)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            grammar = service.grammars.json(fmt.json_schema.schema_, bool(fmt.json_schema.strict), reasoning)
        elif fmt is not None and fmt.type == "json_object":
            grammar = service.grammars.json(None, reasoning=reasoning)
        elif tools:  # "auto": free text, but a call once opened is always well-formed
            grammar = service.grammars.tool_calls(tools, "auto", req.parallel_tool_calls, reasoning)
        else:
            grammar = None
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from e
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = dict(max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                  top_k=req.top_k, repetition_penalty=req.repetition_penalty, stop=req.stop, seed=req.seed,
                  logprobs=(req.top_logprobs or 0) if req.logprobs else None, ignore_eos=req.ignore_eos)
    messages = [_message(m, i) for i, m in enumerate(req.messages)]
    return service.chat_plan(messages, tools, params, grammar, template_vars)


def _message(m: ChatMessage, index: int) -> dict[str, Any]:
    """A message as chat templates expect it (developer is the newer name for system)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m, index)}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in m.tool_calls
        ]
    for key in ("tool_call_id", "name", "reasoning_content"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def _text(m: ChatMessage, index: int) -> str | None:
    if not isinstance(m.content, list):
        return m.content
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content parts are supported, got {part.type!r}", param=f"messages.{index}.content")
    return "".join(part.text or "" for part in m.content)


class _Reply:
    """Builds the response objects of one completion. With `logprobs`, every generated token's
    (reasoning and tool-call markup included) goes out in order, each streamed chunk carrying
    those of the tokens generated since the previous one."""

    def __init__(self, model: str, logprobs: ChatLogprobs | None) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.logprobs = logprobs

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        logprobs = self.logprobs.take() if self.logprobs else None
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**self._head("chat.completion.chunk"), "choices": [choice]})

    async def stream(self, events: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
        yield self._chunk({"role": "assistant", "content": ""})
        calls = 0
        try:
            async for event in events:
                if isinstance(event, Step):
                    self.logprobs.add(event)
                elif isinstance(event, Content):
                    yield self._chunk({"content": event.text})
                elif isinstance(event, Reasoning):
                    yield self._chunk({"reasoning_content": event.text})
                elif isinstance(event, ToolCall):
                    yield self._chunk({"tool_calls": [dict(_tool_call(event), index=calls)]})
                    calls += 1
                else:
                    usage = event
            yield self._chunk({}, _finish_reason(usage, calls))
            if include_usage:
                yield sse({**self._head("chat.completion.chunk"), "choices": [], "usage": usage_dict(usage)})
        except APIError as e:  # after the 200 went out: report in the stream, as OpenAI does
            yield sse(e.openai_body())
        yield "data: [DONE]\n\n"

    async def collect(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        out = ParsedOutput()
        async for event in events:
            if isinstance(event, Step):
                self.logprobs.add(event)
            elif isinstance(event, (Content, Reasoning, ToolCall)):
                out.add([event])
            else:
                usage = event
        message: dict[str, Any] = {"role": "assistant", "content": out.content or (None if out.tool_calls else "")}
        if out.tool_calls:
            message["tool_calls"] = [_tool_call(c) for c in out.tool_calls]
        if out.reasoning:
            message["reasoning_content"] = out.reasoning
        choice = {"index": 0, "message": message, "logprobs": self.logprobs.take() if self.logprobs else None,
                  "finish_reason": _finish_reason(usage, len(out.tool_calls))}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage_dict(usage)}


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


def _finish_reason(usage: Usage, calls: int) -> str:
    return "tool_calls" if calls and usage.finish_reason == "stop" else usage.finish_reason


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
