"""Reading JSON that is still arriving: where a value ends (None while it
has not ended yet), a complete string's value, and how much of a text's
end may be the start of a marker. Every function reads a prefix the same
way whatever comes after it, which is what keeps streamed parsing equal
to parsing the whole text."""

from __future__ import annotations

import json
import re

# A JSON string, a bracket, or a run of anything else; a lone quote is a
# string not yet closed (an escape cut off at the end stays one too).
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]|[^"{}\[\]]+|"')
_SCALAR = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_WS = re.compile(r"\s*")


class Malformed(Exception):
    """The text cannot be the JSON expected here, whatever follows."""


def skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def string_at(text: str, i: int) -> tuple[str, int] | None:
    """The JSON string starting at ``text[i]`` and the index past it (None:
    not closed yet)."""
    if text[i] != '"':
        raise Malformed(f"expected a string at {text[i : i + 20]!r}")
    m = _TOKEN.match(text, i)
    if m.group() == '"':
        return None
    try:
        return json.loads(m.group()), m.end()
    except json.JSONDecodeError as e:
        raise Malformed(str(e)) from None


def value_end(text: str, i: int) -> int | None:
    """The index past the JSON value starting at ``text[i]`` (None: it has
    not ended yet). Brackets and strings are followed, not checked: the
    caller parses what this delimits."""
    c = text[i]
    if c == '"':
        got = string_at(text, i)
        return None if got is None else got[1]
    if c not in "{[":
        m = _SCALAR.match(text, i)
        if m is None:
            if any(w.startswith(text[i:]) for w in ("true", "false", "null", "-")):
                return None
            raise Malformed(f"not a JSON value at {text[i : i + 20]!r}")
        # A number may go on in the next piece of text.
        return m.end() if m.end() < len(text) else None
    depth = 0
    for m in _TOKEN.finditer(text, i):
        tok = m.group()
        if tok == '"':
            return None
        if tok[0] in "{[":
            depth += 1
        elif tok[0] in "}]":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def held(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin one of
    ``markers`` (held back until the next piece tells)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def find_first(text: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """The earliest of ``markers`` in ``text`` from ``start``: (index, marker)."""
    found = [(i, m) for m in markers if (i := text.find(m, start)) >= 0]
    return min(found, key=lambda f: (f[0], -len(f[1]))) if found else None


def json_opening(schema: dict | None) -> str:
    """The start of a call's arguments that steers a model into them: up
    to the value of the first required argument (its opening quote when it
    is a string). Small models otherwise tend to copy the schema itself."""
    schema = schema or {}
    required = schema.get("required") or []
    props = schema.get("properties") or {}
    if schema.get("type", "object") != "object" or not required or required[0] not in props:
        return ""
    first = required[0]
    quote = '"' if (props[first] or {}).get("type") == "string" else ""
    return f"{{{json.dumps(first)}: {quote}"
