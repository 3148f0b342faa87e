"""HTTP plumbing shared by the routes: bounded JSON bodies, API keys, who may call a server without
one, server-sent events, errors that keep the connection, and cancelling a generation when its
client goes away."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from typing import Any, AsyncIterator, Awaitable, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, from_validation
from .scheduler import Job

log = logging.getLogger("flashmoe.server")

T = TypeVar("T", bound=BaseModel)

# Arrays and objects nested deeper than this are refused before parsing: json.loads, the schema
# checks, the chat template and the grammar compiler all recurse once per level. Real requests
# stay well below it: a tool whose parameters nest objects 20 deep is 45 deep here.
MAX_JSON_DEPTH = 64


async def parse_body(request: Request, model: type[T]) -> T:
    """The request's JSON body as `model`: 413 past the size limit, 400 for bad JSON or types."""
    data = await asyncio.to_thread(parse_json, await _read_body(request))  # megabytes take a while: keep the loop free
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, data) from None


async def _read_body(request: Request) -> bytes:
    limit: int = request.app.state.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # a chunked upload without a length
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """`body` as JSON, or a 400 for anything the server could not pass on: text that is not UTF-8,
    nesting past MAX_JSON_DEPTH (checked before parsing), and values that do not survive being
    written back as JSON, as templates (tojson), the grammar compiler and responses do: lone
    UTF-16 surrogates ("\\ud800", which json.loads accepts but no UTF-8 text can hold) and
    numbers outside the float range (NaN, Infinity, 1e999). Surrogates are refused rather than
    replaced: a prompt silently changed is worse than a client told of its bug."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 text: {e}") from None
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests arrays and objects {depth} deep; the limit is {MAX_JSON_DEPTH}")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    try:
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"the request body holds a lone UTF-16 surrogate ({e.object[e.start]!r}), "
                            "which is not Unicode text: escape characters past U+FFFF as surrogate pairs") from None
    except ValueError:
        raise APIError(400, "the request body holds a number outside the float range (NaN, Infinity or beyond 1e308)") from None
    return data


# A string literal, or the unterminated rest of one. This pattern cannot fail to match once it
# has seen the opening quote, which keeps the scan linear: a failing one would be retried from
# every later quote.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in the JSON text `body` (brackets inside strings do
    not count; unclosed ones do), in linear time and without recursion."""
    brackets = np.frombuffer(_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where(np.isin(brackets, (ord("["), ord("{"))), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


class APIKeyMiddleware:
    """401 for /v1/ requests without the key, given as `Authorization: Bearer KEY` (OpenAI) or
    `x-api-key: KEY` (Anthropic). /health stays open for load balancers and monitors."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            missing = APIError(401, "missing or invalid API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await missing.response_for(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given, self.key)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_EVERY_ADDRESS = ("0.0.0.0", "::", "")
# A Host header: a name or an IP address (IPv6 in brackets), then an optional port. Nothing else
# (no user info, no spaces) reaches the comparison.
_HOST_HEADER = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class SameOriginMiddleware:
    """For a server without an API key: 403 unless the request names this server in its Host
    header and, when it comes from a web page (Origin), from one of the server's own pages.

    Without a key, a page open in any browser on this machine could otherwise use the model: a
    cross-origin `text/plain` POST needs no CORS preflight (CSRF), and DNS rebinding points the
    attacker's own host name at 127.0.0.1. Rebinding shows in Host (the attacker's name), and
    browsers send Origin with every POST. Host must name the server, with its port: a loopback
    name, the address it listens on, or any IP address when it listens on all of them."""

    def __init__(self, app: ASGIApp, listen_host: str, port: int) -> None:
        self.app, self.port = app, port
        self.names = {*LOOPBACK_NAMES, listen_host.strip("[]").lower()}
        self.every_address = listen_host in _EVERY_ADDRESS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(dict(scope["headers"])) if scope["type"] == "http" else None
        if refusal is not None:
            await APIError(403, refusal).response_for(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[bytes, bytes]) -> str | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not self._names_this_server(host):
            return (f"Host {host!r} does not name this server (port {self.port}): a server without an API key "
                    "answers only requests addressed to it")
        origin = headers.get(b"origin", b"").decode("latin-1")
        # "null" (sandboxed pages, some redirects) is never this server's origin.
        if origin and origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
            return (f"requests from web pages of another origin ({origin!r}) are refused: a server without an "
                    "API key serves only clients that are not web pages, and its own pages")
        return None

    def _names_this_server(self, host: str) -> bool:
        match = _HOST_HEADER.fullmatch(host)
        if match is None or int(match["port"] or 80) != self.port:  # no port: HTTP's default
            return False
        name = match["name"].strip("[]").lower()
        return name in self.names or (self.every_address and _is_ip_address(name))


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class UnhandledErrorMiddleware:
    """A 500 in the API's error shape for an exception nothing else handled, answered here.
    Starlette's own last-resort handler answers and then re-raises, and uvicorn drops the client's
    keep-alive connection for it; here the exception is logged and ends with the answer. Once a
    response has started (a stream), the error is raised on: the connection cannot carry on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await APIError(500, f"internal error: {e}").response_for(scope["path"])(scope, receive, send)


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
