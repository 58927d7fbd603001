"""DeepSeek's calls: ``<｜tool▁calls▁begin｜>``, then for each call
``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` and its arguments in a
```json fence (V3, R1), or ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}``
(V3.1), then ``<｜tool▁call▁end｜>``; ``<｜tool▁calls▁end｜>`` at the end."""

from __future__ import annotations

from mlx_dist.server.tools.json_call import raw_arguments
from mlx_dist.server.tools.parser import CallFormat, Found, Region
from mlx_dist.server.tools.scan import find_first, skip_ws

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCE = "```"


class DeepSeek(CallFormat):
    """``typed``: calls are written ``function<｜tool▁sep｜>NAME`` with a
    fence (V3's template), not ``NAME<｜tool▁sep｜>`` (V3.1's)."""

    name = "deepseek"
    # R1 at times leaves out the list's marker.
    starts = (CALLS_BEGIN, CALL_BEGIN)
    end = CALL_END

    def __init__(self, typed: bool):
        self.typed = typed

    def scan(self, region: str, final: bool) -> Region:
        i = len(CALLS_BEGIN) if region.startswith(CALLS_BEGIN) else 0
        calls: list[Found] = []
        while True:
            i = skip_ws(region, i)
            rest = region[i:]
            if rest.startswith(CALLS_END):
                return Region(calls, end=i + len(CALLS_END))
            if not rest.startswith(CALL_BEGIN):
                if CALL_BEGIN.startswith(rest) or CALLS_END.startswith(rest):
                    return Region(calls)
                return Region(calls, end=i) if calls else Region(text=True)
            j = i + len(CALL_BEGIN)
            sep = region.find(SEP, j)
            if sep < 0:
                head = region[j:]
                if len(head) > 256 or "\n" in head:
                    return Region(calls, end=i) if calls else Region(text=True)
                return Region(calls)
            name, k = region[j:sep].strip(), sep + len(SEP)
            if name == "function":
                nl = region.find("\n", k)
                if nl < 0:
                    return Region(calls)
                name, k = region[k:nl].strip(), nl + 1
                k = skip_ws(region, k)
                if region.startswith(FENCE, k):
                    nl = region.find("\n", k)
                    if nl < 0:
                        return Region([*calls, Found(name, "")])
                    k = nl + 1
                elif FENCE.startswith(region[k:]):
                    return Region([*calls, Found(name, "")])
            if not name:
                return Region(calls, end=i) if calls else Region(text=True)
            args, end, marker = raw_arguments(region, k, (CALL_END, CALLS_END))
            calls.append(Found(name, args))
            if marker is None:
                if end is None:
                    return Region(calls)
                found = find_first(region, (CALL_END, CALLS_END), end)
                if found is None:
                    return Region(calls)
                marker = found[0]
            if region.startswith(CALLS_END, marker):
                return Region(calls, end=marker + len(CALLS_END))
            i = marker + len(CALL_END)

    def opening(self, name: str | None) -> str:
        head = f"{CALLS_BEGIN}{CALL_BEGIN}"
        if self.typed:
            head += f"function{SEP}"
            return head if name is None else f"{head}{name}\n{FENCE}json\n"
        return head if name is None else f"{head}{name}{SEP}"
