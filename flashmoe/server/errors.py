"""Errors as clients expect them: OpenAI's `{"error": {...}}` shape, or Anthropic's on /v1/messages."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    503: "overloaded_error",
}


class APIError(Exception):
    """A request that cannot be served, with the HTTP status and the message the client sees."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        kind = _OPENAI_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, anthropic: bool = False) -> JSONResponse:
        body = self.anthropic_body() if anthropic else self.openai_body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    def response_for(self, path: str) -> JSONResponse:
        """The response in the shape of the API that the request's `path` belongs to."""
        return self.response(anthropic=path.startswith("/v1/messages"))


def from_validation(e: ValidationError, data: Any) -> APIError:
    """A 400 naming the offending field of the request `data`, e.g. `messages.0.role: Input should
    be 'user', ...`. A field of several types (`str | list[...]`) has an error for each; the one
    that got deepest into the request is the one that fits what the client meant."""
    errors = [(_path(error, data), error["msg"]) for error in e.errors()]
    where, message = max(errors, key=lambda error: len(error[0]))
    more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
    return APIError(400, f"invalid request: {'.'.join(where)}: {message}{more}", param=".".join(where) or None)


def _path(error: Any, data: Any) -> list[str]:
    """The error's location in `data`: its keys and indices, without the names pydantic gives the
    types of a field that has several (e.g. `list[ABlock]`), which are not in the request."""
    path, value = [], data
    for part in error["loc"]:
        if (isinstance(value, dict) and part in value) or (isinstance(value, list) and isinstance(part, int)):
            path.append(str(part))
            value = value[part]
    if error["type"] == "missing":
        path.append(str(error["loc"][-1]))
    return path
