"""Calls written as JSON: an object with a name and its arguments
(``{"name": ..., "arguments": {...}}``, Hermes, Llama 3, Mistral's list),
and arguments written as a JSON value up to an end marker (Mistral's
``[ARGS]``, DeepSeek's, gpt-oss's). Both read text still arriving."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlx_dist.server.tools.parser import Found, Region
from mlx_dist.server.tools.scan import Malformed, find_first, held, skip_ws, string_at, value_end


@dataclass
class CallObject:
    """What has been read of a call object: its name, where its arguments
    start and end, where it ends (None: not yet), and whether it broke."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None
    bad: bool = False

    def found(self, text: str, limit: int) -> Found | None:
        """The call so far (None: no name yet); arguments not ended yet
        are cut at ``limit``, less trailing space (which stays a prefix)."""
        if self.name is None:
            return None
        start, end = self.args_start, self.args_end
        if start is None:
            args = "{}" if self.end is not None or self.bad else ""
        elif end is not None:
            args = text[start:end]
            if args.startswith('"'):
                # Arguments some models write as a JSON string of JSON.
                args = json.loads(args)
        elif text[start] == '"':
            args = ""
        else:
            args = text[start : max(start, limit)].rstrip()
        return Found(self.name, args)


def read_call_object(
    text: str, i: int, args_keys: tuple[str, ...] = ("arguments", "parameters")
) -> CallObject:
    """The call object starting at ``text[i]`` (after spaces)."""
    o = CallObject()
    n = len(text)
    try:
        i = skip_ws(text, i)
        if i == n:
            return o
        if text[i] != "{":
            raise Malformed("a call is a JSON object")
        i += 1
        while True:
            i = skip_ws(text, i)
            if i == n:
                return o
            if text[i] == "}":
                o.end = i + 1
                return o
            if text[i] == ",":
                i += 1
                continue
            got = string_at(text, i)
            if got is None:
                return o
            key, i = got
            i = skip_ws(text, i)
            if i == n:
                return o
            if text[i] != ":":
                raise Malformed("expected ':'")
            i = skip_ws(text, i + 1)
            if i == n:
                return o
            if key == "name" and o.name is None:
                got = string_at(text, i)
                if got is None:
                    return o
                o.name, i = got
                continue
            if key in args_keys and o.args_start is None:
                o.args_start = i
            end = value_end(text, i)
            if end is None:
                return o
            if o.args_start == i:
                o.args_end = end
            i = end
    except Malformed:
        o.bad = True
        return o


def object_region(region: str, start: int, close: str) -> tuple[Found | None, int | None, bool]:
    """One call object after ``start``, closed by the marker ``close``:
    (the call so far, where the region ends, whether it is no call).

    A ``close`` inside the object (one in a string, or the model closing
    early) ends the call there: that is what reading the text as it came
    would have seen, so the whole text is read the same way."""
    o = read_call_object(region, start)
    at = region.find(close, start)
    if at >= 0 and (o.end is None or at < o.end):
        o = read_call_object(region[:at], start)
        found = o.found(region, at)
        return found, at + len(close), found is None
    if o.name is None:
        return None, None, o.bad
    if o.end is not None:
        at = region.find(close, o.end)
        found = o.found(region, len(region))
        return found, (at + len(close) if at >= 0 else None), False
    return o.found(region, len(region) - held(region, (close,))), None, False


def raw_arguments(
    region: str, start: int, closes: tuple[str, ...]
) -> tuple[str, int | None, int | None]:
    """Arguments as a JSON value from ``start``, ended by its last bracket
    or, if one comes first, by one of ``closes``: (their text so far, where
    they end, where the marker that ended them starts, if one did).
    Leading and trailing space is left out, so what is given stays a prefix
    of what follows."""
    start = skip_ws(region, start)
    marker = find_first(region, closes, start)
    at = marker[0] if marker else None
    end = None
    if start < len(region):
        try:
            end = value_end(region, start)
        except Malformed:
            end = None
    if at is not None and (end is None or at < end):
        return region[start:at].strip(), at, at
    if end is not None:
        return region[start:end], end, None
    limit = max(start, len(region) - held(region, closes))
    return region[start:limit].rstrip(), None, None


def call_sequence(region: str, i: int, seps: str, close: str | None = None) -> Region:
    """Call objects from ``i``, apart by space or ``seps``, up to ``close``
    (or to anything that is not a call: the text after them)."""
    calls: list[Found] = []
    n = len(region)
    while True:
        while i < n and (region[i].isspace() or region[i] in seps):
            i += 1
        if i == n:
            return Region(calls)
        if close is not None and region[i] == close:
            return Region(calls, end=i + 1)
        if region[i] != "{":
            return Region(calls, end=i) if calls else Region(text=True)
        o = read_call_object(region, i)
        found = o.found(region, n)
        if found is None:
            if o.bad or o.end is not None:
                # JSON, but no call: text from here.
                return Region(calls, end=i) if calls else Region(text=True)
            return Region(calls)
        calls.append(found)
        if o.end is None:
            return Region(calls)
        i = o.end
