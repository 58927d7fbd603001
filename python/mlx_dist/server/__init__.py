"""The OpenAI-compatible HTTP server.

Three ways to run it:

- ``mlx_dist.serve(model=..., workers=..., port=8100)`` (blocking; in a
  running event loop, e.g. Jupyter, it starts in the background and returns
  a handle),
- ``uvicorn mlx_dist.server:app``, configured from ``MLX_DIST_*``
  environment variables,
- ``mlx-dist serve --model M [--workers ...]``.

All three take their settings through :func:`resolve_settings`. The HTTP
layer validates and encodes requests and formats answers; the model runs
only on the :class:`~mlx_dist.engine.Engine`'s thread.

The modules: :mod:`.settings`, :mod:`.schemas` (request bodies),
:mod:`.errors` (statuses), :mod:`.state` (the model and what routes ask of
it), :mod:`.validation`, :mod:`.run` (a job on the engine), :mod:`.chat`
(a chat answer: its prompt, tools and reasoning, read as it arrives),
:mod:`.tools` (tool calls), :mod:`.reasoning`, :mod:`.sse`,
:mod:`.middleware`, :mod:`.monitor` and :mod:`.routes`; this one puts them
together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import sys
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI

from mlx_dist.server.errors import APIError, engine_error, install_handlers
from mlx_dist.server.middleware import Guard, guarded_protocol
from mlx_dist.server.monitor import monitor
from mlx_dist.server.routes import cluster, messages, openai, responses, tokens
from mlx_dist.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    JoinRequest,
    TokenizeRequest,
)
from mlx_dist.server.settings import DEFAULT_PORT, ServerSettings, resolve_settings
from mlx_dist.server.state import ServerState

__all__ = [
    "DEFAULT_PORT",
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "ErrorResponse",
    "JoinRequest",
    "ServerHandle",
    "ServerSettings",
    "ServerState",
    "TokenizeRequest",
    "app",
    "create_app",
    "engine_error",
    "resolve_settings",
    "serve",
]


def create_app(settings: ServerSettings | None = None, state: ServerState | None = None) -> FastAPI:
    """The FastAPI application. With no ``state``, the model is loaded at
    start-up from ``settings`` (by default, :func:`resolve_settings` of the
    environment)."""
    holder: dict[str, ServerState] = {}

    def get_state() -> ServerState:
        if "state" not in holder:
            holder["state"] = ServerState(settings or resolve_settings())
        return holder["state"]

    if state is not None:
        holder["state"] = state

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        st = get_state()
        if not st.ready:
            await asyncio.to_thread(st.load)
        watching = asyncio.create_task(monitor(st)) if st.distributed else None
        try:
            yield
        finally:
            if watching is not None:
                watching.cancel()
            st.close()

    app = FastAPI(title="mlx-dist", version="0.1.0", lifespan=lifespan)
    app.state.server_state = get_state
    app.add_middleware(Guard, state_of=get_state)
    install_handlers(app, lambda e: get_state().metrics.error(type(e).__name__))
    for routes in (openai, responses, messages, tokens, cluster):
        app.include_router(routes.router)
    return app


# ``uvicorn mlx_dist.server:app``: configured from the environment at start-up.
app = create_app()


class ServerHandle:
    """A server running in a background thread (``serve(block=False)``)."""

    def __init__(self, server, thread: threading.Thread, url: str):
        self._server = server
        self._thread = thread
        self.url = url

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __repr__(self) -> str:
        return f"ServerHandle({self.url})"


def serve(
    model: str | None = None,
    workers=None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    block: bool | None = None,
    log_level: str = "info",
    progress: Callable | None = None,
    announce: Callable[[str], None] | None = None,
    **settings,
) -> ServerHandle | None:
    """Serves ``model`` (default: the demo model) with the OpenAI API on
    ``host:port``, locally or split over ``workers``.

    Other settings are :class:`ServerSettings` fields (``strategy``,
    ``model_name``, ``max_concurrency``, ...). Blocks until interrupted,
    unless ``block=False`` or an event loop is already running in this
    thread (Jupyter): then the server runs in the background and a
    :class:`ServerHandle` is returned."""
    import uvicorn

    unknown = set(settings) - {f.name for f in dataclasses.fields(ServerSettings)}
    if unknown:
        raise TypeError(f"serve() got unexpected arguments: {sorted(unknown)}")
    # Arguments not given (None) come from MLX_DIST_* variables, then the
    # cluster config file, else the defaults.
    cfg = resolve_settings(dict(settings, model=model, workers=workers, api_key=api_key))
    state = ServerState(cfg)
    state.load(progress=progress)
    if state.over_workers and announce is not None:
        announce(state.model.plan)

    # Named TCP (not protocol 0) so that asyncio sets TCP_NODELAY on every
    # accepted connection: without it Nagle's algorithm met delayed ACKs and
    # each request on a kept-alive connection waited about 40 ms.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        state.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg, state),
            log_level=log_level,
            timeout_graceful_shutdown=5,
            http=guarded_protocol(cfg.header_timeout),
            timeout_keep_alive=cfg.keep_alive_timeout,
            limit_concurrency=cfg.max_connections,
        )
    )
    (announce or (lambda line: print(line, file=sys.stderr, flush=True)))(f"listening on {url}")

    if block is None:
        try:
            asyncio.get_running_loop()
            block = False
        except RuntimeError:
            block = True
    if block:
        server.run(sockets=[sock])
        return None
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="mlx-dist-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return ServerHandle(server, thread, url)
