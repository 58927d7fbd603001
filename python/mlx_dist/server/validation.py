"""Request bodies to what the engine takes: a prompt's token ids and the
options of ``_core.Generation``. Each bad value is a 400 naming its
parameter; checks that need the model ask the :class:`ServerState`."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from mlx_dist.server.errors import bad
from mlx_dist.server.schemas import ChatMessage, ChatRequest, Sampling, TokenizeRequest
from mlx_dist.server.state import ServerState

_ROLES = {"system", "user", "assistant", "tool", "developer"}


def messages_of(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise bad("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise bad(
                f"messages[{i}].role must be one of {sorted(_ROLES)}, got {m.role!r}",
                f"messages[{i}].role",
            )
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad(
                        f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                        f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "".join(texts)
        msg: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content or "",
        }
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            value = getattr(m, key)
            if value is not None:
                msg[key] = value
        out.append(msg)
    return out


def check_text(value: Any, where: str) -> None:
    """Refuses a string anywhere in a request that is not valid Unicode (a
    lone surrogate, as JSON's "\\ud800" gives): no tokenizer can take it."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise bad(
                f"{where} is not valid Unicode text (it has a lone surrogate)", where
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")
    elif isinstance(value, BaseModel):
        check_text(value.model_dump(), where)


def _dumps(value: Any, param: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise bad(f"{param} cannot be given to the chat template: {e}", param) from None


def template_args(req: ChatRequest | TokenizeRequest) -> tuple[list | None, bool, dict]:
    """The request's tools, ``add_generation_prompt`` and other template
    variables (``chat_template_kwargs``, which may give the first two)."""
    extra = dict(getattr(req, "chat_template_kwargs", None) or {})
    tools = getattr(req, "tools", None)
    if "tools" in extra:
        if tools is not None:
            raise bad("tools is given twice: in the request and in chat_template_kwargs", "tools")
        tools = extra.pop("tools")
        if tools is not None and not isinstance(tools, list):
            raise bad("chat_template_kwargs.tools must be a list", "chat_template_kwargs.tools")
    add = extra.pop("add_generation_prompt", True)
    if not isinstance(add, bool):
        raise bad(
            "chat_template_kwargs.add_generation_prompt must be true or false",
            "chat_template_kwargs.add_generation_prompt",
        )
    if "messages" in extra:
        raise bad(
            "chat_template_kwargs cannot replace the messages", "chat_template_kwargs.messages"
        )
    return tools, add, extra


def chat_text(
    state: ServerState, messages: list[dict], add: bool, tools: list | None, extra: dict
) -> str:
    """The chat template over ``messages`` (as :func:`messages_of` gives
    them), as text; without a template, ``role: content`` lines."""
    if not state.tokenizer.has_chat_template:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    try:
        return state.render_chat(
            _dumps(messages, "messages"),
            add,
            _dumps(tools, "tools") if tools is not None else None,
            _dumps(extra, "chat_template_kwargs") if extra else None,
        )
    except ValueError as e:
        raise bad(f"the chat template failed on these messages: {e}", "messages") from None


def chat_prompt(state: ServerState, req: ChatRequest | TokenizeRequest) -> list[int]:
    """The request's messages through the chat template, as token ids
    (seconds for a megabyte: call it in a thread)."""
    messages = messages_of(req.messages or [])
    tools, add, extra = template_args(req)
    text = chat_text(state, messages, add, tools, extra)
    return state.tokenizer.encode(text, add_special_tokens=not state.tokenizer.has_chat_template)


def check_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    vocab = state.vocab_size
    outside = next((t for t in ids if not 0 <= t < vocab), None)
    if outside is not None:
        raise bad(f"token id {outside} is outside the vocabulary (0 to {vocab - 1})", param)
    return ids


def completion_prompt(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad("one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        tok = state.tokenizer
        bos = tok.bos_token
        return tok.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    return check_ids(state, list(prompt), "prompt")


def check_range(value, name: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise bad(f"{name} must be between {lo:g} and {hi:g}, got {value}", name)


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


def options(state: ServerState, req: Sampling, prompt: list[int], max_tokens) -> dict:
    """The keyword arguments of ``_core.Generation`` for this request."""
    if not prompt:
        raise bad("the prompt is empty", "prompt")
    if req.n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    room = state.context_limit - len(prompt)
    if room <= 0:
        raise bad(
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
        raise bad(f"{param} must be at least 1, got {max_tokens}", param)
    elif max_tokens > room:
        raise bad(
            f"{param} is too large: {max_tokens} tokens requested, room for {room} after "
            f"the prompt of {len(prompt)} ({_limit_text(state)})",
            param,
            "context_length_exceeded",
        )
    temp = state.settings.temperature if req.temperature is None else req.temperature
    check_range(temp, "temperature", 0, 2)
    top_p = state.settings.top_p if req.top_p is None else req.top_p
    check_range(top_p, "top_p", 0, 1)
    check_range(req.min_p, "min_p", 0, 1)
    if req.top_k is not None and not -1 <= req.top_k < 1 << 31:
        raise bad("top_k must be -1 (off), 0 (off) or a count of tokens below 2^31", "top_k")
    check_range(req.frequency_penalty, "frequency_penalty", -2, 2)
    check_range(req.presence_penalty, "presence_penalty", -2, 2)
    if req.repetition_penalty is not None and not 0 < req.repetition_penalty <= 10:
        raise bad("repetition_penalty must be above 0 and at most 10", "repetition_penalty")
    context = req.repetition_context_size
    if context is not None and not 1 <= context <= 1 << 16:
        raise bad("repetition_context_size must be between 1 and 65536", "repetition_context_size")
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
                raise bad(f"logit_bias keys are token ids, got {key!r}", "logit_bias") from None
            check_ids(state, [token], "logit_bias")
            check_range(value, "logit_bias", -100, 100)
            bias.append((token, float(value)))
        opts["logit_bias"] = bias
    return opts


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise bad("at most 16 stop sequences are supported", "stop")
    if any(not s for s in stops):
        raise bad("stop sequences must not be empty", "stop")
    return stops
