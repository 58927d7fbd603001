"""The HTTP server's limits, against real server processes: prompts over
the context, the queue bound under a burst, clients that leave, idle and
slow connections, kept-alive connections, bodies over the size limit, and
the API key in any script."""

from __future__ import annotations

import http.client
import json
import re
import select
import shutil
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import httpx
import pytest
from cluster_utils import start_workers, together
from server_utils import ServerProcess

QUESTION = [{"role": "user", "content": "tell me about the quick brown fox"}]
# About 1 MB, under the body limit, and 600,000 tokens.
BIG = "word " * 200_000
KEY = "clé-ü"


@pytest.fixture(scope="module")
def no_context_model(tiny_model, tmp_path_factory):
    """A tiny model whose config gives no context length (as many GGUFs):
    the server's default limit is what holds prompts."""
    src = tiny_model("qwen3", num_layers=4)
    path = shutil.copytree(src, tmp_path_factory.mktemp("no-context") / "model")
    config = json.loads((path / "config.json").read_text())
    del config["max_position_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def local(no_context_model, tmp_path_factory):
    server = ServerProcess(
        tmp_path_factory.mktemp("limits-local"),
        "--model",
        str(no_context_model),
        "--header-timeout",
        "2",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(no_context_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("limits-cluster")
    workers = start_workers(2, logs)
    server = ServerProcess(
        logs,
        "--model",
        str(no_context_model),
        "--workers",
        ",".join(w.address for w in workers),
        "--strategy",
        "uniform",
    )
    yield server
    server.stop()
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def keyed(no_context_model, tmp_path_factory):
    """One sequence at a time, two waiting, and a non-ASCII API key."""
    server = ServerProcess(
        tmp_path_factory.mktemp("limits-keyed"),
        "--model",
        str(no_context_model),
        "--max-concurrency",
        "1",
        "--max-queue",
        "2",
        "--api-key",
        KEY,
    )
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {KEY}".encode()}


def _status(server, headers=None) -> dict:
    return httpx.get(f"{server.url}/cluster/status", headers=headers, timeout=30).json()


def _wait(cond, timeout: float, step: float = 0.05) -> float:
    """Seconds until `cond()` held; fails past `timeout`."""
    started = time.monotonic()
    while not cond():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started


@pytest.mark.parametrize("which", ["local", "cluster"])
def test_an_oversized_prompt_is_refused_at_once_and_others_are_served(request, which):
    server = request.getfixturevalue(which)
    url = f"{server.url}/v1/chat/completions"
    before = _status(server)["engine"]["tokens_processed"]

    def post(body: dict):
        started = time.monotonic()
        r = httpx.post(url, json=body, timeout=120)
        return r, time.monotonic() - started

    big_body = {"messages": [{"role": "user", "content": BIG}], "max_tokens": 4}
    small_body = {"messages": QUESTION, "max_tokens": 4}
    (big, big_s), (small, small_s) = together(
        [lambda: post(big_body), lambda: post(small_body)], timeout=180
    )
    assert big.status_code == 400, big.text[:500]
    err = big.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    # The numbers: the default limit and the prompt's length.
    assert "32768 tokens" in err["message"], err
    assert re.search(r"the prompt has \d{6} tokens", err["message"]), err
    assert big_s < 30
    assert small.status_code == 200, small.text
    assert small.json()["usage"]["completion_tokens"] == 4
    assert small_s < 15
    status = _status(server)
    assert status["max_context"] == 32768 and status["context_length"] is None
    # Nothing of the big prompt was computed.
    assert status["engine"]["tokens_processed"] - before < 1000


def _send_raw(server, body: dict) -> socket.socket:
    u = urlsplit(server.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_its_sequence_within_seconds(local, stream):
    def active() -> int:
        return _status(local)["engine"]["active_sequences"]

    _wait(lambda: active() == 0, 30)
    # Far more tokens than can run in the seconds this test takes.
    sock = _send_raw(local, {"messages": QUESTION, "max_tokens": 30000, "stream": stream})
    try:
        _wait(lambda: active() == 1, 30)
        if stream:
            assert b"data: " in sock.recv(65536)
        time.sleep(1.0)
    finally:
        sock.close()
    took = _wait(lambda: active() == 0, 10)
    assert took < 2.5, f"the sequence ran on for {took:.1f} s after its client left"


def test_a_burst_is_held_to_max_concurrency_plus_max_queue(keyed):
    """max_concurrency 1 + max_queue 2: of 10 requests at once, exactly 3 in."""
    url = f"{keyed.url}/v1/chat/completions"
    body = {"messages": QUESTION, "max_tokens": 20000, "stream": True}
    answered = threading.Barrier(10, timeout=120)

    def one() -> int:
        with httpx.stream("POST", url, json=body, headers=AUTH, timeout=120) as r:
            code = r.status_code
            answered.wait()  # every answer is in before any stream ends
            return code

    codes = together([one] * 10, timeout=180)
    assert sorted(codes) == [200] * 3 + [429] * 7, codes
    _wait(lambda: _status(keyed, AUTH)["engine"]["active_sequences"] == 0, 30)
    assert _status(keyed, AUTH)["engine"]["queued"] == 0


def test_a_non_ascii_api_key_matches_as_utf8(keyed):
    r = httpx.get(f"{keyed.url}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    for wrong in (b"Bearer cle-u", f"Bearer {KEY}".encode("latin-1"), b"Bearer"):
        r = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": wrong}, timeout=30)
        assert r.status_code == 401, (wrong, r.text)


def test_health_gives_details_only_with_the_api_key(keyed):
    bare = httpx.get(f"{keyed.url}/health", timeout=30)
    assert bare.status_code == 200
    assert bare.json() == {"status": "ok"}
    full = httpx.get(f"{keyed.url}/health", headers=AUTH, timeout=30)
    assert full.status_code == 200
    body = full.json()
    assert body["status"] == "ok" and body["model"] == "model"
    assert body["workers"][0]["info"]["device"]["memory_total"] > 0


def test_idle_and_slow_connections_are_closed_by_the_header_timeout(local):
    """--header-timeout 2: connections that send nothing, or a header a
    byte at a time, are closed; the server goes on answering."""
    u = urlsplit(local.url)
    socks = [socket.create_connection((u.hostname, u.port), timeout=5) for _ in range(20)]
    slow = set(range(5))
    for i in slow:
        socks[i].sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    closed: dict[int, float] = {}
    last_drip = started
    try:
        while len(closed) < len(socks) and time.monotonic() - started < 10:
            open_ = [s for i, s in enumerate(socks) if i not in closed]
            readable, _, _ = select.select(open_, [], [], 0.1)
            for s in readable:
                i = socks.index(s)
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed[i] = time.monotonic() - started
            if time.monotonic() - last_drip > 0.4:
                last_drip = time.monotonic()
                for i in slow - set(closed):
                    try:
                        socks[i].sendall(b"a")
                    except OSError:
                        closed[i] = time.monotonic() - started
    finally:
        for s in socks:
            s.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} connections still open"
    assert max(closed.values()) < 4.5, closed
    assert httpx.get(f"{local.url}/v1/models", timeout=30).status_code == 200


def test_kept_alive_connections_answer_as_fast_as_new_ones(local):
    """TCP_NODELAY on accepted connections: without it Nagle met delayed
    ACKs and each request on a kept-alive connection took ~40 ms more."""
    u = urlsplit(local.url)

    def get(conn: http.client.HTTPConnection) -> float:
        started = time.perf_counter()
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        return time.perf_counter() - started

    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    get(conn)
    kept = statistics.median(get(conn) for _ in range(20))
    conn.close()
    fresh = []
    for _ in range(20):
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        fresh.append(get(c))
        c.close()
    assert kept < statistics.median(fresh) + 0.015, (kept, statistics.median(fresh))


def test_a_body_over_the_limit_gets_its_413_while_still_sending(local):
    """urllib sends the whole body before reading: a server that answered
    and closed at once left it a reset connection instead of the 413."""
    req = urllib.request.Request(
        f"{local.url}/v1/completions",
        data=b"x" * (20 << 20),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413
    assert "over 8388608 bytes" in json.loads(e.value.read())["error"]["message"]

    # Without a Content-Length (chunked), found while reading.
    def chunks():
        for _ in range(20):
            yield b"x" * (1 << 20)

    r = httpx.post(f"{local.url}/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413, r.text
    assert httpx.get(f"{local.url}/health", timeout=30).status_code == 200
