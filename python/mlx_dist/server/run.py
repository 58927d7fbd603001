"""A request's job on the engine, with its events as an async iterator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request

from mlx_dist.engine import Done, EngineStopped, Failed, Job, QueueFull, Step
from mlx_dist.server.errors import engine_error
from mlx_dist.server.state import ServerState

# How often a non-streamed generation checks that its client is still there.
_DISCONNECT_POLL_S = 0.25


class Run:
    """A job submitted to the engine and its events, as an async iterator.
    A queue at its bound or a stopped engine is an :class:`APIError` here."""

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
            raise engine_error(e) from None
        except EngineStopped as e:
            raise engine_error(e) from None
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
                    raise engine_error(event.error, self.local_worker)
                yield event
                if isinstance(event, Done):
                    return
        finally:
            self.job.cancel()

    async def collect(self, request: Request) -> tuple[list[Step], Done | None]:
        """The steps and the end (None: the client went away)."""
        steps, done = [], None
        async for event in self.events(request):
            if isinstance(event, Step):
                steps.append(event)
            else:
                done = event
        return steps, done
