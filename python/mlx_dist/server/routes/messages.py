"""Anthropic's Messages API, ``POST /v1/messages``: a thin layer over the
chat machinery (:mod:`mlx_dist.server.chat`). Content blocks become chat
messages (``tool_use`` an assistant's call, ``tool_result`` a tool
message), the answer becomes ``thinking``, ``text`` and ``tool_use``
blocks, streamed as Anthropic's events. Errors have Anthropic's shape
(:func:`mlx_dist.server.errors.shape_for`); the API key may come as
``x-api-key``, as Anthropic's clients send it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_dist.server.chat import Answer, ChatPlan, answer_stream, chat_request, collect, start_chat
from mlx_dist.server.errors import GENERATE_ERRORS, APIError, bad, responses
from mlx_dist.server.routes.deps import Ready
from mlx_dist.server.run import Run
from mlx_dist.server.schemas import ChatRequest, MessagesRequest
from mlx_dist.server.sse import named_sse, stream
from mlx_dist.server.state import ServerState
from mlx_dist.server.tools.parser import Delta
from mlx_dist.server.validation import check_text

router = APIRouter()

_NAMES = {"stop": "stop_sequences"}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _blocks_text(content, where: str) -> str:
    """Text content: a string or text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of text blocks", where)
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else None
            raise bad(f"{where}[{i}]: only text blocks are supported here, got {kind!r}", where)
        texts.append(str(block.get("text", "")))
    return "\n".join(texts)


def _message(m: dict, i: int) -> list[dict]:
    """The chat messages of Anthropic message ``m``: a user's tool results
    come first, as tool messages; an assistant's tool uses are its calls."""
    where = f"messages[{i}]"
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise bad(f"{where}.role must be 'user' or 'assistant', got {role!r}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of blocks", f"{where}.content")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad(f"{at}: a tool_use block needs its id and name", at)
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(f"{at}: a tool_result block needs its tool_use_id", at)
            text = _blocks_text(block.get("content") or "", f"{at}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning is not shown to the model again
        else:
            raise bad(f"{at}: {kind!r} blocks are not supported in a {role} message", at)
    out = list(results)
    if role == "assistant":
        out.append({"role": role, "content": "\n".join(texts) or None, "tool_calls": calls or None})
    elif texts or not results:
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def as_chat(req: MessagesRequest) -> ChatRequest:
    """The chat completion request ``req`` asks for (400 naming the block
    that cannot be one)."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _blocks_text(req.system, "system")})
    if not req.messages:
        raise bad("messages must not be empty", "messages")
    for i, m in enumerate(req.messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        messages.extend(_message(m, i))
    tools = None
    if req.tools is not None:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
                raise bad(f"tools[{i}]: only custom tools with a name are supported", f"tools[{i}]")
            f = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
            if t.get("description"):
                f["description"] = t["description"]
            tools.append({"type": "function", "function": f})
    choice = None
    if req.tool_choice is not None:
        kind = req.tool_choice.get("type")
        if kind == "tool":
            choice = {"type": "function", "function": {"name": req.tool_choice.get("name")}}
        elif kind in _CHOICES:
            choice = _CHOICES[kind]
        else:
            raise bad("tool_choice.type must be auto, any, tool or none", "tool_choice")
    kwargs = dict(req.chat_template_kwargs or {})
    if req.thinking is not None:
        kwargs.setdefault("enable_thinking", req.thinking.get("type") == "enabled")
    return chat_request(
        model=req.model,
        messages=messages,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=req.stop_sequences,
        tools=tools,
        tool_choice=choice,
        chat_template_kwargs=kwargs or None,
        reasoning_format=req.reasoning_format,
    )


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(st: ServerState, answer: Answer, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's stop reason, and the stop sequence met (the engine says
    "stop" for both an end token and a stop string: which one it was is
    read from the last token and the text the stop string cut)."""
    if answer.calls:
        return "tool_use", None
    if answer.finish_reason == "length":
        return "max_tokens", None
    if stops and answer.steps:
        eos = set(getattr(st.tokenizer, "eos_token_ids", None) or [])
        tokens = [s.token for s in answer.steps]
        if tokens[-1] not in eos:
            text = st.tokenizer.decode(tokens)
            met = [(text.find(s), s) for s in stops if s in text]
            if met:
                return "stop_sequence", min(met)[1]
    return "end_turn", None


def _usage(answer: Answer) -> dict:
    done = answer.done
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": done.completion_tokens,
    }


