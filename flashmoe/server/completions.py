"""POST /v1/completions (raw text in, continuation out) and GET /v1/models."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..generation import Step
from .errors import APIError
from .http import event_stream, parse_body, sse, unless_disconnected
from .logprobs import LegacyLogprobs
from .openai_chat import usage_dict
from .schemas import CompletionRequest
from .service import ModelService, Usage


async def completions(request: Request) -> Response:
    service: ModelService = request.app.state.service
    req = await parse_body(request, CompletionRequest)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request is supported; send the others separately", param="prompt")
        prompt = prompt[0]
    if req.echo and req.logprobs is not None:  # a scorer must not mistake the answer's logprobs for the prompt's
        raise APIError(400, "logprobs of an echoed prompt are not computed: ask for echo or for logprobs", param="logprobs")
    params = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                  repetition_penalty=req.repetition_penalty, stop=req.stop, seed=req.seed, logprobs=req.logprobs,
                  ignore_eos=req.ignore_eos)
    plan = await asyncio.to_thread(service.text_plan, prompt, params)
    job = await service.submit(plan)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": service.name}
    echo = service.tokenizer.decode(plan.ids) if req.echo else ""
    logprobs = LegacyLogprobs(service.token_text) if req.logprobs is not None else None
    events = service.events(job, None)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return event_stream(_stream(head, echo, events, include_usage, logprobs), job)
    result = await unless_disconnected(request, job, _collect(head, echo, events, logprobs))
    return JSONResponse(result) if result is not None else Response(status_code=499)


def _choice(text: str, finish: str | None, logprobs: LegacyLogprobs | None = None) -> dict[str, Any]:
    """A choice with `text`, carrying the logprobs of the tokens gathered since the last one."""
    return {"text": text, "index": 0, "logprobs": logprobs.take() if logprobs else None, "finish_reason": finish}


async def _stream(head: dict[str, Any], echo: str, events: AsyncIterator[Any], include_usage: bool,
                  logprobs: LegacyLogprobs | None) -> AsyncIterator[str]:
    try:
        if echo:
            yield sse({**head, "choices": [_choice(echo, None)]})
        async for event in events:
            if isinstance(event, Step):
                logprobs.add(event)
            elif isinstance(event, Usage):
                yield sse({**head, "choices": [_choice("", event.finish_reason, logprobs)]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage_dict(event)})
            elif event.text:
                yield sse({**head, "choices": [_choice(event.text, None, logprobs)]})
    except APIError as e:
        yield sse(e.openai_body())
    yield "data: [DONE]\n\n"


async def _collect(head: dict[str, Any], echo: str, events: AsyncIterator[Any],
                   logprobs: LegacyLogprobs | None) -> dict[str, Any]:
    text, usage = [echo], Usage()
    async for event in events:
        if isinstance(event, Step):
            logprobs.add(event)
        elif isinstance(event, Usage):
            usage = event
        else:
            text.append(event.text)
    return {**head, "choices": [_choice("".join(text), usage.finish_reason, logprobs)], "usage": usage_dict(usage)}


async def models(request: Request) -> Response:
    service: ModelService = request.app.state.service
    card = {"id": service.name, "object": "model", "created": service.created, "owned_by": "flashmoe",
            "context_length": service.engine.context_length}
    return JSONResponse({"object": "list", "data": [card]})
