"""The ASGI application: routes, API key, and every error in the client's expected JSON shape."""

from __future__ import annotations

import contextlib
import logging
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
from .http import APIKeyMiddleware
from .openai_chat import chat_completions
from .service import ModelService

log = logging.getLogger("flashmoe.server")


async def health(request: Request) -> Response:
    return JSONResponse(request.app.state.service.health())


def _error_response(request: Request, error: APIError) -> Response:
    return error.response(anthropic=request.url.path.startswith("/v1/messages"))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error_response(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(request, APIError(500, f"internal error: {exc}"))


def create_app(service: ModelService, api_key: str | None = None, max_body: int = 8 << 20) -> Starlette:
    """The server for one loaded model. `api_key`: required on /v1/ routes when given."""

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
    middleware = [Middleware(APIKeyMiddleware, api_key=api_key)] if api_key else []
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _unexpected}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.service = service
    app.state.max_body = max_body
    return app
