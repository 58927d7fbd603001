"""The OpenAI-compatible HTTP server.

Three ways to run it:

- ``mlx_dist.serve(model=..., workers=..., port=8100)`` (blocking; in a
  running event loop, e.g. Jupyter, it starts in the background and returns
  a handle),
- ``uvicorn mlx_dist.server:app``, configured from ``MLX_DIST_*``
  environment variables (:meth:`ServerSettings.from_env`),
- ``mlx-dist serve --model M [--workers ...]``.

The HTTP layer validates and encodes requests and formats answers; the
model runs only on the :class:`~mlx_dist.engine.Engine`'s thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_dist import _core
from mlx_dist.engine import (
    CapacityExceeded,
    Done,
    Engine,
    EngineStopped,
    Failed,
    Job,
    QueueFull,
    Step,
)
from mlx_dist.metrics import Metrics
from mlx_dist.utils import context_limit

DEFAULT_PORT = 8100
# A body over the limit is still read, up to this much or for this long,
# before the 413, so that a client still sending sees the answer instead
# of a reset connection.
_DRAIN_BYTES = 64 << 20
_DRAIN_SECONDS = 5.0
# How often a non-streamed generation checks that its client is still there.
_DISCONNECT_POLL_S = 0.25
# Seconds a joining worker has to answer before it is refused.
_JOIN_PROBE_S = 3.0


@dataclasses.dataclass
class ServerSettings:
    """What to serve and how. Each field has an ``MLX_DIST_<NAME>``
    environment variable (see :meth:`from_env`)."""

    model: str | None = None
    workers: Any = None
    cluster_config: str | None = None
    strategy: str | None = None
    proportions: list[float] | None = None
    compression: str | None = None
    kv_tokens: int | None = None
    model_name: str | None = None
    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    max_body_bytes: int = 8 << 20
    recovery_wait: float = 30.0
    health_interval: float = 2.0
    token: str | None = None
    tls_ca: str | None = None
    # On one device, run the model in a worker inside this process, whose
    # stage batches the decode steps of concurrent sequences (False: step
    # them in turn, each with its own cache).
    batch: bool = True
    # Tokens a sequence may hold, prompt and completion (None: the model's
    # context length when its config gives a sane one, else 32768).
    max_context: int | None = None
    # /cluster/join without a cluster token set: refused unless allowed.
    allow_join: bool = False
    # Seconds at least between two re-plans that joins start.
    join_interval: float = 10.0
    # Seconds a connection has to send a request's headers (from its
    # opening, or from the end of its previous answer), and between parts
    # of its body.
    header_timeout: float = 10.0
    # Seconds an idle kept-alive connection stays open.
    keep_alive_timeout: float = 5.0
    # Open connections at most; past them requests get 503.
    max_connections: int = 1024

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServerSettings:
        env = os.environ if env is None else env
        s = cls()
        for f in dataclasses.fields(cls):
            raw = env.get(f"MLX_DIST_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                if f.name == "proportions":
                    value: Any = [float(p) for p in raw.split(",")]
                elif f.type in ("int", "int | None"):
                    value = int(raw)
                elif f.type == "float":
                    value = float(raw)
                elif f.type == "bool":
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    value = raw.lower() in ("1", "true", "yes")
                else:
                    value = raw
            except ValueError:
                raise ValueError(
                    f"MLX_DIST_{f.name.upper()}={raw!r} is not a valid value"
                ) from None
            setattr(s, f.name, value)
        return s

    def check(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be at least 2")
        if self.join_interval < 0:
            raise ValueError("join_interval must be 0 or more")
        if self.header_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise ValueError("header_timeout and keep_alive_timeout must be above 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


class ServerState:
    """The loaded model, its engine and the server's metrics."""

    def __init__(self, settings: ServerSettings):
        settings.check()
        self.settings = settings
        self.metrics = Metrics()
        self.model = None
        self.tokenizer = None
        self.engine: Engine | None = None
        self.name = ""
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._replanning: threading.Thread | None = None
        # Re-plans that joins asked for: when the last began, and whether
        # one is due (the join rate limit).
        self._join_lock = threading.Lock()
        self._last_join_replan = float("-inf")
        self._join_replan_due: threading.Timer | None = None
        # The in-process worker that runs a one-device model, batched.
        self.local_worker: str | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def distributed(self) -> bool:
        return self.model is not None and isinstance(self.model._core, _core.Cluster)

    @property
    def over_workers(self) -> bool:
        """Split over workers, not in the one inside this process."""
        return self.distributed and self.local_worker is None

    def load(self, progress: Callable | None = None) -> None:
        """Loads the model (locally or over the workers) and starts the engine."""
        from mlx_dist.cluster import load_config
        from mlx_dist.utils import load

        s = self.settings
        cfg = load_config(s.cluster_config) if s.cluster_config else {}
        model = s.model or cfg.get("model")
        workers = s.workers or cfg.get("workers")
        if workers:
            proportions = s.proportions or cfg.get("proportions")
            strategy = (
                s.strategy or cfg.get("strategy") or ("custom" if proportions else "balanced")
            )
            self.model, self.tokenizer = load(
                model,
                workers=workers,
                strategy=strategy,
                proportions=proportions,
                compression=s.compression or cfg.get("compression") or "none",
                kv_tokens=int(s.kv_tokens or cfg.get("kv_tokens", 4096)),
                progress=progress,
                token=s.token,
                recovery_wait=s.recovery_wait,
                tls_ca=s.tls_ca or cfg.get("tls_ca"),
                max_context=s.max_context,
            )
        elif s.batch:
            self.local_worker = _core.start_local_worker()
            self.model, self.tokenizer = load(
                model,
                workers=[self.local_worker],
                strategy="uniform",
                kv_tokens=int(s.kv_tokens or 4096),
                progress=progress,
                recover=False,
                max_context=s.max_context,
            )
        else:
            self.model, self.tokenizer = load(model, max_context=s.max_context)
        source = model or getattr(self.model, "path", "") or "mlx-dist-demo"
        self.name = s.model_name or _model_name(str(source))
        self.aliases = {self.name, str(source)}
        self.engine = Engine(
            self.model,
            self.tokenizer,
            max_active=s.max_concurrency,
            max_queue=s.max_queue,
            metrics=self.metrics,
        )
        self.metrics.watch_engine(lambda: self.engine.queued, lambda: self.engine.active)

    def replan_soon(self, reason: str) -> None:
        """Re-plans in the background (one at a time)."""
        if self._replanning is not None and self._replanning.is_alive():
            return

        def run() -> None:
            try:
                self.model._core.replan(reason)
            except (ConnectionError, ValueError, RuntimeError, MemoryError) as e:
                print(f"mlx-dist: re-plan failed: {e}", file=sys.stderr, flush=True)

        self._replanning = threading.Thread(target=run, name="mlx-dist-replan", daemon=True)
        self._replanning.start()

    def replan_for_join(self, reason: str) -> float:
        """Re-plans for a worker that joined, at most once every
        ``join_interval`` seconds: later joins are taken by one re-plan at
        the end of the interval. Returns the seconds until it starts."""
        with self._join_lock:
            if self._join_replan_due is not None:
                return max(0.0, self._join_replan_due.due - time.monotonic())
            wait = self._last_join_replan + self.settings.join_interval - time.monotonic()
            if wait <= 0:
                self._last_join_replan = time.monotonic()
                self.replan_soon(reason)
                return 0.0

            def later() -> None:
                with self._join_lock:
                    self._join_replan_due = None
                    self._last_join_replan = time.monotonic()
                self.replan_soon(reason)

            timer = threading.Timer(wait, later)
            timer.daemon = True
            timer.due = time.monotonic() + wait
            self._join_replan_due = timer
            timer.start()
            return wait

    def close(self) -> None:
        if self._join_replan_due is not None:
            self._join_replan_due.cancel()
        if self.engine is not None:
            self.engine.stop()
        if self.local_worker is not None:
            _core.stop_local_worker(self.local_worker)
            self.local_worker = None

    @property
    def context_length(self) -> int | None:
        """The model's context length, as its config gives it."""
        n = self.model._core.context_length
        return int(n) if n else None

    @property
    def context_limit(self) -> int:
        """The most tokens a sequence may hold here, prompt and completion."""
        return context_limit(self.model)

    @property
    def vocab_size(self) -> int:
        return int(self.model._core.vocab_size)

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text


