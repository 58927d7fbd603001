"""GLM-4.5's calls: ``<tool_call>NAME`` then, for each argument,
``<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>``, then
``</tool_call>``. A value is text where the tool's schema says string,
else JSON (as GLM's template writes them); the arguments are given as a
JSON object, one argument at a time."""

from __future__ import annotations

import json
import re

from mlx_dist.server.tools.parser import CallFormat, Found, Region
from mlx_dist.server.tools.scan import find_first, held

START, END = "<tool_call>", "</tool_call>"
KEY, KEY_END, VALUE, VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
_NAME = re.compile(r"[\w.\-]+")
_PAIR = re.compile(
    re.escape(KEY)
    + r"(.*?)"
    + re.escape(KEY_END)
    + r"\s*"
    + re.escape(VALUE)
    + r"(.*?)"
    + re.escape(VALUE_END),
    re.DOTALL,
)


class Glm(CallFormat):
    name = "glm"
    starts = (START,)
    end = END

    def __init__(self, tools: list[dict]):
        # Each tool's argument types, to read its values.
        self.types = {}
        for t in tools:
            f = t.get("function") or {}
            props = (f.get("parameters") or {}).get("properties") or {}
            self.types[f.get("name")] = {k: (v or {}).get("type") for k, v in props.items()}

    def scan(self, region: str, final: bool) -> Region:
        close = region.find(END, len(START))
        body = region[len(START) : close if close >= 0 else len(region)]
        cut = find_first(body, ("\n", KEY))
        if cut is None:
            name = body.strip() if close >= 0 else body[: len(body) - held(body, (KEY,))].strip()
            if name and not _NAME.fullmatch(name) or len(name) > 256:
                return Region(text=True)
            if close < 0:
                return Region()
        else:
            name = body[: cut[0]].strip()
        if not name or not _NAME.fullmatch(name):
            return Region(text=True)
        types = self.types.get(name, {})
        pieces = [
            f"{json.dumps(k.strip(), ensure_ascii=False)}: {_value(v, types.get(k.strip()))}"
            for k, v in _PAIR.findall(body)
        ]
        args = "{" + ", ".join(pieces)
        if close < 0:
            return Region([Found(name, args)])
        return Region([Found(name, args + "}")], end=close + len(END))

    def opening(self, name: str | None) -> str:
        return START if name is None else f"{START}{name}\n"

    def steer(self, name: str | None, schema: dict | None) -> str:
        required = (schema or {}).get("required") or []
        if name is None or not required:
            return self.opening(name)
        return f"{self.opening(name)}{KEY}{required[0]}{KEY_END}\n{VALUE}"


def _value(text: str, kind) -> str:
    if kind == "string":
        return json.dumps(text, ensure_ascii=False)
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return json.dumps(text, ensure_ascii=False)