def message_body(st: ServerState, ident: str, answer: Answer, stops: list[str]) -> dict:
    content: list[dict] = []
    if answer.reasoning:
        content.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
    if answer.content:
        content.append({"type": "text", "text": answer.content})
    for c in answer.calls:
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(c.id),
                "name": c.name,
                "input": _input(c.arguments),
            }
        )
    reason, sequence = stop_reason(st, answer, stops)
    body = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": st.name,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(answer),
    }
    if answer.problems:
        # Not Anthropic's: what is wrong with the calls, where there is something.
        body["tool_call_errors"] = answer.problems
    return body


class _Blocks:
    """Content blocks as Anthropic streams them: each started, its
    deltas, stopped when another begins or the answer ends."""

    def __init__(self):
        self.index = -1
        self.kind: str | None = None
        self.calls: dict[int, int] = {}

    def _start(self, block: dict) -> list[str]:
        out = self.stop()
        self.index += 1
        self.kind = block["type"]
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        out.append(named_sse("content_block_start", start))
        return out

    def stop(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [
            named_sse("content_block_stop", {"type": "content_block_stop", "index": self.index})
        ]

    def _delta(self, delta: dict, index: int | None = None) -> str:
        body = {"type": "content_block_delta", "index": self.index if index is None else index}
        return named_sse("content_block_delta", {**body, "delta": delta})

    def delta(self, d: Delta) -> list[str]:
        out = []
        if d.reasoning:
            if self.kind != "thinking":
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.content:
            if self.kind != "text":
                out += self._start({"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": d.content}))
        for c in d.calls:
            if c.id is not None:
                block = {"type": "tool_use", "id": tool_use_id(c.id), "name": c.name, "input": {}}
                out += self._start(block)
                self.calls[c.index] = self.index
            if c.arguments:
                delta = {"type": "input_json_delta", "partial_json": c.arguments}
                out.append(self._delta(delta, self.calls[c.index]))
        return out


async def _stream(
    st: ServerState, run: Run, plan: ChatPlan, ident: str, stops: list[str]
) -> AsyncIterator[str]:
    blocks = _Blocks()
    try:
        start = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": st.name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": len(plan.prompt), "output_tokens": 0},
        }
        yield named_sse("message_start", {"type": "message_start", "message": start})
        async for item in answer_stream(run, plan):
            if isinstance(item, Answer):
                for e in blocks.stop():
                    yield e
                reason, sequence = stop_reason(st, item, stops)
                delta = {"stop_reason": reason, "stop_sequence": sequence}
                end = {"type": "message_delta", "delta": delta, "usage": _usage(item)}
                if item.problems:
                    end["tool_call_errors"] = item.problems
                yield named_sse("message_delta", end)
                yield named_sse("message_stop", {"type": "message_stop"})
            else:
                for e in blocks.delta(item[1]):
                    yield e
    except APIError as e:
        yield named_sse("error", e.body("anthropic"))


@router.post("/v1/messages", responses=responses(*GENERATE_ERRORS, stream=True, shape="anthropic"))
async def create_message(req: MessagesRequest, request: Request, st: Ready):
    """A message (Anthropic's Messages API) over the chat machinery."""
    check_text(req.model_dump(), "")
    st.check_model(req.model)
    plan, run = await start_chat(st, as_chat(req), _NAMES)
    ident = f"msg_{uuid.uuid4().hex}"
    stops = list(req.stop_sequences or [])
    if req.stream:
        return stream(_stream(st, run, plan, ident, stops))
    answer = await collect(run, plan, request)
    if answer is None:
        return Response(status_code=499)
    return message_body(st, ident, answer, stops)