def _model_name(source: str) -> str:
    p = Path(source)
    if p.suffix.lower() == ".gguf":
        return p.stem
    return p.name or source


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

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

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        # ASCII JSON: a message quoting a client's broken text still encodes.
        return Response(
            json.dumps(self.body()),
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


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _engine_error(e: BaseException, local_worker: str | None = None) -> APIError:
    """Maps a failure of generation to the HTTP error that fits it.
    ``local_worker``'s loopback address, a detail, is left out of messages."""
    if isinstance(e, APIError):
        return e
    message = str(e)
    if local_worker:
        message = message.replace(f" ({local_worker})", "").replace(local_worker, "local")
    if isinstance(e, (ValueError, TypeError)):
        return _bad(message)
    if isinstance(e, CapacityExceeded):
        return APIError(
            413,
            f"this request needs more KV cache memory than there is, even with no other "
            f"request running (shorten the prompt or lower max_tokens): {message}",
            code="insufficient_capacity",
        )
    if isinstance(e, MemoryError):
        return APIError(
            503,
            f"not enough memory for this request: {message}",
            code="insufficient_capacity",
            headers={"Retry-After": "5"},
        )
    if isinstance(e, (ConnectionError, EngineStopped)):
        return APIError(503, message, code="service_unavailable", headers={"Retry-After": "5"})
    return APIError(500, f"{type(e).__name__}: {message}", code="internal_error")


# Request bodies. Types are checked here (a wrong type is a 422); values are
# checked by the handlers (a bad value is a 400).


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class JoinRequest(_Body):
    address: str


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


_ROLES = {"system", "user", "assistant", "tool", "developer"}


def _messages(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise _bad("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise _bad(
                f"messages[{i}].role must be one of {sorted(_ROLES)}, got {m.role!r}",
                f"messages[{i}].role",
            )
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise _bad(
                        f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                        f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "".join(texts)
        msg: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content or "",
        }
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(m, key)
            if value is not None:
                msg[key] = value
        out.append(msg)
    return out


def _check_text(value: Any, where: str) -> None:
    """Refuses a string anywhere in a request that is not valid Unicode (a
    lone surrogate, as JSON's "\\ud800" gives): no tokenizer can take it."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _bad(
                f"{where} is not valid Unicode text (it has a lone surrogate)", where
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")
    elif isinstance(value, BaseModel):
        _check_text(value.model_dump(), where)


def _dumps(value: Any, param: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _bad(f"{param} cannot be given to the chat template: {e}", param) from None


def _chat_prompt(state: ServerState, req: ChatRequest | TokenizeRequest) -> list[int]:
    """The request's messages through the chat template, as token ids
    (seconds for a megabyte: call it in a thread)."""
    messages = _messages(req.messages or [])
    tok = state.tokenizer
    if not tok.has_chat_template:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok.encode(text)
    # Template variables; add_generation_prompt and tools may come here too.
    extra = dict(getattr(req, "chat_template_kwargs", None) or {})
    tools = getattr(req, "tools", None)
    if "tools" in extra:
        if tools is not None:
            raise _bad("tools is given twice: in the request and in chat_template_kwargs", "tools")
        tools = extra.pop("tools")
        if tools is not None and not isinstance(tools, list):
            raise _bad("chat_template_kwargs.tools must be a list", "chat_template_kwargs.tools")
    add = extra.pop("add_generation_prompt", True)
    if not isinstance(add, bool):
        raise _bad(
            "chat_template_kwargs.add_generation_prompt must be true or false",
            "chat_template_kwargs.add_generation_prompt",
        )
    if "messages" in extra:
        raise _bad(
            "chat_template_kwargs cannot replace the messages", "chat_template_kwargs.messages"
        )
    try:
        text = tok._core.apply_chat_template(
            _dumps(messages, "messages"),
            add,
            _dumps(tools, "tools") if tools is not None else None,
            _dumps(extra, "chat_template_kwargs") if extra else None,
        )
    except ValueError as e:
        raise _bad(f"the chat template failed on these messages: {e}", "messages") from None
    return tok.encode(text, add_special_tokens=False)


def _check_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    vocab = state.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise _bad(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param)
    return ids


def _completion_prompt(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _bad("one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        tok = state.tokenizer
        bos = tok.bos_token
        return tok.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    return _check_ids(state, list(prompt), "prompt")


def _number(value, name: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise _bad(f"{name} must be between {lo:g} and {hi:g}, got {value}", name)


def _limit_text(state: ServerState) -> str:
    """What the context limit is and where it comes from."""
    limit = state.context_limit
    if getattr(state.model, "max_context", None):
        return f"the context here is {limit} tokens (max_context)"
    if state.context_length == limit:
        return f"this model's maximum context length is {limit} tokens"
    return (
        f"the context here is {limit} tokens (the default where the model's config gives "
        f"no usable context length; --max-context / MLX_DIST_MAX_CONTEXT changes it)"
    )


def _options(state: ServerState, req: _Sampling, prompt: list[int], max_tokens) -> dict:
    """The keyword arguments of ``_core.Generation`` for this request."""
    if not prompt:
        raise _bad("the prompt is empty", "prompt")
    if req.n not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    room = state.context_limit - len(prompt)
    if room <= 0:
        raise _bad(
            f"{_limit_text(state)}; the prompt has {len(prompt)} tokens, leaving no room for "
            f"a completion",
            "messages" if isinstance(req, ChatRequest) else "prompt",
            "context_length_exceeded",
        )
    given = getattr(req, "max_completion_tokens", None) is not None
    param = "max_completion_tokens" if given else "max_tokens"
    if max_tokens is None:
        max_tokens = min(state.settings.max_tokens, room)
    elif max_tokens < 1:
        raise _bad(f"{param} must be at least 1, got {max_tokens}", param)
    elif max_tokens > room:
        raise _bad(
            f"{param} is too large: {max_tokens} tokens requested, room for {room} after "
            f"the prompt of {len(prompt)} ({_limit_text(state)})",
            param,
            "context_length_exceeded",
        )
    temp = state.settings.temperature if req.temperature is None else req.temperature
    _number(temp, "temperature", 0, 2)
    top_p = state.settings.top_p if req.top_p is None else req.top_p
    _number(top_p, "top_p", 0, 1)
    _number(req.min_p, "min_p", 0, 1)
    if req.top_k is not None and not -1 <= req.top_k < 1 << 31:
        raise _bad("top_k must be -1 (off), 0 (off) or a count of tokens below 2^31", "top_k")
    _number(req.frequency_penalty, "frequency_penalty", -2, 2)
    _number(req.presence_penalty, "presence_penalty", -2, 2)
    if req.repetition_penalty is not None and not 0 < req.repetition_penalty <= 10:
        raise _bad("repetition_penalty must be above 0 and at most 10", "repetition_penalty")
    context = req.repetition_context_size
    if context is not None and not 1 <= context <= 1 << 16:
        raise _bad("repetition_context_size must be between 1 and 65536", "repetition_context_size")
    context = context or 20
    opts: dict[str, Any] = {
        "max_tokens": int(max_tokens),
        "temp": float(temp),
        "top_p": 0.0 if top_p >= 1 else float(top_p),
        "min_p": float(req.min_p or 0.0),
        # Keeping the whole vocabulary or more is no top-k at all.
        "top_k": max(0, req.top_k or 0) if (req.top_k or 0) < state.vocab_size else 0,
        "stop": _stops(req.stop),
    }
    if req.seed is not None:
        opts["seed"] = req.seed % (1 << 64)
    if req.repetition_penalty not in (None, 1.0):
        opts["repetition_penalty"] = float(req.repetition_penalty)
        opts["repetition_context_size"] = context
    if req.frequency_penalty:
        opts["frequency_penalty"] = float(req.frequency_penalty)
        opts["frequency_context_size"] = context
    if req.presence_penalty:
        opts["presence_penalty"] = float(req.presence_penalty)
        opts["presence_context_size"] = context
    if req.logit_bias:
        bias = []
        for key, value in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise _bad(f"logit_bias keys are token ids, got {key!r}", "logit_bias") from None
            _check_ids(state, [token], "logit_bias")
            _number(value, "logit_bias", -100, 100)
            bias.append((token, float(value)))
        opts["logit_bias"] = bias
    return opts


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise _bad("at most 16 stop sequences are supported", "stop")
    if any(not s for s in stops):
        raise _bad("stop sequences must not be empty", "stop")
    return stops


class _Run:
    """A job submitted to the engine and its events, as an async iterator."""

    def __init__(self, state: ServerState, prompt: list[int], opts: dict, top: int | None):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.local_worker = state.local_worker

        def sink(event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.job = Job(prompt, opts, sink, logprobs=top is not None, top_logprobs=top or 0)
        try:
            state.engine.submit(self.job)
        except QueueFull as e:
            state.metrics.error("QueueFull")
            raise APIError(
                429,
                f"the server is busy: {e}; retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        except EngineStopped as e:
            raise _engine_error(e) from None
        state.metrics.usage(len(prompt))

    async def events(self, request: Request | None = None) -> AsyncIterator[Step | Done]:
        """Steps, then one ``Done``; a failure raises ``APIError``. With
        ``request``, a client gone away cancels the job: it is looked for
        every quarter second, tokens flowing or not, so that its caches are
        freed within a second of it leaving."""
        try:
            checked = time.monotonic()
            while True:
                if request is None:
                    event = await self.queue.get()
                else:
                    try:
                        event = await asyncio.wait_for(self.queue.get(), _DISCONNECT_POLL_S)
                    except TimeoutError:
                        event = None
                    if time.monotonic() - checked >= _DISCONNECT_POLL_S:
                        if await request.is_disconnected():
                            return
                        checked = time.monotonic()
                    if event is None:
                        continue
                if isinstance(event, Failed):
                    raise _engine_error(event.error, self.local_worker)
                yield event
                if isinstance(event, Done):
                    return
        finally:
            self.job.cancel()


def _usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _chat_logprob(state: ServerState, step: Step) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = state.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    out = entry(step.token, step.logprob)
    out["top_logprobs"] = [entry(t, lp) for t, lp in step.top_logprobs or []]
    return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


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
}


def _has_key(headers: dict[bytes, bytes], key: str) -> bool:
    """Whether ``Authorization: Bearer <key>`` was sent. The header's raw
    bytes are compared with the key's UTF-8 bytes, so a key in any script
    matches when sent as UTF-8."""
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    want = key.encode("utf-8", "surrogateescape")  # argv bytes that were not UTF-8
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(b" \t"), want)


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


class _Guard:
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
                await error.response()(scope, receive, counted_send)
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
        token = state.settings.token or os.environ.get("MLX_DIST_TOKEN")
        if scope["path"] == "/cluster/join" and token:
            # Workers announce themselves with the cluster token, not the API key.
            given = headers.get(b"x-mlx-dist-token", b"")
            if not hmac.compare_digest(given, token.encode("utf-8", "surrogateescape")):
                return APIError(401, "joining needs the cluster token", code="invalid_token")
        elif key and scope["path"] != "/health" and not _has_key(headers, key):
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
                return _bad("Content-Length is not a number")
            if n > state.settings.max_body_bytes:
                return APIError(
                    413, f"the request body is over {state.settings.max_body_bytes} bytes"
                )
        return None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer, as OpenAI's."""

    error: ErrorDetail


_ERROR_TEXT = {
    400: "a bad value, malformed JSON, or a prompt over the context (code context_length_exceeded)",
    401: "no valid API key, or no cluster token for /cluster/join",
    403: "joining is off",
    404: "no such model",
    408: "the request body stopped arriving",
    413: "the body is over max_body_bytes, or the request's KV cache cannot fit",
    422: "a value of the wrong type, or a missing field",
    429: "the queue is full (Retry-After)",
    503: "loading, a worker down, or no memory for now (Retry-After)",
}
_GENERATE_ERRORS = (400, 401, 404, 408, 413, 422, 429, 503)


def _errors(*codes: int, stream: bool = False) -> dict:
    """OpenAPI ``responses`` for these error statuses (and, with
    ``stream``, the event stream a 200 may be)."""
    out: dict[int | str, dict] = {
        c: {"model": ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes
    }
    if stream:
        out[200] = {
            "description": "the answer, or with stream: true server-sent events",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    return out


def create_app(settings: ServerSettings | None = None, state: ServerState | None = None) -> FastAPI:
    """The FastAPI application. With no ``state``, the model is loaded at
    start-up from ``settings`` (by default, from the environment)."""
    holder: dict[str, ServerState] = {}

    def get_state() -> ServerState:
        if "state" not in holder:
            holder["state"] = ServerState(settings or ServerSettings.from_env())
        return holder["state"]

    if state is not None:
        holder["state"] = state

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        st = get_state()
        if not st.ready:
            await asyncio.to_thread(st.load)
        monitor = asyncio.create_task(_monitor(st)) if st.distributed else None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.cancel()
            st.close()

    app = FastAPI(title="mlx-dist", version="0.1.0", lifespan=lifespan)
    app.add_middleware(_Guard, state_of=get_state)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            return _bad(f"the body is not valid JSON: {first.get('msg', '')}").response()
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in errors[:5]
        )
        return APIError(422, message or "invalid request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            message = f"no such endpoint: {_request.method} {_request.url.path}"
        return APIError(e.status_code, message, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def _crash(_request: Request, e: Exception):
        get_state().metrics.error(type(e).__name__)
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    def ready_state(model: str | None = None) -> ServerState:
        st = get_state()
        if not st.ready:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        if model is not None and model not in st.aliases:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {st.name!r}",
                param="model",
                code="model_not_found",
            )
        return st

    @app.get("/v1/models", responses=_errors(401, 503))
    async def models():
        st = ready_state()
        return {"object": "list", "data": [_model_card(st)]}

    @app.get("/v1/models/{model_id:path}", responses=_errors(400, 401, 404, 503))
    async def model_card(model_id: str):
        _check_text(model_id, "model")
        return _model_card(ready_state(model_id))

    @app.post("/v1/chat/completions", responses=_errors(*_GENERATE_ERRORS, stream=True))
    async def chat_completions(req: ChatRequest, request: Request):
        _check_text(req.model_dump(), "")
        st = ready_state(req.model)
        prompt = await asyncio.to_thread(_chat_prompt, st, req)
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        opts = _options(st, req, prompt, max_tokens)
        top = None
        if req.logprobs:
            top = req.top_logprobs or 0
            _number(top, "top_logprobs", 0, 20)
        elif req.top_logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        run = _Run(st, prompt, opts, top)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(_chat_chunks(st, run, ident, created, include_usage))
        steps, done = await _collect(run, request)
        text = "".join(e.text for e in steps)
        entries = [_chat_logprob(st, e) for e in steps] if top is not None else []
        if done is None:
            return Response(status_code=499)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": st.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": entries} if top is not None else None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": _usage(done),
        }

    @app.post("/v1/completions", responses=_errors(*_GENERATE_ERRORS, stream=True))
    async def completions(req: CompletionRequest, request: Request):
        _check_text(req.model_dump(), "")
        st = ready_state(req.model)
        if req.suffix:
            raise _bad("suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise _bad("only best_of=1 is supported", "best_of")
        prompt = await asyncio.to_thread(_completion_prompt, st, req.prompt)
        opts = _options(st, req, prompt, req.max_tokens)
        top = req.logprobs
        _number(top, "logprobs", 0, 20)
        echo = await asyncio.to_thread(_Echo, st, prompt) if req.echo else None
        run = _Run(st, prompt, opts, top)
        ident = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(_completion_chunks(st, run, ident, created, echo, include_usage))
        steps, done = await _collect(run, request)
        if done is None:
            return Response(status_code=499)
        text = echo.text if echo is not None else ""
        lp = _LegacyLogprobs(st) if top is not None else None
        for e in steps:
            if lp is not None:
                lp.add(e, len(text))
            text += echo.step(e) if echo is not None else e.text
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": st.name,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": lp.body() if lp is not None else None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": _usage(done),
        }

    @app.post("/tokenize", responses=_errors(400, 401, 404, 413, 422, 503))
    async def tokenize(req: TokenizeRequest):
        _check_text(req.model_dump(), "")
        st = ready_state(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise _bad("give either prompt or messages", "prompt")
        if req.messages is not None:
            ids = await asyncio.to_thread(_chat_prompt, st, req)
        else:
            ids = await asyncio.to_thread(
                st.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens
            )
        return {"tokens": ids, "count": len(ids), "max_model_len": st.context_limit}

    @app.post("/detokenize", responses=_errors(400, 401, 404, 413, 422, 503))
    async def detokenize(req: DetokenizeRequest):
        _check_text(req.model_dump(), "")
        st = ready_state(req.model)
        ids = _check_ids(st, req.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(st.tokenizer.decode, ids)}

    @app.get("/health", responses=_errors(503))
    async def health(request: Request):
        """200 when every stage answers, else 503. With an API key set, the
        details (model, workers, their devices) only for a caller sending it."""
        st = get_state()
        if not st.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        workers = await _workers(st, timeout=2.0) if st.distributed else []
        ok = all(w["reachable"] for w in workers)
        code = 200 if ok else 503
        body: dict[str, Any] = {"status": "ok" if ok else "degraded"}
        key = st.settings.api_key
        if key and not _has_key(dict(request.scope["headers"]), key):
            return JSONResponse(body, status_code=code)
        body.update(model=st.name, workers=workers)
        if st.distributed:
            body["excluded"] = st.model.excluded
        return JSONResponse(body, status_code=code)

    @app.post("/cluster/join", responses=_errors(400, 401, 403, 413, 422, 503))
    async def cluster_join(req: JoinRequest):
        """A worker announces itself (``mlx-dist worker --coordinator``). It
        needs the cluster token when one is set, else the ``allow_join``
        setting; the address must answer as a worker; re-plans for joins
        start at most once every ``join_interval`` seconds."""
        _check_text(req.address, "address")
        st = ready_state()
        if not st.over_workers:
            raise _bad("this server runs the model on one device: it takes no workers")
        token = st.settings.token or os.environ.get("MLX_DIST_TOKEN")
        if not token and not st.settings.allow_join:
            raise APIError(
                403,
                "joining is off: give the cluster a token (--token, sent by the workers) "
                "or start the server with --allow-join",
                code="join_not_allowed",
            )
        address = req.address.strip()
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(f"bad worker address {address!r}: expected host:port", "address")
        try:
            await asyncio.to_thread(_core.worker_info, address, _JOIN_PROBE_S)
        except (ConnectionError, ValueError, RuntimeError, OSError) as e:
            raise _bad(f"no worker answers at {address}: {e}", "address") from None
        try:
            added = await asyncio.to_thread(st.model._core.add_worker, address)
        except ValueError as e:
            raise _bad(str(e), "address") from None
        wait = None
        if added or address in st.model.excluded:
            # The next plan uses it; sequences running replay onto it.
            wait = st.replan_for_join(f"worker {address} announced itself")
        return {
            "address": address,
            "added": added,
            "workers": st.model._core.all_workers,
            "replan_in_seconds": wait,
        }

    @app.get("/cluster/status", responses=_errors(401, 503))
    async def cluster_status():
        st = ready_state()
        return await _cluster_status(st)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **_errors(401),
        },
    )
    async def metrics():
        st = get_state()
        if st.ready:
            try:
                st.metrics.stages({"devices": await _devices(st)}, time.monotonic())
            except (ConnectionError, ValueError, RuntimeError, OSError):
                pass  # the request figures still answer
        return Response(st.metrics.render(), media_type=st.metrics.content_type)

    return app


def _model_card(st: ServerState) -> dict:
    return {
        "id": st.name,
        "object": "model",
        "created": st.created,
        "owned_by": "mlx-dist",
        "max_model_len": st.context_limit,
    }


async def _collect(run: _Run, request: Request) -> tuple[list[Step], Done | None]:
    """A run's steps and its end (None: the client went away)."""
    steps, done = [], None
    async for event in run.events(request):
        if isinstance(event, Step):
            steps.append(event)
        else:
            done = event
    return steps, done


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    run: _Run,
    opening: list[dict],
    on_step: Callable[[Step], dict | None],
    closing: Callable[[str | None], dict],
    include_usage: bool,
) -> AsyncIterator[str]:
    """One run as server-sent events: the `opening` chunks, the chunk
    `on_step` makes of each step (None: nothing to send), the chunk
    `closing` makes with the finish reason, the usage chunk when asked; an
    error event if the run fails; then ``[DONE]``."""
    try:
        for c in opening:
            yield _sse(c)
        async for event in run.events():
            if isinstance(event, Step):
                c = on_step(event)
                if c is not None:
                    yield _sse(c)
            else:
                yield _sse(closing(event.finish_reason))
                if include_usage:
                    last = closing(None)
                    last["choices"] = []
                    last["usage"] = _usage(event)
                    yield _sse(last)
    except APIError as e:
        yield _sse(e.body())
    yield _sse("[DONE]")


