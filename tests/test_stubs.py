"""`_core.pyi` describes the extension as it is: every public name of
`mlx_dist._core` is declared there and nothing else, classes list exactly
their members, and functions and methods take the parameters the stub
says, by name and in order."""

import ast
import inspect
from pathlib import Path

import pytest
from mlx_dist import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def _params(node: ast.FunctionDef) -> list[str]:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return [n for n in names if n not in ("self", "cls")]


def _stub():
    """Top-level functions (name -> params), classes (name -> members,
    method params) and type aliases of the stub."""
    functions, classes, aliases = {}, {}, set()
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = _params(node)
        elif isinstance(node, ast.ClassDef):
            members, methods = set(), {}
            for b in node.body:
                if isinstance(b, ast.FunctionDef):
                    members.add(b.name)
                    methods[b.name] = _params(b)
                elif isinstance(b, ast.AnnAssign) and isinstance(b.target, ast.Name):
                    members.add(b.target.id)
            classes[node.name] = (members, methods)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name):
                aliases.add(target.id)
    return functions, classes, aliases


FUNCTIONS, CLASSES, ALIASES = _stub()


def test_the_stub_declares_every_public_name_and_no_other():
    public = {n for n in dir(_core) if not n.startswith("_")}
    declared = set(FUNCTIONS) | set(CLASSES)
    assert sorted(public - declared) == [], "in _core but not in _core.pyi"
    assert sorted(declared - public) == [], "in _core.pyi but not in _core"
    assert not ALIASES & public, "a stub alias shadows a real name"


def _runtime_params(obj) -> list[str] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # no text signature (a property, a slot wrapper)
    return [p for p in sig.parameters if p not in ("self", "cls", "$self", "$cls")]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functions_take_the_parameters_the_stub_gives(name):
    got = _runtime_params(getattr(_core, name))
    assert got is None or got == FUNCTIONS[name], f"{name}: runtime {got}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_classes_have_the_members_the_stub_gives(name):
    cls = getattr(_core, name)
    members, methods = CLASSES[name]
    runtime = {m for m in dir(cls) if not m.startswith("_")}
    if issubclass(cls, BaseException):
        # Exceptions' figures are set on each instance as it is raised; what
        # the builtin class they derive from has (OSError's errno) is not ours.
        builtin = next(c for c in cls.__mro__ if c.__module__ == "builtins")
        runtime -= set(dir(builtin))
        members = {m for m in members if not m.endswith("_bytes")}
    dunder = {m for m in members if m.startswith("__")}
    assert sorted(runtime - members) == [], f"{name}: members missing from the stub"
    assert sorted(members - dunder - runtime) == [], f"{name}: stub members that do not exist"
    for method, params in methods.items():
        attr = getattr(cls, method, None)
        if attr is None or method.startswith("__"):
            continue
        got = _runtime_params(attr)
        assert got is None or got == params, f"{name}.{method}: runtime {got}"
