"""The shape of the source tree: no import cycle between the modules of
``mlx_dist`` or between the Rust modules of ``src/``, no source file past
MAX_LINES, and the environment read in one place. A cycle means two
modules can only be read, tested and changed together; the failures name
every cycle, every long file and every stray reader of ``MLX_DIST_*``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "mlx_dist"
SRC = ROOT / "src"
MAX_LINES = 900
# A Rust file's unit tests: from this to the end of the file.
RUST_TESTS = re.compile(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub\s+)?mod tests\b", re.MULTILINE)


def cycles(graph: dict[str, set[str]], limit: int = 200) -> list[list[str]]:
    """The elementary cycles of `graph`, each as its path from its least
    node back to it (at most `limit` of them)."""
    found: list[list[str]] = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack and len(found) < limit:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start:
                    found.append([*path, start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return found


def _describe(found: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in found)


# Python


def _python_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package: a package's
    ``__init__.py`` is the package; the native extension (its stub) is a
    module with no imports."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.setdefault(".".join(parts), path)
    return modules


def _resolve(name: str, modules) -> str | None:
    """The module `name` (a dotted path, perhaps to a name inside a
    module) belongs to: its longest prefix that is a module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def python_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside
    a function alike (a function's import runs as surely, only later)."""
    modules = _python_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        if path.suffix == ".pyi":
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                # `from pkg import sub` imports the module pkg.sub.
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                got = _resolve(target, modules)
                if got is not None and got != module:
                    graph[module].add(got)
    return graph


def test_no_import_cycle_between_python_modules():
    graph = python_imports()
    assert "mlx_dist.utils" in graph and "mlx_dist._core" in graph, sorted(graph)
    found = cycles(graph)
    assert not found, "import cycles between mlx_dist modules:\n" + _describe(found)


# Rust


def _without_tests(text: str) -> str:
    m = RUST_TESTS.search(text)
    return text[: m.start()] if m else text


def _strip_rust(text: str, strings: bool = False) -> str:
    """`text` without its unit tests (a ``#[cfg(test)]`` line before
    ``mod tests``, to the end of the file), comments, and string and
    character literals, so that only code names modules. With `strings`,
    the tests and string literals stay: only comments go."""
    if not strings:
        text = _without_tests(text)
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif raw := re.match(r'b?r(#*)"', text[i : i + 260]):
            end = text.find('"' + raw.group(1), i + raw.end())
            start, i = i, n if end < 0 else end + 1 + len(raw.group(1))
            out.append(text[start:i] if strings else '""')
        elif c == '"':
            start = i
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append(text[start:i] if strings else '""')
        elif c == "'" and (text.startswith("\\", i + 1) or (i + 2 < n and text[i + 2] == "'")):
            # A character literal ('x', '\n', '\''), not a lifetime ('a).
            end = text.find("'", i + 3 if text[i + 1] == "\\" else i + 2)
            i = n if end < 0 else end + 1
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _rust_modules() -> dict[tuple[str, ...], Path]:
    """Module path (under ``crate``) -> file: src/lib.rs is the crate,
    src/a.rs and src/a/mod.rs are ``a``, src/a/b.rs is ``a::b``."""
    modules = {}
    for path in sorted(SRC.rglob("*.rs")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts in (("lib",), ("main",)):
            parts = ()
        elif parts[-1] == "mod":
            parts = parts[:-1]
        modules[parts] = path
    return modules


def _use_paths(tree: str) -> list[str]:
    """The paths a use tree names: ``a::{b, c::{d, e}}`` -> a::b, a::c::d,
    a::c::e."""
    tree = re.sub(r"\s+", "", tree)
    i = tree.find("{")
    if i < 0:
        return [tree]
    prefix, body = tree[:i], tree[i + 1 : tree.rfind("}")]
    items, depth, start = [], 0, 0
    for j, c in enumerate(body + ","):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            if body[start:j]:
                items.append(body[start:j])
            start = j + 1
    return [p for item in items for p in _use_paths(prefix + item)]


def rust_imports() -> dict[str, set[str]]:
    """Module -> the modules it names through ``crate::`` or ``super::``
    paths (in ``use`` or in code), at the granularity of files. A module
    naming its own ancestor or descendant is left out: a child using its
    parent's items, and a parent its child's, is how modules nest."""
    modules = _rust_modules()
    graph: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in modules}
    for module, path in modules.items():
        code = _strip_rust(path.read_text())
        paths = []
        for tree in re.findall(r"\buse\s+([^;]+);", code):
            paths += _use_paths(tree)
        paths += re.findall(r"(?<![\w:])((?:crate|super)(?:::(?:super|\w+))+)", code)
        for p in paths:
            segments = [s for s in p.split("::") if s]
            if not segments or segments[0] not in ("crate", "super"):
                continue
            if segments[0] == "crate":
                absolute = segments[1:]
            else:
                base = list(module)
                while segments and segments[0] == "super":
                    base, segments = base[:-1], segments[1:]
                absolute = base + segments
            target = next(
                (
                    tuple(absolute[:k])
                    for k in range(len(absolute), -1, -1)
                    if tuple(absolute[:k]) in modules
                ),
                None,
            )
            if target is None:
                continue
            shorter, longer = sorted((module, target), key=len)
            if longer[: len(shorter)] == shorter:
                continue
            graph[module].add(target)

    def name(m: tuple[str, ...]) -> str:
        return "::".join(("crate", *m))

    return {name(m): {name(t) for t in ts} for m, ts in graph.items()}


def test_rust_import_paths_resolve_to_modules():
    graph = rust_imports()
    assert "crate::worker" in graph and "crate::models::base" in graph, sorted(graph)
    assert any(graph.values()), "no edges found: the parser reads no paths"


def test_no_import_cycle_between_rust_modules():
    found = cycles(rust_imports())
    assert not found, "cycles between src/ modules:\n" + _describe(found)


def test_the_checks_see_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"a"}}) == [
        ["a", "b", "a"],
        ["a", "b", "c", "a"],
    ]
    assert _use_paths("crate::{a, b::{c, d}}") == ["crate::a", "crate::b::c", "crate::b::d"]
    code = (
        "use crate::a; // crate::b\n"
        "let s = \"crate::c\"; let q = '\"'; fn f<'x>() { crate::d::g() }\n"
        "#[cfg(test)]\nmod tests {\n    use crate::e;\n}\n"
    )
    stripped = _strip_rust(code)
    assert "crate::a" in stripped and "crate::d::g" in stripped, stripped
    assert not any(f"crate::{m}" in stripped for m in "bce"), stripped
    kept = _strip_rust(code, strings=True)
    assert all(f"crate::{m}" in kept for m in "acde") and "crate::b" not in kept, kept
    code = 'let url = "http://h"; // MLX_DIST_A\n/// MLX_DIST_B\nlet v = "MLX_DIST_C";\n'
    assert _env_names(code) == {"MLX_DIST_C"}