def _chat_chunks(
    st: ServerState, run: _Run, ident: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish=None, logprobs=None) -> dict:
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": st.name,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
            "usage": None,
        }

    def on_step(event: Step) -> dict | None:
        logprobs = None
        if run.job.logprobs:
            logprobs = {"content": [_chat_logprob(st, event)]}
        if event.text or logprobs:
            return chunk({"content": event.text}, logprobs=logprobs)
        return None

    opening = [chunk({"role": "assistant", "content": ""})]
    return _events(run, opening, on_step, lambda f: chunk({}, finish=f), include_usage)


class _LegacyLogprobs:
    """``logprobs`` of the completions API: parallel lists."""

    def __init__(self, st: ServerState):
        self.st = st
        self.tokens, self.token_logprobs, self.top, self.offsets = [], [], [], []

    def add(self, step: Step, offset: int) -> None:
        self.tokens.append(self.st.token_text(step.token))
        self.token_logprobs.append(step.logprob)
        self.top.append({self.st.token_text(t): lp for t, lp in step.top_logprobs or []})
        self.offsets.append(offset)

    def body(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        }


class _Echo:
    """``echo``: the prompt's text, then the completion's steps. The
    detokenizer drops one leading space from the start of a completion
    (mlx-lm's: "The capital is" gives "Paris"); after the prompt that space
    is text ("The capital is Paris"), given back here. Decoding the prompt
    takes a while for a long one: make this in a thread."""

    def __init__(self, st: ServerState, prompt: list[int]):
        self.tokenizer = st.tokenizer
        self.prompt = prompt
        self.text = st.tokenizer.decode(prompt)
        self.tokens: list[int] = []
        self.started = False

    def step(self, event: Step) -> str:
        """The text ``event`` adds after the prompt and the steps before it."""
        self.tokens.append(event.token)
        if self.started or not event.text:
            return event.text
        self.started = True
        joined = self.tokenizer.decode(self.prompt + self.tokens)
        tail = joined[len(self.text) :] if joined.startswith(self.text) else ""
        lost = not tail.startswith(event.text) and tail[1:].startswith(event.text)
        return " " + event.text if tail.startswith(" ") and lost else event.text


