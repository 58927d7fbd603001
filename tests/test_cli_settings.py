"""Every flag of `mlx-dist serve` and `mlx-dist worker` reaches what it sets
(a server setting through `resolve_settings`, an argument of
`_core.run_worker`), and README's settings table lists every flag, every
server setting and every variable the code reads, each by its real name."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path

import mlx_dist.server
import pytest
from mlx_dist import _core, cli
from mlx_dist.cluster import load_distributed
from mlx_dist.server.settings import ServerSettings, resolve_settings

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.dest != "help"]


def long_flags(p: argparse.ArgumentParser) -> set[str]:
    return {f for a in options(p) for f in a.option_strings if f.startswith("--")}


def sample(action: argparse.Action, files: dict[str, str]) -> tuple[list[str], object]:
    """Arguments that set `action` to something other than its default, and
    the value they give."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--no-{flag[2:]}"], False
    if isinstance(action, argparse._StoreTrueAction):
        return [flag], True
    if action.dest in files:
        return [flag, files[action.dest]], files[action.dest]
    text = {
        "workers": "h1:1,h2:2",
        "proportions": "0.25,0.75",
        "strategy": "custom",
        "compression": "int8",
        "reasoning_format": "none",
    }.get(action.dest)
    if text is not None:
        return [flag, text], text
    if action.type is int:
        return [flag, "7"], 7
    if action.type is float:
        return [flag, "0.5"], 0.5
    return [flag, "given"], "given"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files the flags that read one need: a cluster config, a certificate
    and its key."""
    d = tmp_path_factory.mktemp("flags")
    config = d / "cluster.json"
    config.write_text(json.dumps({"workers": ["h9:9"]}))
    cert, key = _core.make_certificate(["localhost"])
    (d / "cert.pem").write_text(cert)
    (d / "key.pem").write_text(key)
    return {
        "cluster_config": str(config),
        "tls_cert": str(d / "cert.pem"),
        "tls_key": str(d / "key.pem"),
        "tls_ca": str(d / "cert.pem"),
    }


def test_each_serve_flag_reaches_the_settings(files):
    serve = subcommands()["serve"]
    reached = set()
    for action in options(serve):
        argv, want = sample(action, files)
        args = cli.build_parser().parse_args(["serve", *argv])
        if action.dest in cli._SERVE_ONLY:
            # Arguments of serve() itself, not settings.
            assert action.dest in inspect.signature(mlx_dist.server.serve).parameters
            assert getattr(args, action.dest) == want
            continue
        field = cli._SERVE_RENAMED.get(action.dest, action.dest)
        s = resolve_settings(cli.serve_settings(args), env={})
        got = getattr(s, field)
        if field == "proportions":
            want = [0.25, 0.75]
        assert got == want, f"{argv}: {field} = {got!r}"
        assert got != getattr(ServerSettings(), field), f"{argv} sets {field} to its default"
        reached.add(field)
    # Every setting has its flag.
    assert sorted(set(FIELDS) - reached) == []
    # Flags left out are not given: the environment and the defaults decide.
    args = cli.build_parser().parse_args(["serve"])
    s = resolve_settings(cli.serve_settings(args), env={"MLX_DIST_STEP_TIMEOUT": "3"})
    assert s.step_timeout == 3.0 and s.max_queue == 64 and s.launch_ahead is None


def test_the_new_core_settings_go_where_the_core_takes_them():
    s = ServerSettings(step_timeout=3.0, h2_window_mb=0, warm_up=False, token="t")
    args = s.cluster_args()
    assert (args["step_timeout"], args["h2_window_mb"]) == (3.0, 0)
    assert "failure_timeout" not in args  # not given: the core's default
    assert s.worker_args() == {"token": "t", "warm_up": False}
    run = inspect.signature(_core.start_local_worker).parameters
    every = ServerSettings(token="t", prefix_cache_mb=1, step_spin_us=1, launch_ahead=1, warm_up=1)
    assert list(every.worker_args()) == list(run)
    load = inspect.signature(load_distributed).parameters
    assert {"step_timeout", "failure_timeout", "h2_window_mb"} <= set(load)
    with pytest.raises(ValueError, match="step_timeout"):
        ServerSettings(step_timeout=0).check()
    assert resolve_settings(env={"MLX_DIST_LAUNCH_AHEAD": "0"}).launch_ahead is False


def test_generate_takes_the_cluster_flags_of_serve():
    p = argparse.ArgumentParser()
    cli._add_cluster(p)
    assert [a.dest for a in options(p)] == list(cli._CLUSTER_OPTIONS)
    generate, serve = subcommands()["generate"], subcommands()["serve"]
    by_dest = {a.dest: a.option_strings for a in options(serve)}
    cluster = [a for a in options(generate) if a.dest in cli._CLUSTER_OPTIONS]
    assert len(cluster) == len(cli._CLUSTER_OPTIONS)
    for a in cluster:
        assert a.option_strings == by_dest[a.dest], a.dest


# Flags of `mlx-dist worker` named otherwise in run_worker, and how their
# values become its arguments.
WORKER_RENAMED = {
    "no_local_files": ("local_files", lambda v: not v),
    "max_message_mb": ("max_message_bytes", lambda v: v << 20),
    "tls_cert": ("tls_cert_pem", lambda v: Path(v).read_text()),
    "tls_key": ("tls_key_pem", lambda v: Path(v).read_text()),
    "tls_ca": ("tls_ca", lambda v: Path(v).read_text()),
}
# Flags that set no run_worker argument: the announcing of a worker.
WORKER_ONLY = {"coordinator", "advertise"}


def test_each_worker_flag_reaches_run_worker(files):
    worker = subcommands()["worker"]
    defaults = cli.worker_args(cli.build_parser().parse_args(["worker"]))
    assert list(defaults) == list(inspect.signature(_core.run_worker).parameters)
    reached = set()
    for action in options(worker):
        argv, value = sample(action, files)
        if action.dest in ("tls_cert", "tls_key"):
            # One goes with the other.
            other = "--tls-key" if action.dest == "tls_cert" else "--tls-cert"
            argv += [other, files["tls_key" if action.dest == "tls_cert" else "tls_cert"]]
        args = cli.build_parser().parse_args(["worker", *argv])
        if action.dest in WORKER_ONLY:
            assert getattr(args, action.dest) == value
            continue
        name, convert = WORKER_RENAMED.get(action.dest, (action.dest, lambda v: v))
        got = cli.worker_args(args)
        assert got[name] == convert(value), f"{argv}: {name} = {got[name]!r}"
        assert got[name] != defaults[name], f"{argv}: the default"
        reached.add(name)
    # Every argument of run_worker has its flag (the TLS CA defaults to the
    # certificate: --tls-cert reaches it too).
    assert sorted(set(defaults) - reached) == []


def test_bad_worker_flags_are_refused_before_the_worker_starts():
    for argv, word in [
        (["--step-spin-us", "-1"], "--step-spin-us"),
        (["--h2-window-mb", "-1"], "--h2-window-mb"),
        (["--failure-timeout", "0"], "--failure-timeout"),
        (["--max-sequences", "0"], "--max-sequences"),
    ]:
        with pytest.raises(ValueError, match=word):
            cli.worker_args(cli.build_parser().parse_args(["worker", *argv]))


# README's table


def readme_table() -> list[dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- settings table")
    lines = text[start:].splitlines()[1:]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "setting",
        "CLI flag",
        "load()/serve() argument",
        "env var",
        "default",
        "what it does",
    ]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_readme_lists_every_flag_of_serve_worker_and_generate():
    rows = readme_table()
    listed = set()
    for r in rows:
        listed |= set(re.findall(r"--[a-z0-9-]+", r["CLI flag"]))
    commands = subcommands()
    want = long_flags(commands["serve"]) | long_flags(commands["worker"])
    want |= {
        f
        for a in options(commands["generate"])
        if a.dest in (*cli._CLUSTER_OPTIONS, "model")
        for f in a.option_strings
    }
    assert sorted(want - listed) == [], "flags missing from README's settings table"
    assert sorted(listed - want - {"--api-key"}) == [], "README lists flags that do not exist"
    names = [r["setting"] for r in rows]
    assert len(names) == len(set(names)), "a setting is listed twice"


def test_readme_lists_every_setting_and_variable_by_its_name():
    rows = readme_table()
    env = {v for r in rows for v in re.findall(r"MLX_[A-Z0-9_]+", r["env var"])}
    # Each server setting's variable, and each the core reads.
    server = {f"MLX_DIST_{name.upper()}" for name in FIELDS}
    core = set(re.findall(r'"(MLX_DIST_[A-Z0-9_]+)"', (ROOT / "src/config.rs").read_text()))
    assert {"MLX_DIST_STEP_SPIN_US", "MLX_DIST_CACHE"} <= core, core
    assert sorted((server | core | {"MLX_DIST_MAILBOX"}) - env) == []
    # No variable the code does not know.
    python = set(re.findall(r"MLX_DIST_[A-Z0-9_]+", (ROOT / "python/mlx_dist/cli.py").read_text()))
    demo = set(re.findall(r"MLX_DIST_[A-Z0-9_]+", (ROOT / "python/mlx_dist/demo.py").read_text()))
    known = server | core | python | demo | {"MLX_DIST_MAILBOX", "MLX_PTX_CACHE_DIR"}
    assert sorted(env - known) == []
    # The arguments named are those of serve(), load() and run_worker().
    serve = set(FIELDS) | set(inspect.signature(mlx_dist.server.serve).parameters)
    load = set(inspect.signature(load_distributed).parameters) | {"max_context", "prefix_cache_mb"}
    run = set(inspect.signature(_core.run_worker).parameters)
    for r in rows:
        for fn, arg in re.findall(r"(\w+)\((\w+)=", r["load()/serve() argument"]):
            allowed = {"serve": serve, "load": load, "run_worker": run}[fn]
            assert arg in allowed, f"{fn}({arg}=) in README's settings table"
