"""A small JSON Schema check for a call's arguments: ``type`` (one or a
list), ``enum``, ``const``, ``required``, ``properties``,
``additionalProperties: false``, ``items``, ``minimum``/``maximum``,
``minLength``/``maxLength``. What it does not know it lets pass: it
finds arguments a model got wrong, it does not enforce every schema."""

from __future__ import annotations

from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def problems(value: Any, schema: Any, where: str = "arguments") -> list[str]:
    """What in ``value`` does not fit ``schema``, each naming its place."""
    if not isinstance(schema, dict):
        return []
    out: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        known = [k for k in kinds if k in _TYPES]
        if known and not any(_TYPES[k](value) for k in known):
            return [f"{where} should be {' or '.join(known)}, got {_name(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where} should be one of {schema['enum']}, got {value!r}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{where} should be {schema['const']!r}, got {value!r}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                out.append(f"{where} lacks the required {key!r}")
        for key, v in value.items():
            if key in props:
                out.extend(problems(v, props[key], f"{where}.{key}"))
            elif schema.get("additionalProperties") is False:
                out.append(f"{where} has {key!r}, which the schema does not allow")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out.extend(problems(v, schema["items"], f"{where}[{i}]"))
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{where} is shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(f"{where} is longer than {schema['maxLength']} characters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where} is above the maximum {schema['maximum']}")
    return out


def _name(value: Any) -> str:
    for kind in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[kind](value):
            return kind
    return type(value).__name__