def _completion_chunks(
    st: ServerState,
    run: _Run,
    ident: str,
    created: int,
    echo: _Echo | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(text: str, finish=None, logprobs=None) -> dict:
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": st.name,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            "usage": None,
        }

    offset = len(echo.text) if echo is not None else 0

    def on_step(event: Step) -> dict | None:
        nonlocal offset
        text = echo.step(event) if echo is not None else event.text
        lp = None
        if run.job.logprobs:
            one = _LegacyLogprobs(st)
            one.add(event, offset)
            lp = one.body()
        offset += len(text)
        if text or lp:
            return chunk(text, logprobs=lp)
        return None

    opening = [chunk(echo.text)] if echo is not None and echo.text else []
    return _events(run, opening, on_step, lambda f: chunk("", finish=f), include_usage)


async def _workers(st: ServerState, timeout: float) -> list[dict]:
    """Each stage's worker, asked for its device info (concurrently)."""
    core = st.model._core
    plan = st.model.plan_dict
    stages = plan.get("stages", [])

    async def ask(i: int, address: str, name: str) -> dict:
        started = time.perf_counter()
        # The in-process worker's port is a detail: it is this device.
        shown = "local" if address == st.local_worker else address
        entry: dict[str, Any] = {"stage": i, "address": shown, "name": name}
        if i < len(stages):
            layers = stages[i]["layers"]
            entry["layers"] = [layers["start"], layers["end"]]
        try:
            info = json.loads(await asyncio.to_thread(_core.worker_info, address, timeout))
        except (ConnectionError, ValueError, RuntimeError) as e:
            entry.update(reachable=False, error=str(e))
            return entry
        entry.update(reachable=True, latency_ms=round((time.perf_counter() - started) * 1e3, 2))
        entry["info"] = info
        shard = info.get("shard")
        held = [shard["layer_start"], shard["layer_end"]] if shard else None
        if held != entry.get("layers"):
            # Answering, but not holding its part of the plan (it restarted).
            entry["reachable"] = False
            entry["error"] = f"holds layers {held} instead of {entry.get('layers')}"
        return entry

    return list(
        await asyncio.gather(
            *(ask(i, a, n) for i, (a, n) in enumerate(zip(core.addresses, core.names, strict=True)))
        )
    )


