"""OpenAI's Responses API, ``POST /v1/responses``: a thin layer over the
chat machinery (:mod:`mlx_dist.server.chat`). Input items become chat
messages (``function_call`` an assistant's call, ``function_call_output``
a tool message), the answer becomes output items (``reasoning``,
``message``, ``function_call``), streamed as typed events. Nothing is
stored: ``previous_response_id`` is refused, the whole conversation comes
in ``input``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_dist.server.chat import Answer, ChatPlan, answer_stream, chat_request, collect, start_chat
from mlx_dist.server.errors import GENERATE_ERRORS, APIError, bad, responses
from mlx_dist.server.routes.deps import Ready
from mlx_dist.server.run import Run
from mlx_dist.server.schemas import ChatRequest, ResponsesRequest
from mlx_dist.server.sse import named_sse, stream
from mlx_dist.server.state import ServerState
from mlx_dist.server.tools.parser import Delta
from mlx_dist.server.validation import check_text

router = APIRouter()

# The chat request's names of what this API names otherwise.
_NAMES = {"max_tokens": "max_output_tokens", "messages": "input"}
_ROLES = ("user", "assistant", "system", "developer")


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of text parts", where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise bad(f"{where}[{i}]: only text parts are supported, got {kind!r}", f"{where}[{i}]")
        texts.append(part["text"])
    return "".join(texts)


def as_chat(req: ResponsesRequest) -> ChatRequest:
    """The chat completion request ``req`` asks for (400 naming the item
    that cannot be one)."""
    if req.previous_response_id is not None:
        raise bad(
            "previous_response_id is not supported: this server stores no responses; "
            "send the whole conversation in input",
            "previous_response_id",
        )
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise bad("input must not be empty", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad(f"{where}.role must be one of {list(_ROLES)}, got {role!r}", where)
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise bad(f"{where}: a function_call needs its name and call_id", where)
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # The same turn: its text, then its calls.
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad(f"{where}: a function_call_output needs its call_id", where)
            output = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind != "reasoning":  # earlier reasoning is not shown to the model again
            raise bad(f"{where}.type {kind!r} is not supported", where)
    tools = None
    if req.tools is not None:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") != "function":
                raise bad(f"tools[{i}]: only function tools are supported", f"tools[{i}]")
            f = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
            tools.append({"type": "function", "function": f})
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return chat_request(
        model=req.model,
        messages=messages,
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=tools,
        tool_choice=choice,
        chat_template_kwargs=req.chat_template_kwargs,
        reasoning_format=req.reasoning_format,
    )


def _base(st: ServerState, req: ResponsesRequest, ident: str, created: int) -> dict:
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "model": st.name,
        "output": [],
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": req.metadata or {},
        "error": None,
        "incomplete_details": None,
        "usage": None,
    }


def _finished(base: dict, output: list[dict], answer: Answer) -> dict:
    done = answer.done
    body = dict(base, output=output, status="completed")
    if answer.finish_reason == "length":
        body.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    body["usage"] = {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_tokens},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }
    if answer.problems:
        # Not OpenAI's: what is wrong with the calls, where there is something.
        body["tool_call_errors"] = answer.problems
    return body


def _reasoning_item(text: str, status: str = "completed") -> dict:
    return {
        "id": f"rs_{uuid.uuid4().hex}",
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}] if text else [],
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(text: str | None, status: str = "completed") -> dict:
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [_text_part(text)],
    }


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "id": f"fc_{uuid.uuid4().hex}",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def output_items(answer: Answer) -> list[dict]:
    items = []
    if answer.reasoning:
        items.append(_reasoning_item(answer.reasoning))
    if answer.content or not answer.calls:
        items.append(_message_item(answer.content or ""))
    items.extend(_call_item(c.id, c.name, c.arguments) for c in answer.calls)
    return items


class _Events:
    """The typed events of a streamed response: each output item opened
    (``response.output_item.added``), its deltas, then closed (``.done``)
    when another begins or the answer ends."""

    def __init__(self):
        self.number = 0
        self.items: list[dict] = []
        self.open: dict | None = None
        self.calls: dict[int, dict] = {}

    def event(self, kind: str, **data) -> str:
        data = {"type": kind, "sequence_number": self.number, **data}
        self.number += 1
        return named_sse(kind, data)

    def _begin(self, item: dict) -> list[str]:
        out = self.close()
        self.open = item
        self.items.append(item)
        index = len(self.items) - 1
        out.append(self.event("response.output_item.added", output_index=index, item=dict(item)))
        if item["type"] == "message":
            item["content"] = [_text_part("")]
            out.append(self._part("response.content_part.added", item))
        return out

    def _part(self, kind: str, item: dict) -> str:
        return self.event(
            kind,
            item_id=item["id"],
            output_index=self.items.index(item),
            content_index=0,
            part=dict(item["content"][0]),
        )

    def close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.items.index(item)}
        out = []
        item["status"] = "completed"
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out.append(self.event("response.output_text.done", **where, content_index=0, text=text))
            out.append(self._part("response.content_part.done", item))
        elif item["type"] == "reasoning":
            text = "".join(c["text"] for c in item["content"])
            out.append(
                self.event("response.reasoning_text.done", **where, content_index=0, text=text)
            )
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        out.append(
            self.event("response.output_item.done", output_index=where["output_index"], item=item)
        )
        return out

    def delta(self, d: Delta) -> list[str]:
        out = []
        if d.reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                out += self._begin(_reasoning_item("", "in_progress"))
                self.open["content"] = [{"type": "reasoning_text", "text": ""}]
            self.open["content"][0]["text"] += d.reasoning
            out.append(self._delta("response.reasoning_text.delta", d.reasoning, content_index=0))
        if d.content:
            if self.open is None or self.open["type"] != "message":
                out += self._begin(_message_item(None, "in_progress"))
            self.open["content"][0]["text"] += d.content
            out.append(
                self._delta("response.output_text.delta", d.content, content_index=0, logprobs=[])
            )
        for c in d.calls:
            if c.id is not None:
                self.calls[c.index] = _call_item(c.id, c.name or "", "", "in_progress")
                out += self._begin(self.calls[c.index])
            item = self.calls[c.index]
            if c.arguments:
                item["arguments"] += c.arguments
                out.append(self._delta("response.function_call_arguments.delta", c.arguments, item))
        return out

    def _delta(self, kind: str, text: str, item: dict | None = None, **extra) -> str:
        item = item or self.open
        where = {"item_id": item["id"], "output_index": self.items.index(item)}
        return self.event(kind, **where, **extra, delta=text)


async def _stream(run: Run, plan: ChatPlan, base: dict) -> AsyncIterator[str]:
    events = _Events()
    try:
        yield events.event("response.created", response=base)
        yield events.event("response.in_progress", response=base)
        async for item in answer_stream(run, plan):
            if isinstance(item, Answer):
                for e in events.close():
                    yield e
                body = _finished(base, events.items, item)
                yield events.event(f"response.{body['status']}", response=body)
            else:
                for e in events.delta(item[1]):
                    yield e
    except APIError as e:
        yield events.event("error", code=e.code or e.type, message=e.message, param=e.param)


@router.post("/v1/responses", responses=responses(*GENERATE_ERRORS, stream=True))
async def create_response(req: ResponsesRequest, request: Request, st: Ready):
    """A model response (OpenAI's Responses API) over the chat machinery."""
    check_text(req.model_dump(), "")
    st.check_model(req.model)
    plan, run = await start_chat(st, as_chat(req), _NAMES)
    base = _base(st, req, f"resp_{uuid.uuid4().hex}", int(time.time()))
    if req.stream:
        return stream(_stream(run, plan, base))
    answer = await collect(run, plan, request)
    if answer is None:
        return Response(status_code=499)
    return _finished(base, output_items(answer), answer)
