"""Messages as chat templates take them. An assistant's
``tool_calls[].function.arguments`` arrive as JSON text from OpenAI
clients, and templates (Qwen's, Llama's) write them with ``tojson``: they
are given as objects, as vLLM and transformers do. For a template that
knows no tools, the tools are described in a system note, and calls and
their results are written into the text in the generic format."""

from __future__ import annotations

import json

from mlx_dist.server.tools.family import Family
from mlx_dist.server.tools.hermes import END, START

RESPONSE, RESPONSE_END = "<tool_response>", "</tool_response>"


def system_note(tools: list[dict]) -> str:
    """The generic format, described (Qwen 2.5's words, which many
    models were trained on)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        f"within {START}{END} XML tags:\n"
        f'{START}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{END}'
    )


def _arguments(call: dict) -> dict:
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("arguments"), str):
        return call
    try:
        args = json.loads(f["arguments"])
    except json.JSONDecodeError:
        return call  # the template gets the text as it came
    return {**call, "function": {**f, "arguments": args}}


def _written(call: dict) -> str:
    f = call.get("function") or {}
    body = {"name": f.get("name"), "arguments": f.get("arguments")}
    return f"{START}\n{json.dumps(body, ensure_ascii=False)}\n{END}"


def template_messages(messages: list[dict], family: Family, tools: list[dict] | None) -> list[dict]:
    """``messages`` for ``family``'s template, with ``tools`` (None: none
    shown) described in a system note where it cannot render them."""
    out: list[dict] = []
    written = not family.renders_calls
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [_arguments(c) for c in calls]
        if written and m["role"] == "assistant" and calls:
            text = "\n".join(_written(c) for c in m.pop("tool_calls"))
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        elif written and m["role"] == "tool":
            result = f"{RESPONSE}\n{m.get('content') or ''}\n{RESPONSE_END}"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
                continue
            m = {"role": "user", "content": result, "tool_results": True}
        out.append(m)
    for m in out:
        m.pop("tool_results", None)
    if tools and not family.renders_tools:
        note = system_note(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out
