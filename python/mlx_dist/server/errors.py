"""Errors as HTTP answers: :class:`APIError` (OpenAI's error shape), the
one mapping of engine and core failures to statuses, and the handlers
that turn every exception into such an answer."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_dist import _core
from mlx_dist.engine import CapacityExceeded, EngineStopped, QueueFull
from mlx_dist.server.schemas import AnthropicErrorResponse, ErrorResponse


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``
    (OpenAI's shape), or, on Anthropic's Messages API, as
    ``{"type": "error", "error": {"type", "message"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)
        self.headers = headers

    def body(self, shape: str = "openai") -> dict:
        if shape == "anthropic":
            kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else None)
            return {
                "type": "error",
                "error": {"type": kind or "invalid_request_error", "message": self.message},
            }
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def renamed(self, names: dict[str, str]) -> APIError:
        """This error, naming its parameter as another API does (``names``:
        the chat API's name to that API's)."""
        if self.param in names:
            self.message = self.message.replace(self.param, names[self.param])
            self.param = names[self.param]
            self.args = (self.message,)
        return self

    def response(self, shape: str = "openai") -> Response:
        # ASCII JSON: a message quoting a client's broken text still encodes.
        return Response(
            json.dumps(self.body(shape)),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def _error_type(status: int) -> str:
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")


# Anthropic's error types by status (others: invalid_request_error, or
# api_error from 500 on).
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def shape_for(path: str) -> str:
    """The error shape of the API at ``path``."""
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: a bad value, naming the parameter."""
    return APIError(400, message, param=param, code=code)


def engine_error(e: BaseException, local_worker: str | None = None) -> APIError:
    """Maps a failure of generation (submitting, or a job's end) to the
    HTTP error that fits it, by its class (never its message): the one
    place where exceptions become statuses. ``local_worker``'s loopback
    address, a detail, is left out of messages."""
    if isinstance(e, APIError):
        return e
    message = str(e)
    if local_worker:
        message = message.replace(f" ({local_worker})", "").replace(local_worker, "local")
    if isinstance(e, (ValueError, TypeError)):
        return bad(message)
    if isinstance(e, QueueFull):
        return APIError(
            429,
            f"the server is busy: {message}; retry shortly",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, _core.KvBudgetFull):
        # Running sequences hold the KV cache: one ending makes room.
        return APIError(
            429,
            f"the KV cache is full for now: {message}; retry shortly",
            code="kv_cache_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, (CapacityExceeded, _core.KvBudgetExceeded)):
        return APIError(
            413,
            f"this request needs more KV cache memory than there is, even with no other "
            f"request running (shorten the prompt or lower max_tokens): {message}",
            code="insufficient_capacity",
        )
    if isinstance(e, _core.CapacityError):
        return APIError(413, f"this request does not fit: {message}", code="insufficient_capacity")
    if isinstance(e, MemoryError):
        return APIError(
            503,
            f"not enough memory for this request: {message}",
            code="insufficient_capacity",
            headers={"Retry-After": "5"},
        )
    if isinstance(e, _core.TlsError):
        # Configuration, not load: retrying cannot help.
        return APIError(
            502,
            f"the server cannot talk to a worker over TLS: {message}",
            code="worker_tls_mismatch",
        )
    if isinstance(e, _core.NotReadyError):
        return APIError(503, message, code="worker_not_ready", headers={"Retry-After": "5"})
    if isinstance(e, _core.WorkerError):
        return APIError(503, message, code="worker_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, (ConnectionError, EngineStopped)):
        return APIError(503, message, code="service_unavailable", headers={"Retry-After": "5"})
    return APIError(500, f"{type(e).__name__}: {message}", code="internal_error")


def install_handlers(app: FastAPI, on_crash: Callable[[Exception], None]) -> None:
    """Answers every exception as an :class:`APIError`: a wrong type or a
    missing field 422 (malformed JSON 400), Starlette's errors with their
    status, anything unexpected 500 after ``on_crash`` counts it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response(shape_for(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        shape = shape_for(request.url.path)
        if first.get("type") == "json_invalid":
            return bad(f"the body is not valid JSON: {first.get('msg', '')}").response(shape)
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in errors[:5]
        )
        return APIError(422, message or "invalid request", param=param).response(shape)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return APIError(e.status_code, message, headers=e.headers).response(
            shape_for(request.url.path)
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        on_crash(e)
        error = APIError(500, f"internal error: {type(e).__name__}: {e}")
        return error.response(shape_for(request.url.path))


_ERROR_TEXT = {
    400: "a bad value, malformed JSON, or a prompt over the context (code context_length_exceeded)",
    401: "no valid API key, or no cluster token for /cluster/join",
    403: "joining is off",
    404: "no such model",
    408: "the request body stopped arriving",
    413: "the body is over max_body_bytes, or the request's KV cache cannot fit (code insufficient_capacity)",
    422: "a value of the wrong type, or a missing field",
    429: "the queue is full, or the KV cache is full for now (code kv_cache_full) (Retry-After)",
    502: "a worker cannot be reached over TLS: the TLS settings do not match (code worker_tls_mismatch)",
    503: "loading, a worker down (code worker_unavailable), or no memory for now (Retry-After)",
}
GENERATE_ERRORS = (400, 401, 404, 408, 413, 422, 429, 502, 503)


def responses(*codes: int, stream: bool = False, shape: str = "openai") -> dict:
    """OpenAPI ``responses`` for these error statuses, in the API's error
    ``shape`` (and, with ``stream``, the event stream a 200 may be)."""
    model = AnthropicErrorResponse if shape == "anthropic" else ErrorResponse
    out: dict[int | str, dict] = {c: {"model": model, "description": _ERROR_TEXT[c]} for c in codes}
    if stream:
        out[200] = {
            "description": "the answer, or with stream: true server-sent events",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    return out
