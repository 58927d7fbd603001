"""Mistral's calls after ``[TOOL_CALLS]``: a JSON list of
``{"name": ..., "arguments": {...}}`` (tokenizers up to v7), or
``NAME[ARGS]{...}``, one call a marker (v11 on; ``[CALL_ID]`` between,
where a template has it)."""

from __future__ import annotations

import json
import re

from mlx_dist.server.tools.json_call import call_sequence, raw_arguments
from mlx_dist.server.tools.parser import CallFormat, Found, Region
from mlx_dist.server.tools.scan import find_first, held, skip_ws

START, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[\w.\-]*")


class Mistral(CallFormat):
    """``named``: the template writes calls as ``NAME[ARGS]`` (what
    :meth:`opening` writes too); both forms are read either way."""

    name = "mistral"
    starts = (START,)

    def __init__(self, named: bool):
        self.named = named

    def scan(self, region: str, final: bool) -> Region:
        i = skip_ws(region, len(START))
        if i == len(region):
            return Region()
        if region[i] == "[":
            return call_sequence(region, i + 1, ",", "]")
        marker = find_first(region, (ARGS, CALL_ID), i)
        if marker is None:
            name = region[i : len(region) - held(region, (ARGS, CALL_ID))]
            ok = _NAME.fullmatch(name) and len(name) <= 256
            return Region() if ok else Region(text=True)
        at, which = marker
        name = region[i:at].strip()
        if not name or not _NAME.fullmatch(name):
            return Region(text=True)
        k = at + len(which)
        if which == CALL_ID:
            a = region.find(ARGS, k)
            if a < 0:
                return Region([Found(name, "")])
            k = a + len(ARGS)
        args, end, _ = raw_arguments(region, k, (START,))
        return Region([Found(name, args)], end)

    def opening(self, name: str | None) -> str:
        if self.named:
            return START if name is None else f"{START}{name}{ARGS}"
        if name is None:
            return f'{START}[{{"name": "'
        return f'{START}[{{"name": {json.dumps(name)}, "arguments": '