async def _monitor(st: ServerState) -> None:
    """Health checks between requests: a stage that stops answering gets
    the model re-planned without it before the next request needs it, and
    a worker left out that answers again is taken back."""
    interval = st.settings.health_interval
    while True:
        await asyncio.sleep(interval)
        if st.engine.active:
            # Running sequences notice a failure themselves (their streams
            # break or miss their deadline); a probe now could wait behind
            # a long step and misread a busy worker as a dead one.
            continue
        try:
            down = [w for w in await _workers(st, timeout=interval) if not w["reachable"]]
            if down:
                names = ", ".join(f"{w['name']} ({w['address']})" for w in down)
                st.replan_soon(f"no answer to health checks from {names}")
            elif await asyncio.to_thread(st.model._core.excluded_back):
                st.replan_soon("a worker left out of the plan answers again")
        except (ConnectionError, ValueError, RuntimeError, OSError) as e:
            print(f"mlx-dist: health check failed: {e}", file=sys.stderr, flush=True)


async def _cluster_status(st: ServerState) -> dict:
    engine = st.engine
    active, peak, cache = _core.memory()
    body: dict[str, Any] = {
        "model": st.name,
        "model_type": st.model.model_type,
        "context_length": st.context_length,
        "max_context": st.context_limit,
        "distributed": st.over_workers,
        "engine": {
            "active_sequences": engine.active,
            "queued": engine.queued,
            "max_concurrency": engine.max_active,
            "max_queue": engine.max_queue,
            "busy_seconds": engine.busy_seconds,
            "tokens_processed": engine.tokens_processed,
        },
        "coordinator": {
            "mlx_active_memory": active,
            "mlx_peak_memory": peak,
            "mlx_cache_memory": cache,
        },
    }
    body["engine"]["in_flight_steps"] = engine.active if st.distributed else 0
    if st.distributed:
        core = st.model._core
        body["epoch"] = core.epoch
        body["workers"] = core.all_workers
        body["excluded"] = core.excluded
        body["recoveries"] = st.model.recoveries
        body["plan"] = st.model.plan_dict
        body["plan_text"] = st.model.plan
    body["devices"] = await _devices(st)
    return body


