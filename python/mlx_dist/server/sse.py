"""Answers' pieces: server-sent event framing (``data:`` lines, and
``event:`` lines for the Responses and Messages APIs), the chunks of a
streamed chat or text completion, and what streamed and whole answers
share (usage, logprobs, echo)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from mlx_dist.engine import Done, Step
from mlx_dist.server.chat import Answer
from mlx_dist.server.errors import APIError
from mlx_dist.server.run import Run
from mlx_dist.server.state import ServerState
from mlx_dist.server.tools.parser import Delta


def usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def chat_logprob(state: ServerState, step: Step) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = state.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    out = entry(step.token, step.logprob)
    out["top_logprobs"] = [entry(t, lp) for t, lp in step.top_logprobs or []]
    return out


def sse(data: dict | str) -> str:
    """One event: ``data: <JSON or text>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def named_sse(event: str, data: dict) -> str:
    """One event with its type: ``event: <type>``, ``data: <JSON>``."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def events(
    run: Run,
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
            yield sse(c)
        async for event in run.events():
            if isinstance(event, Step):
                c = on_step(event)
                if c is not None:
                    yield sse(c)
            else:
                yield sse(closing(event.finish_reason))
                if include_usage:
                    last = closing(None)
                    last["choices"] = []
                    last["usage"] = usage(event)
                    yield sse(last)
    except APIError as e:
        yield sse(e.body())
    yield sse("[DONE]")


def delta_body(d: Delta) -> dict:
    """A chat chunk's ``delta`` for what ``d`` adds: a call's first piece
    carries its id, type and name, later ones its index and more arguments."""
    body: dict = {}
    if d.content:
        body["content"] = d.content
    if d.reasoning:
        body["reasoning_content"] = d.reasoning
    calls: dict[int, dict] = {}
    for c in d.calls:
        if c.index in calls:
            calls[c.index]["function"]["arguments"] += c.arguments
        elif c.id is not None:
            calls[c.index] = {
                "index": c.index,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
        else:
            calls[c.index] = {"index": c.index, "function": {"arguments": c.arguments}}
    if calls:
        body["tool_calls"] = list(calls.values())
    return body


async def chat_chunks(
    st: ServerState,
    answer: AsyncIterator,
    ident: str,
    created: int,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[str]:
    """A chat answer (:func:`mlx_dist.server.chat.answer_stream`) as chat
    completion chunks; an error event if it fails; then ``[DONE]``."""

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

    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for item in answer:
            if isinstance(item, Answer):
                last = chunk({}, finish=item.finish_reason)
                if item.problems:
                    last["choices"][0]["tool_call_errors"] = item.problems
                yield sse(last)
                if include_usage:
                    last = chunk({})
                    last["choices"] = []
                    last["usage"] = usage(item.done)
                    yield sse(last)
                continue
            step, d = item
            lp = None
            if logprobs and step is not None:
                lp = {"content": [chat_logprob(st, step)]}
            body = delta_body(d)
            if body or lp:
                yield sse(chunk(body or {"content": ""}, logprobs=lp))
    except APIError as e:
        yield sse(e.body())
    yield sse("[DONE]")


class LegacyLogprobs:
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


class Echo:
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


def completion_chunks(
    st: ServerState,
    run: Run,
    ident: str,
    created: int,
    echo: Echo | None,
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
            one = LegacyLogprobs(st)
            one.add(event, offset)
            lp = one.body()
        offset += len(text)
        if text or lp:
            return chunk(text, logprobs=lp)
        return None

    opening = [chunk(echo.text)] if echo is not None and echo.text else []
    return events(run, opening, on_step, lambda f: chunk("", finish=f), include_usage)
