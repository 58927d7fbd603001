"""Llama 3.1-3.3's calls: a JSON object ``{"name": ..., "parameters": {...}}``
as the whole answer (several separated by ``;``), or after
``<|python_tag|>``, where a built-in tool's call is Python
(``brave_search.call(query="...")``)."""

from __future__ import annotations

import ast
import json

from mlx_dist.server.tools.json_call import call_sequence
from mlx_dist.server.tools.parser import CallFormat, Found, Region, Start

PYTHON_TAG = "<|python_tag|>"


class Llama3(CallFormat):
    name = "llama3"
    starts = (PYTHON_TAG,)

    def find_start(self, text: str, at_start: bool) -> Start:
        if at_start:
            body = text.lstrip()
            if not body:
                # Space before the answer: it may still open with a call.
                return Start(None, hold=len(text))
            if body[0] == "{":
                return Start(len(text) - len(body), 0)
        return super().find_start(text, at_start)

    def scan(self, region: str, final: bool) -> Region:
        i = len(PYTHON_TAG) if region.startswith(PYTHON_TAG) else 0
        j = i
        while j < len(region) and (region[j].isspace() or region[j] == ";"):
            j += 1
        if i and j < len(region) and region[j] != "{":
            return _python_calls(region, j, final)
        return call_sequence(region, i, ";")

    def opening(self, name: str | None) -> str:
        if name is None:
            return '{"name": "'
        return f'{{"name": {json.dumps(name)}, "parameters": '


def _python_calls(region: str, i: int, final: bool) -> Region:
    """Python calls after the tag, read once the output has ended."""
    if not final:
        return Region()
    try:
        tree = ast.parse(region[i:].strip())
        calls = []
        for stmt in tree.body:
            call = stmt.value if isinstance(stmt, ast.Expr) else None
            if not isinstance(call, ast.Call) or call.args:
                return Region(text=True)
            f = call.func
            if isinstance(f, ast.Attribute) and f.attr == "call" and isinstance(f.value, ast.Name):
                name = f.value.id
            elif isinstance(f, ast.Name):
                name = f.id
            else:
                return Region(text=True)
            args = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            calls.append(Found(name, json.dumps(args)))
    except (SyntaxError, ValueError, TypeError):
        return Region(text=True)
    return Region(calls, text=not calls)
