"""A chat answer, for every API that asks for one (chat completions,
Responses, Anthropic's Messages): the prompt of a request with its tools,
``tool_choice`` and reasoning (:func:`plan_chat`), and what the output
holds as it arrives, text, reasoning and tool calls (:func:`answer_stream`),
or once it has ended (:func:`collect`). Each API only shapes these."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import ValidationError

from mlx_dist.engine import Done, Step
from mlx_dist.server.errors import APIError, bad
from mlx_dist.server.reasoning import REASONING_FORMATS, inside_think
from mlx_dist.server.run import Run
from mlx_dist.server.schemas import ChatRequest
from mlx_dist.server.state import ServerState
from mlx_dist.server.tools.choice import ToolUse, tool_use
from mlx_dist.server.tools.family import Family, detect
from mlx_dist.server.tools.messages import template_messages
from mlx_dist.server.tools.parser import Delta, OutputParser
from mlx_dist.server.tools.schema import problems
from mlx_dist.server.validation import (
    chat_text,
    check_range,
    messages_of,
    options,
    template_args,
)


@dataclass
class ChatPlan:
    """A chat request made ready to run: its prompt and options, and how
    its answer is read. ``prefill``: the start of the answer the server
    wrote into the prompt (a call's opening, for ``tool_choice``)."""

    prompt: list[int]
    opts: dict
    top: int | None
    family: Family
    use: ToolUse | None
    reasoning: bool
    thinking: bool
    prefill: str = ""

    @property
    def reads_calls(self) -> bool:
        return self.use is not None and self.use.choice != "none" and bool(self.use.tools)

    def parser(self) -> OutputParser:
        tools = self.use.tools if self.use is not None else []
        return self.family.parser(
            tools, calls=self.reads_calls, reasoning=self.reasoning, thinking=self.thinking
        )


def chat_request(**fields) -> ChatRequest:
    """The chat request another API's request asks for (a 400 naming the
    field when a value it passed on does not fit)."""
    try:
        return ChatRequest(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise bad(f"{where}: {first.get('msg')}", where or None) from None


def family_of(state: ServerState) -> Family:
    tok = state.tokenizer
    template = tok.chat_template if tok.has_chat_template else None
    return detect(template, getattr(state.model, "model_type", None))


def reasoning_format(state: ServerState, req: ChatRequest) -> str:
    given = getattr(req, "reasoning_format", None)
    value = state.settings.reasoning_format if given is None else given
    if value not in REASONING_FORMATS:
        raise bad(
            f"reasoning_format must be one of {list(REASONING_FORMATS)}, got {value!r}",
            "reasoning_format",
        )
    return value


def plan_chat(state: ServerState, req: ChatRequest) -> ChatPlan:
    """The prompt of ``req`` and how to read its answer (the template
    runs here: call it in a thread). Each bad value is a 400."""
    messages = messages_of(req.messages)
    tools, add, extra = template_args(req)
    use = tool_use(tools, getattr(req, "tool_choice", None))
    family = family_of(state)
    shown = use.tools if use is not None and use.choice != "none" and use.tools else None
    text = chat_text(state, template_messages(messages, family, shown), add, shown, extra)
    apart = reasoning_format(state, req)
    reasoning = apart == "deepseek" or (
        apart == "auto" and (family.thinks or family.name == "gpt-oss")
    )
    thinking = reasoning and family.name != "gpt-oss" and inside_think(text)
    prefill, stop = "", None
    if use is not None and use.choice in ("required", "function"):
        name = use.forced
        fmt = family.format(use.tools)
        prefill = fmt.steer(name, use.schema(name))
        # One call is what a named function asks for: end at its end.
        stop = fmt.end if use.choice == "function" else None
        if thinking:
            # A call cannot start inside the think block: close it first.
            prefill = "</think>\n\n" + prefill
    tok = state.tokenizer
    prompt = tok.encode(text + prefill, add_special_tokens=not tok.has_chat_template)
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    opts = options(state, req, prompt, max_tokens)
    if stop is not None:
        opts["stop"] = [*opts["stop"], stop]
    top = None
    if req.logprobs:
        top = req.top_logprobs or 0
        check_range(top, "top_logprobs", 0, 20)
    elif req.top_logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return ChatPlan(prompt, opts, top, family, use, reasoning, thinking, prefill)


async def start_chat(
    state: ServerState, req: ChatRequest, names: dict[str, str] | None = None
) -> tuple[ChatPlan, Run]:
    """Plans `req` off the event loop and makes its run. An error names its
    parameter as the calling API does (``names``: chat's name to that API's)."""
    try:
        plan = await asyncio.to_thread(plan_chat, state, req)
    except APIError as e:
        raise e.renamed(names or {}) from None
    return plan, Run(state, plan.prompt, plan.opts, plan.top)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str

    def openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class Answer:
    """A whole answer. ``content`` is None when the answer is calls and
    space only; ``problems``: what is wrong with its calls (arguments that
    are not JSON or do not fit the schema, no call where one was asked),
    each naming its call; ``finish_reason`` is ``tool_calls`` when the
    model stopped after calling."""

    content: str | None
    reasoning: str | None
    calls: list[ToolCall]
    finish_reason: str
    problems: list[str]
    done: Done
    steps: list[Step] = field(default_factory=list)


class _Spaces:
    """Holds text that is only space until text follows: space around
    calls is not sent, so a streamed answer equals the whole one."""

    def __init__(self):
        self.held = ""

    def pass_on(self, delta: Delta, final: bool = False, calls: bool = False) -> Delta:
        text = self.held + delta.content
        if text.strip():
            body = text.rstrip()
            delta.content, self.held = body, text[len(body) :]
        else:
            delta.content, self.held = "", text
        if final and not calls:
            delta.content += self.held
            self.held = ""
        return delta


class _Assembly:
    """Deltas into an :class:`Answer`."""

    def __init__(self, plan: ChatPlan):
        self.plan = plan
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, ToolCall] = {}

    def add(self, d: Delta) -> None:
        self.content.append(d.content)
        self.reasoning.append(d.reasoning)
        for c in d.calls:
            if c.index not in self.calls:
                self.calls[c.index] = ToolCall(c.id or "", c.name or "", "")
            self.calls[c.index].arguments += c.arguments

    def answer(self, done: Done, steps: list[Step]) -> Answer:
        calls = [self.calls[i] for i in sorted(self.calls)]
        content = "".join(self.content)
        reasoning = "".join(self.reasoning)
        finish = done.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        return Answer(
            None if calls and not content else content,
            reasoning or None,
            calls,
            finish,
            check_calls(calls, self.plan.use),
            done,
            steps,
        )


def check_calls(calls: list[ToolCall], use: ToolUse | None) -> list[str]:
    """What is wrong with ``calls`` for the tools and choice of ``use``."""
    if use is None or use.choice == "none":
        return []
    out = []
    if use.choice in ("required", "function") and not calls:
        want = f"a call of {use.forced!r}" if use.forced else "a tool call"
        out.append(f"tool_choice asked for {want}, but the answer has none")
    for i, c in enumerate(calls):
        where = f"tool_calls[{i}]"
        if c.name not in use.names:
            out.append(f"{where}: there is no tool named {c.name!r}")
            continue
        if use.choice == "function" and c.name != use.name:
            out.append(f"{where}: tool_choice named {use.name!r}, not {c.name!r}")
        try:
            args = json.loads(c.arguments)
        except json.JSONDecodeError as e:
            out.append(f"{where}: the arguments are not valid JSON ({e}): {c.arguments!r}")
            continue
        out.extend(f"{where}: {p}" for p in problems(args, use.schema(c.name) or {}))
    return out


async def answer_stream(
    run: Run, plan: ChatPlan, request: Request | None = None
) -> AsyncIterator[tuple[Step | None, Delta] | Answer]:
    """The answer as it arrives: for each step (None for the server's own
    prefill and for what the end releases) what it adds, then the whole
    :class:`Answer`. A failure raises ``APIError``; with ``request``, a
    client gone away ends it early (no Answer)."""
    parser = plan.parser()
    spaces = _Spaces()
    assembly = _Assembly(plan)
    steps: list[Step] = []
    if plan.prefill:
        d = spaces.pass_on(parser.feed(plan.prefill))
        assembly.add(d)
        yield None, d
    async for event in run.events(request):
        if isinstance(event, Step):
            steps.append(event)
            d = spaces.pass_on(parser.feed(event.text))
            assembly.add(d)
            yield event, d
        else:
            d = parser.finish()
            d = spaces.pass_on(d, final=True, calls=bool(assembly.calls or d.calls))
            assembly.add(d)
            yield None, d
            yield assembly.answer(event, steps)


async def collect(run: Run, plan: ChatPlan, request: Request) -> Answer | None:
    """The whole answer (None: the client went away)."""
    async for item in answer_stream(run, plan, request):
        if isinstance(item, Answer):
            return item
    return None
