"""Hermes' and Qwen's calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
one call a block. Also the generic format, for templates that know no
other (the server then describes it to the model: :mod:`.messages`)."""

from __future__ import annotations

import json

from mlx_dist.server.tools.json_call import object_region
from mlx_dist.server.tools.parser import CallFormat, Region

START, END = "<tool_call>", "</tool_call>"


class Hermes(CallFormat):
    name = "hermes"
    starts = (START,)
    end = END

    def scan(self, region: str, final: bool) -> Region:
        found, end, text = object_region(region, len(START), END)
        return Region([found] if found else [], end, text)

    def opening(self, name: str | None) -> str:
        if name is None:
            return f'{START}\n{{"name": "'
        return f'{START}\n{{"name": {json.dumps(name)}, "arguments": '