async def _devices(st: ServerState) -> list[dict]:
    """Each stage's device with its figures. Busy fraction and mean batch
    here are over the worker's lifetime; ``/metrics`` has recent ones."""
    engine = st.engine
    if st.distributed:
        micros = st.model.last_stage_micros
        workers = await _workers(st, timeout=2.0)
        for w in workers:
            i = w["stage"]
            w["last_step_ms"] = micros[i] / 1e3 if i < len(micros) else None
            info = w.get("info") or {}
            if info.get("uptime_micros"):
                w["busy_fraction"] = info["busy_micros"] / info["uptime_micros"]
            if info.get("batches"):
                w["mean_batch"] = info["batched_steps"] / info["batches"]
        return workers
    active, peak, _ = _core.memory()
    info = json.loads(await asyncio.to_thread(_core.device_info, socket.gethostname()))
    uptime = int((time.perf_counter() - engine.started) * 1e6)
    info.update(
        mlx_active_memory=active,
        mlx_peak_memory=peak,
        busy_micros=int(engine.busy_seconds * 1e6),
        tokens_processed=engine.tokens_processed,
        steps=engine.steps,
        uptime_micros=uptime,
        sequences=engine.active,
    )
    return [
        {
            "stage": 0,
            "name": info["name"],
            "address": "local",
            "reachable": True,
            "layers": [0, st.model._core.num_layers],
            "last_step_ms": None,
            "busy_fraction": info["busy_micros"] / uptime if uptime else 0.0,
            "info": info,
        }
    ]


# ``uvicorn mlx_dist.server:app``: configured from the environment at start-up.
app = create_app()


def _guarded_protocol(header_timeout: float) -> type:
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
            self._header_timer = asyncio.get_running_loop().call_later(
                header_timeout, self._expire
            )

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
    # Settings not given (None) come from MLX_DIST_* variables, else the defaults.
    cfg = ServerSettings.from_env()
    given = dict(settings, model=model, workers=workers, api_key=api_key)
    for name, value in given.items():
        if value is not None:
            setattr(cfg, name, value)
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
            http=_guarded_protocol(cfg.header_timeout),
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
