"""HTTP plumbing shared by the routes: bounded JSON bodies, API keys, server-sent events, and
cancelling a generation when its client goes away."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, from_validation
from .scheduler import Job

T = TypeVar("T", bound=BaseModel)


async def parse_body(request: Request, model: type[T]) -> T:
    """The request's JSON body as `model`: 413 past the size limit, 400 for bad JSON or types."""
    limit: int = request.app.state.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # a chunked upload without a length
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


class APIKeyMiddleware:
    """401 for /v1/ requests without the key, given as `Authorization: Bearer KEY` (OpenAI) or
    `x-api-key: KEY` (Anthropic). /health stays open for load balancers and monitors."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            missing = APIError(401, "missing or invalid API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await missing.response(anthropic=scope["path"].startswith("/v1/messages"))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given, self.key)


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def event_stream(body: AsyncIterator[str], job: Job) -> StreamingResponse:
    """An SSE response; when the client disconnects, Starlette stops iterating `body` and the
    job is cancelled, which frees its state."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            job.cancel()  # a no-op once the job has ended

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)


R = TypeVar("R")


async def unless_disconnected(request: Request, job: Job, work: Awaitable[R]) -> R | None:
    """Awaits `work` (a non-streamed response being collected); None if the client disconnected
    first, which cancels the job. The body has been read, so receive() waits for the disconnect."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        job.cancel()
        task.cancel()
        return None
    return task.result()
