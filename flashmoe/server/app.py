"""The ASGI application: routes, who may call them (an API key, or else only this server's own
address and pages), and every error in the client's expected JSON shape."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .anthropic import messages
from .completions import completions, models
from .errors import APIError
from .http import APIKeyMiddleware, SameOriginMiddleware, UnhandledErrorMiddleware
from .openai_chat import chat_completions
from .service import ModelService


async def health(request: Request) -> Response:
    return JSONResponse(request.app.state.service.health())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response_for(request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response_for(request.url.path)


def create_app(service: ModelService, api_key: str | None = None, max_body: int = 8 << 20,
               host: str = "127.0.0.1", port: int = 8000) -> Starlette:
    """The server for one loaded model, listening on `host`:`port`. `api_key`: required on /v1/
    routes when given; without one, only requests addressed to this server and not from other
    origins' web pages are served (SameOriginMiddleware)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        service.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    # With a key, the key alone guards: a web page cannot attach it without knowing it (a custom
    # header makes the browser ask first, and no CORS preflight is answered), and a server
    # reached through proxies or names it cannot know must not refuse by Host or Origin.
    if api_key:
        guard = Middleware(APIKeyMiddleware, api_key=api_key)
    else:
        guard = Middleware(SameOriginMiddleware, listen_host=host, port=port)
    middleware = [Middleware(UnhandledErrorMiddleware), guard]
    handlers = {APIError: _api_error, HTTPException: _http_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.service = service
    app.state.max_body = max_body
    return app
