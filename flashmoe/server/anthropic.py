"""POST /v1/messages: Anthropic's Messages API over the same generation path as the OpenAI routes.

Content blocks map onto the chat template's messages: `tool_use` blocks become an assistant's
tool calls, `tool_result` blocks become tool messages, `thinking` blocks its reasoning."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..tool_calls import Content, ParsedOutput, Reasoning, ToolCall
from .errors import APIError
from .grammar import GrammarError
from .http import event_stream, parse_body, sse, unless_disconnected
from .schemas import ABlock, AMessage, MessagesRequest
from .service import ModelService, Plan, Usage


async def messages(request: Request) -> Response:
    service: ModelService = request.app.state.service
    req = await parse_body(request, MessagesRequest)
    plan = await asyncio.to_thread(_plan, service, req)  # tokenizing a long prompt takes a while
    job = await service.submit(plan)
    reply = _Reply(service.name, len(plan.ids))
    if req.stream:
        return event_stream(reply.stream(service.events(job, plan.parser())), job)
    result = await unless_disconnected(request, job, reply.collect(service.events(job, plan.parser())))
    return JSONResponse(result) if result is not None else Response(status_code=499)


def _plan(service: ModelService, req: MessagesRequest) -> Plan:
    choice = req.tool_choice.type if req.tool_choice else "auto"
    tools = None
    if req.tools and choice != "none":
        tools = [{"type": "function",
                  "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema}}
                 for t in req.tools]
    if choice in ("any", "tool") and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs a non-empty `tools` list")
    reasoning = req.thinking is not None and req.thinking.type != "disabled"
    parallel = not (req.tool_choice and req.tool_choice.disable_parallel_tool_use)
    if choice == "tool" and not (req.tool_choice and req.tool_choice.name):
        raise APIError(400, "tool_choice of type 'tool' needs the tool's name", param="tool_choice.name")
    grammar = None
    if tools:
        target = {"any": "required", "tool": req.tool_choice.name if req.tool_choice else ""}.get(choice, "auto")
        try:
            grammar = service.grammars.tool_calls(tools, target, parallel, reasoning)
        except GrammarError as e:
            raise APIError(400, str(e)) from e
    params = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                  stop=req.stop_sequences)
    return service.chat_plan(_chat_messages(req), tools, params, grammar, {"enable_thinking": reasoning})


def _chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": req.system if isinstance(req.system, str) else _joined(req.system, "system")})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            out.append(_assistant(m, i))
        else:
            out += _user(m, i)
    return out


def _assistant(m: AMessage, index: int) -> dict[str, Any]:
    blocks = list(m.content)
    _only(blocks, {"text", "thinking", "redacted_thinking", "tool_use"}, f"messages.{index}")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(b.text or "" for b in blocks if b.type == "text")}
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input or {}}}
             for b in blocks if b.type == "tool_use"]
    thinking = "".join(b.thinking or "" for b in blocks if b.type == "thinking")
    if calls:
        msg["tool_calls"] = calls
    if thinking:
        msg["reasoning_content"] = thinking
    return msg


def _user(m: AMessage, index: int) -> list[dict[str, Any]]:
    blocks = list(m.content)
    _only(blocks, {"text", "tool_result"}, f"messages.{index}")
    out: list[dict[str, Any]] = []
    for b in blocks:
        if b.type == "tool_result":
            text = b.content if isinstance(b.content, str) else _joined(b.content or [], f"messages.{index}")
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": f"Error: {text}" if b.is_error else text})
    text = "".join(b.text or "" for b in blocks if b.type == "text")
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def _joined(blocks: list[ABlock], where: str) -> str:
    _only(blocks, {"text"}, where)
    return "".join(b.text or "" for b in blocks)


def _only(blocks: list[ABlock], kinds: set[str], where: str) -> None:
    for b in blocks:
        if b.type not in kinds:
            raise APIError(400, f"{where}: content blocks of type {b.type!r} are not supported here (text only models)")


def _stop_reason(usage: Usage, calls: int) -> str:
    if usage.finish_reason == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if usage.stop_sequence else "end_turn"


class _Reply:
    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model, self.prompt_tokens = model, prompt_tokens

    def _usage(self, usage: Usage) -> dict[str, int]:
        # Anthropic counts cache reads apart from the (uncached) input tokens.
        return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
                "cache_read_input_tokens": usage.cached_tokens}

    async def collect(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        out, usage = ParsedOutput(), Usage()
        async for event in events:
            if isinstance(event, Usage):
                usage = event
            else:
                out.add([event])
        content: list[dict[str, Any]] = []
        if out.reasoning:
            content.append({"type": "thinking", "thinking": out.reasoning, "signature": ""})
        if out.content:
            content.append({"type": "text", "text": out.content})
        content += [_tool_use(c) for c in out.tool_calls]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": _stop_reason(usage, len(out.tool_calls)), "stop_sequence": usage.stop_sequence,
                "usage": self._usage(usage)}

    async def stream(self, events: AsyncIterator[Any]) -> AsyncIterator[str]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        yield sse({"type": "message_start", "message": message}, "message_start")
        index, open_kind, calls = -1, None, 0
        try:
            async for event in events:
                kind = "text" if isinstance(event, Content) else "thinking" if isinstance(event, Reasoning) else None
                if open_kind is not None and kind != open_kind:
                    yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                    open_kind = None
                if isinstance(event, Usage):
                    delta = {"stop_reason": _stop_reason(event, calls), "stop_sequence": event.stop_sequence}
                    yield sse({"type": "message_delta", "delta": delta, "usage": self._usage(event)}, "message_delta")
                elif isinstance(event, ToolCall):
                    index, calls = index + 1, calls + 1
                    start = {**_tool_use(event), "input": {}}
                    yield sse({"type": "content_block_start", "index": index, "content_block": start}, "content_block_start")
                    delta = {"type": "input_json_delta", "partial_json": event.arguments_json}
                    yield sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
                    yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                else:
                    if open_kind is None:
                        index, open_kind = index + 1, kind
                        block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": ""}
                        yield sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")
                    delta = ({"type": "text_delta", "text": event.text} if kind == "text"
                             else {"type": "thinking_delta", "thinking": event.text})
                    yield sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
            yield sse({"type": "message_stop"}, "message_stop")
        except APIError as e:
            yield sse(e.anthropic_body(), "error")


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name, "input": call.arguments}