# The environment

ENV_NAME = re.compile(r"MLX_DIST_[A-Z0-9_]*")
# The Rust core reads MLX_DIST_* variables in src/config.rs alone: the rest
# takes its settings as values (`TransportConfig`, `WorkerConfig`,
# `ClusterOptions`). The C++ shim reads one of its own as it makes its
# pinned memory (a diagnostic switch, outside any config).
RUST_ENV_READERS = {"src/config.rs": None, "src/mlx/shim.cpp": {"MLX_DIST_MAILBOX"}}


def _env_names(code: str) -> set[str]:
    """The ``MLX_DIST_*`` names in the code and strings of `code` (Rust or
    C++), comments and docs left out."""
    return set(ENV_NAME.findall(_strip_rust(code, strings=True)))


def test_only_the_config_readers_name_mlx_dist_variables_in_src():
    found, seen = {}, set()
    for path in sorted(SRC.rglob("*")):
        if path.suffix not in (".rs", ".cpp", ".h", ".hpp"):
            continue
        rel = str(path.relative_to(ROOT))
        names = _env_names(path.read_text())
        seen |= names
        allowed = RUST_ENV_READERS.get(rel, set())
        if allowed is not None and names - allowed:
            found[rel] = sorted(names - allowed)
    assert not found, (
        "MLX_DIST_* variables named outside src/config.rs (read them there, and pass the "
        f"value in a config or an argument): {found}"
    )
    # The check sees the readers it allows.
    assert {"MLX_DIST_TOKEN", "MLX_DIST_STEP_TIMEOUT", "MLX_DIST_MAILBOX"} <= seen, seen


# Python modules that read MLX_DIST_* variables besides server/settings.py's
# resolve_settings (which builds each name from its field): the command
# line's own (TLS files, the dashboard, the announcing worker's token), the
# demo model's download folder and index, and the server's cluster token for
# settings made by hand (as the core's default).
PYTHON_ENV_READERS = {"cli.py", "demo.py", "server/state.py"}


def python_env_reads() -> dict[str, set[str]]:
    """Module file -> the MLX_DIST_* names it reads with ``os.environ.get``,
    ``os.getenv`` or ``os.environ[...]``, or names in a tuple of names to
    read (demo.py's)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            args = []
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "os.environ.get",
                "os.getenv",
            ):
                args = node.args[:1]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                args = [node.slice]
            elif isinstance(node, ast.Tuple):
                args = node.elts
            for a in args:
                if isinstance(a, ast.Constant) and ENV_NAME.fullmatch(str(a.value)):
                    names.add(a.value)
        if names:
            found[str(path.relative_to(PACKAGE))] = names
    return found


def test_python_reads_mlx_dist_variables_only_where_it_must():
    found = python_env_reads()
    stray = {m: sorted(n) for m, n in found.items() if m not in PYTHON_ENV_READERS}
    assert not stray, f"MLX_DIST_* variables read outside resolve_settings and the CLI: {stray}"
    assert "MLX_DIST_TLS_CERT" in found.get("cli.py", set()), found


# Sizes


def code_lines(path: Path) -> int:
    """Lines of `path`, less a Rust file's unit tests at its end."""
    text = path.read_text()
    if path.suffix == ".rs":
        text = _without_tests(text)
    return text.count("\n")


def long_files() -> list[str]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(SRC.rglob("*.rs"))
    return [
        f"{p.relative_to(ROOT)}: {code_lines(p)} lines" for p in files if code_lines(p) > MAX_LINES
    ]


def test_no_source_file_is_over_the_line_limit():
    found = long_files()
    assert not found, f"files over {MAX_LINES} lines:\n" + "\n".join(found)
