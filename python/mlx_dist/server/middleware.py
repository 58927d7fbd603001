"""In front of the application: the ASGI guard (the API key, the cluster
token of joins, the body's size and pace, counting answers) and uvicorn's
protocol with a deadline for a request's headers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from mlx_dist.server.errors import APIError, bad, shape_for
from mlx_dist.server.state import ServerState

# A body over the limit is still read, up to this much or for this long,
# before the 413, so that a client still sending sees the answer instead
# of a reset connection.
_DRAIN_BYTES = 64 << 20
_DRAIN_SECONDS = 5.0

_ENDPOINTS = {
    "/cluster/join",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/cluster/status",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/responses",
    "/v1/messages",
}


def has_key(headers: dict[bytes, bytes], key: str) -> bool:
    """Whether ``Authorization: Bearer <key>`` was sent (or ``x-api-key:
    <key>``, as Anthropic's clients send it). The header's raw bytes are
    compared with the key's UTF-8 bytes, so a key in any script matches
    when sent as UTF-8."""
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    want = key.encode("utf-8", "surrogateescape")  # argv bytes that were not UTF-8
    if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(b" \t"), want):
        return True
    other = headers.get(b"x-api-key")
    return other is not None and hmac.compare_digest(other.strip(b" \t"), want)


async def _drain(receive) -> bool:
    """Reads and drops what is left of a request's body, up to
    ``_DRAIN_BYTES`` or ``_DRAIN_SECONDS``; True when it was read to its end
    (the connection can then serve another request)."""
    seen = 0
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            while seen <= _DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return False


class Guard:
    """ASGI middleware in front of everything: the API key, the body size
    limit and how long a body may take, and counting answers by endpoint
    and status. A refused request's body is read before the answer, so a
    client still sending sees the answer, not a reset connection."""

    def __init__(self, app, state_of: Callable[[], ServerState]):
        self.app = app
        self.state_of = state_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state_of()
        path = scope["path"]
        endpoint = (
            path
            if path in _ENDPOINTS
            else "/v1/models"
            if path.startswith("/v1/models/")
            else "other"
        )
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope, state)
            if error is not None:
                if scope["method"] not in ("GET", "HEAD") and not await _drain(receive):
                    error.headers = {**(error.headers or {}), "Connection": "close"}
                await error.response(shape_for(path))(scope, receive, counted_send)
                return
            if scope["method"] == "POST":
                # Bodies are JSON whatever the client says (curl -d sends a form type).
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                    (b"content-type", b"application/json")
                ]
            limit = state.settings.max_body_bytes
            timeout = state.settings.header_timeout
            seen = 0
            body_done = scope["method"] in ("GET", "HEAD")

            async def limited_receive():
                nonlocal seen, body_done
                if body_done:
                    return await receive()
                try:
                    # A body that stops arriving holds its connection no longer.
                    message = await asyncio.wait_for(receive(), timeout)
                except TimeoutError:
                    raise HTTPException(
                        408,
                        f"the request body stopped arriving for {timeout:g} s",
                        headers={"Connection": "close"},
                    ) from None
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if seen > limit:
                        drained = body_done or await _drain(receive)
                        body_done = True
                        # FastAPI passes HTTPException through body parsing.
                        raise HTTPException(
                            413,
                            f"the request body is over {limit} bytes",
                            headers=None if drained else {"Connection": "close"},
                        )
                else:
                    body_done = True
                return message

            await self.app(scope, limited_receive, counted_send)
        finally:
            state.metrics.request(endpoint, status.get("code", 500))

    @staticmethod
    def _refuse(scope, state: ServerState) -> APIError | None:
        headers = dict(scope["headers"])
        key = state.settings.api_key
        token = state.cluster_token
        if scope["path"] == "/cluster/join" and token:
            # Workers announce themselves with the cluster token, not the API key.
            given = headers.get(b"x-mlx-dist-token", b"")
            if not hmac.compare_digest(given, token.encode("utf-8", "surrogateescape")):
                return APIError(401, "joining needs the cluster token", code="invalid_token")
        elif key and scope["path"] != "/health" and not has_key(headers, key):
            return APIError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return bad("Content-Length is not a number")
            if n > state.settings.max_body_bytes:
                return APIError(
                    413, f"the request body is over {state.settings.max_body_bytes} bytes"
                )
        return None


def guarded_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP protocol, closing a connection that has not sent a
    request's headers within ``header_timeout`` seconds of opening or of
    its previous answer (uvicorn's keep-alive timeout ends at the first
    byte, so a client sending nothing, or a header a byte at a time, held
    its connection for ever), and setting TCP_NODELAY on it."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS["auto"])

    class GuardedProtocol(base):
        _header_timer: asyncio.TimerHandle | None = None
        _timed_cycle: Any = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            # A request's headers are in once the protocol makes a new cycle.
            self._timed_cycle = self.cycle
            self._header_timer = asyncio.get_running_loop().call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            cycle = self.cycle
            idle = cycle is None or cycle.response_complete
            if cycle is self._timed_cycle and idle and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._timed_cycle:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedProtocol
