"""A request's tools and ``tool_choice``, checked (each bad value a 400
naming its place), and what a choice asks of the answer.

``none``: the tools are not given to the template and no call is read (a
model that is not shown them has nothing to call). ``auto``: calls are
read. ``required`` and a named function steer the model: the answer is
begun with a call's opening in the model's format (for a named one, up to
its first required argument's value), so the model writes the rest."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_dist.server.errors import bad


@dataclass
class ToolUse:
    """The function tools, in the chat API's shape, and the choice:
    ``none``, ``auto``, ``required`` or ``function`` (of ``name``)."""

    tools: list[dict]
    choice: str
    name: str | None = None

    def schema(self, name: str | None) -> dict | None:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters")
        return None

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> str | None:
        """The function the answer must call, if one is named (or is the
        only one ``required`` leaves)."""
        if self.choice == "function":
            return self.name
        if self.choice == "required" and len(self.tools) == 1:
            return self.names[0]
        return None


def tool_use(tools, tool_choice, param: str = "tools") -> ToolUse | None:
    """The checked tools and choice (None: no tools and no choice)."""
    if tools is None and tool_choice is None:
        return None
    if tools is not None and not isinstance(tools, list):
        raise bad(f"{param} must be a list", param)
    checked = [_tool(t, f"{param}[{i}]") for i, t in enumerate(tools or [])]
    names = [t["function"]["name"] for t in checked]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise bad(f"{param} names the function {dup!r} twice", param)
    choice, name = _choice(tool_choice, bool(checked))
    if choice in ("required", "function") and not checked:
        raise bad(f"tool_choice {choice!r} needs tools", "tool_choice")
    if name is not None and name not in names:
        raise bad(
            f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice"
        )
    return ToolUse(checked, choice, name)


def _tool(t, where: str) -> dict:
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise bad(f"{where}: only function tools are supported", where)
    f = t.get("function")
    if not isinstance(f, dict):
        raise bad(f"{where}.function must be an object with a name", f"{where}.function")
    name = f.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    params = f.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad(f"{where}.function.parameters must be a JSON schema object", f"{where}.function")
    return {"type": "function", "function": f}


def _choice(choice, have_tools: bool) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if have_tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad(
                f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}",
                "tool_choice",
            )
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        f = choice.get("function")
        name = f.get("name") if isinstance(f, dict) else choice.get("name")
        if isinstance(name, str):
            return "function", name
    raise bad(
        'tool_choice must be "none", "auto", "required" or '
        '{"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )
