"""The OpenAI-compatible server, driven by the official `openai` client
against real server processes, on one device and over two workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import mlx_dist
import openai
import pytest
from cluster_utils import start_workers
from mlx_dist import _core
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess, free_port, wait_ready

QUESTION = [{"role": "user", "content": "tell me about the quick brown fox"}]
PROMPTS = [
    "the quick brown fox",
    "hello world, how are you",
    "a completely different prompt about cats",
    "one two three four five",
    "lorem ipsum dolor sit amet",
    "what is the capital of France?",
    "zebra yak xylophone",
    "mlx-dist runs models on many machines",
]


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("qwen3", num_layers=4)


@pytest.fixture(scope="module")
def library(model_path):
    """The model in this process: the reference every answer must equal."""
    return mlx_dist.load(str(model_path))


def reference(library, ids: list[int], n: int, **kwargs) -> tuple[str, str, list]:
    """(text, finish_reason, responses) of a greedy run through the library."""
    model, tok = library
    rs = list(mlx_dist.stream_generate(model, tok, ids, max_tokens=n, **kwargs))
    return "".join(r.text for r in rs), rs[-1].finish_reason, rs


def chat_ids(library, messages) -> list[int]:
    return library[1].apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def local_server(model_path, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("local"), "--model", str(model_path))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster_server(model_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    workers = start_workers(2, logs)
    server = ServerProcess(
        logs,
        "--model",
        str(model_path),
        "--workers",
        ",".join(w.address for w in workers),
        "--strategy",
        "uniform",
    )
    server.workers = workers
    yield server
    server.stop()
    for w in workers:
        w.stop()


@pytest.fixture(params=["local", "cluster"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs
    )


def model_id(server) -> str:
    return client(server).models.list().data[0].id


def test_models_lists_the_served_model(server, model_path):
    models = client(server).models.list().data
    assert [m.id for m in models] == [model_path.name]
    assert client(server).models.retrieve(model_path.name).id == model_path.name


def test_chat_equals_the_library_and_counts_usage(server, library):
    text, finish, rs = reference(library, chat_ids(library, QUESTION), 24)
    r = client(server).chat.completions.create(
        model=model_id(server), messages=QUESTION, max_tokens=24
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish == "length"
    assert r.usage.prompt_tokens == len(chat_ids(library, QUESTION))
    assert r.usage.completion_tokens == 24 == len(rs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_streamed_chat_assembles_to_the_same_text(server):
    c = client(server)
    whole = c.chat.completions.create(
        model=model_id(server), messages=QUESTION, max_completion_tokens=20
    )
    pieces, finish, usage = [], None, None
    for chunk in c.chat.completions.create(
        model=model_id(server),
        messages=QUESTION,
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_with_text_and_token_prompts(server, library):
    c = client(server)
    ids = library[1].encode(PROMPTS[0])
    text, _, _ = reference(library, ids, 16)
    r = c.completions.create(model=model_id(server), prompt=PROMPTS[0], max_tokens=16)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids)
    r = c.completions.create(model=model_id(server), prompt=ids, max_tokens=16)
    assert r.choices[0].text == text
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=model_id(server), prompt=PROMPTS[0], max_tokens=16, stream=True
        )
        if ch.choices
    )
    assert streamed == text


def _stop_string(text: str) -> str:
    for i in range(4, len(text) - 2):
        if text[i : i + 2].isascii() and text[i : i + 2].strip() == text[i : i + 2]:
            return text[i : i + 2]
    raise AssertionError(f"no stop string candidate in {text!r}")


def test_stop_strings_end_generation_and_are_not_emitted(server, library):
    text, _, _ = reference(library, chat_ids(library, QUESTION), 32)
    stop = _stop_string(text)
    want = text[: text.index(stop)]
    c = client(server)
    r = c.chat.completions.create(
        model=model_id(server), messages=QUESTION, max_tokens=32, stop=[stop, "never-seen"]
    )
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        c.chat.completions.create(
            model=model_id(server), messages=QUESTION, max_tokens=32, stop=stop, stream=True
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_present_and_consistent(server, library):
    ids = chat_ids(library, QUESTION)
    _, _, rs = reference(library, ids, 8, logprobs=True)
    r = client(server).chat.completions.create(
        model=model_id(server), messages=QUESTION, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    tok = library[1]
    for entry, want in zip(content, rs, strict=True):
        assert entry.token == tok.decode([want.token])
        assert entry.logprob <= 0
        assert abs(entry.logprob - float(want.logprobs[want.token])) < 1e-4
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes) == entry.token.encode()
    legacy = client(server).completions.create(
        model=model_id(server), prompt=PROMPTS[1], max_tokens=5, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_eight_concurrent_streams_equal_their_one_at_a_time_outputs(server):
    c = client(server, timeout=300)
    name = model_id(server)

    def one(prompt: str) -> str:
        stream = c.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            stream=True,
        )
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    alone = [one(p) for p in PROMPTS]
    before = _batches(server)
    together: list[str | None] = [None] * len(PROMPTS)

    def run(i: int) -> None:
        together[i] = one(PROMPTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ
    # On one device too, their decode steps ran as batches.
    assert _batches(server) > before


def _batches(server) -> int:
    status = httpx.get(f"{server.url}/cluster/status").json()
    return sum(d["info"]["engine"].get("batches", 0) for d in status["devices"])


MALFORMED = [
    # (body, expected status, expected param or None)
    (b"{not json", 400, None),
    (b"[1, 2, 3]", 422, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 422, "messages"),
    ({"messages": [{"content": "no role"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": QUESTION, "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 10**12}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": "lots"}, 422, "max_tokens"),
    ({"messages": QUESTION, "temperature": -1}, 400, "temperature"),
    ({"messages": QUESTION, "temperature": "hot"}, 422, "temperature"),
    ({"messages": QUESTION, "top_p": 3}, 400, "top_p"),
    ({"messages": QUESTION, "n": 2}, 400, "n"),
    ({"messages": QUESTION, "stop": ""}, 400, "stop"),
    ({"messages": QUESTION, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"messages": QUESTION, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"messages": QUESTION, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"messages": QUESTION, "stream": "maybe"}, 422, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ({"model": "no-such-model", "messages": QUESTION}, 404, "model"),
]


def test_malformed_requests_get_openai_errors_and_the_server_goes_on(local_server):
    url = f"{local_server.url}/v1/chat/completions"
    for body, status, param in MALFORMED:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        assert err["message"], r.text
        if param is not None:
            assert err["param"] == param, (body, r.text)
    # Completions: a token outside the vocabulary, a too-long prompt, several prompts.
    comp = f"{local_server.url}/v1/completions"
    for body, status, code in [
        ({"prompt": [1, 2, 10**9]}, 400, None),
        ({"prompt": [5] * 3000}, 400, "context_length_exceeded"),
        ({"prompt": ["a", "b"]}, 400, None),
        ({"prompt": "x", "suffix": "y"}, 400, None),
        ({}, 422, None),
    ]:
        r = httpx.post(comp, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code, r.text
    r = httpx.post(comp, content=b"x" * (9 << 20), timeout=30)
    assert r.status_code == 413
    assert httpx.get(f"{local_server.url}/v1/nothing-here").status_code == 404
    assert httpx.post(f"{local_server.url}/detokenize", json={"tokens": [-1]}).status_code == 400
    # Still answering normally.
    r = client(local_server).chat.completions.create(
        model=model_id(local_server), messages=QUESTION, max_tokens=4
    )
    assert r.usage.completion_tokens == 4
    assert httpx.get(f"{local_server.url}/health").status_code == 200


def test_tokenize_and_detokenize(local_server, library):
    tok = library[1]
    r = httpx.post(f"{local_server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert r["tokens"] == tok.encode(PROMPTS[0])
    assert r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 2048
    r2 = httpx.post(f"{local_server.url}/tokenize", json={"messages": QUESTION}).json()
    assert r2["tokens"] == chat_ids(library, QUESTION)
    back = httpx.post(f"{local_server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.decode(r["tokens"])


def _metrics(server, headers=None) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name
            out[key] = s.value
    return out


def test_unbatched_server_steps_sequences_in_this_process(model_path, library, tmp_path):
    """--no-batch: no worker; each sequence with its own cache, stepped in
    turn. Same answers."""
    server = ServerProcess(tmp_path, "--model", str(model_path), "--no-batch")
    try:
        ids = chat_ids(library, QUESTION)
        want, _, _ = reference(library, ids, 12)
        got = client(server).chat.completions.create(
            model=model_id(server), messages=QUESTION, max_tokens=12
        )
        assert got.choices[0].message.content == want
        status = httpx.get(f"{server.url}/cluster/status").json()
        assert not status["distributed"] and "batches" not in status["devices"][0]["info"]["engine"]
    finally:
        server.stop()


def test_boolean_settings_read_from_the_environment():
    from mlx_dist.server import ServerSettings

    assert ServerSettings.from_env({}).batch is True
    assert ServerSettings.from_env({"MLX_DIST_BATCH": "0"}).batch is False
    assert ServerSettings.from_env({"MLX_DIST_BATCH": "True"}).batch is True
    with pytest.raises(ValueError, match="MLX_DIST_BATCH='maybe'"):
        ServerSettings.from_env({"MLX_DIST_BATCH": "maybe"})


def test_local_status_describes_this_device(local_server):
    status = httpx.get(f"{local_server.url}/cluster/status").json()
    [d] = status["devices"]
    assert d["address"] == "local" and d["reachable"] and d["layers"] == [0, 4]
    assert d["info"]["device"]["memory_total"] > 0 and 0 <= d["busy_fraction"] <= 1


def test_metrics_parse_as_prometheus_text_and_move(local_server):
    before = _metrics(local_server)
    client(local_server).chat.completions.create(
        model=model_id(local_server), messages=QUESTION, max_tokens=6
    )
    httpx.post(f"{local_server.url}/v1/chat/completions", json={"messages": []})
    after = _metrics(local_server)
    ok = 'mlx_dist_requests_total{"endpoint": "/v1/chat/completions", "status": "200"}'
    bad = 'mlx_dist_requests_total{"endpoint": "/v1/chat/completions", "status": "400"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert (
        after["mlx_dist_generation_tokens_total"] == before["mlx_dist_generation_tokens_total"] + 6
    )
    assert after["mlx_dist_time_to_first_token_seconds_count"] > before.get(
        "mlx_dist_time_to_first_token_seconds_count", 0
    )
    assert after["mlx_dist_time_per_output_token_seconds_count"] >= 5
    assert "mlx_dist_queue_depth" in after
    assert "mlx_dist_active_sequences" in after


def test_cluster_health_status_and_stage_metrics(cluster_server):
    client(cluster_server).chat.completions.create(
        model=model_id(cluster_server), messages=QUESTION, max_tokens=4
    )
    health = httpx.get(f"{cluster_server.url}/health")
    assert health.status_code == 200
    workers = health.json()["workers"]
    assert [w["address"] for w in workers] == [w.address for w in cluster_server.workers]
    assert all(w["reachable"] for w in workers)
    status = httpx.get(f"{cluster_server.url}/cluster/status").json()
    assert status["distributed"] is True
    devices = status["devices"]
    assert [d["layers"] for d in devices] == [[0, 2], [2, 4]]
    for d in devices:
        assert d["info"]["device"]["memory_total"] > 0
        assert d["info"]["memory"]["active"] > 0
        assert d["last_step_ms"] is not None
    assert len(status["plan"]["stages"]) == 2
    m = _metrics(cluster_server)
    assert m['mlx_dist_stage_step_seconds_count{"stage": "1"}'] >= 3
    # Scheduling figures: batch sizes, busy fractions (from the second scrape on).
    client(cluster_server).chat.completions.create(
        model=model_id(cluster_server), messages=QUESTION, max_tokens=4
    )
    m = _metrics(cluster_server)
    assert 0 <= m['mlx_dist_stage_busy_fraction{"stage": "0"}'] <= 1
    assert m['mlx_dist_stage_tokens_per_second{"stage": "1"}'] > 0
    assert "mlx_dist_in_flight_steps" in m
    assert m['mlx_dist_stage_up{"stage": "1"}'] == 1
    assert (
        0
        < m['mlx_dist_stage_memory_bytes{"stage": "0"}']
        < m['mlx_dist_stage_memory_total_bytes{"stage": "0"}']
    )
    assert all(0 < d["busy_fraction"] <= 1 for d in status["devices"])
    assert status["engine"]["in_flight_steps"] == 0
    # The plan was printed when the server started.
    assert any("w0" in line for line in cluster_server.stdout)


def _wait(cond, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_client_going_away_frees_caches_on_every_stage(cluster_server):
    c = client(cluster_server)
    stream = c.chat.completions.create(
        model=model_id(cluster_server), messages=QUESTION, max_tokens=1500, stream=True
    )
    for seen, _ in enumerate(stream):
        if seen == 4:
            break
    infos = [_core.worker_info(w.address)["engine"] for w in cluster_server.workers]
    assert all(i["sequences"] >= 1 for i in infos)
    stream.close()
    _wait(
        lambda: all(
            _core.worker_info(w.address)["engine"]["sequences"] == 0 for w in cluster_server.workers
        )
    )
    _wait(
        lambda: (
            httpx.get(f"{cluster_server.url}/cluster/status").json()["engine"]["active_sequences"]
            == 0
        )
    )


def test_api_key_is_required_except_for_health(model_path, tmp_path):
    server = ServerProcess(tmp_path, "--model", str(model_path), "--api-key", "sesame")
    try:
        for key in ("none", "wrong"):
            with pytest.raises(openai.AuthenticationError):
                client(server, api_key=key).models.list()
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": QUESTION})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/cluster/status").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        good = client(server, api_key="sesame")
        r = good.chat.completions.create(
            model=good.models.list().data[0].id, messages=QUESTION, max_tokens=3
        )
        assert r.usage.completion_tokens == 3
        auth = {"Authorization": "Bearer sesame"}
        assert httpx.get(f"{server.url}/metrics", headers=auth).status_code == 200
    finally:
        server.stop()


def test_overload_gets_429_with_retry_after(model_path, tmp_path):
    server = ServerProcess(
        tmp_path, "--model", str(model_path), "--max-concurrency", "1", "--max-queue", "1"
    )
    try:
        c = client(server, timeout=120)
        name = model_id(server)
        running = c.chat.completions.create(
            model=name, messages=QUESTION, max_tokens=1900, stream=True
        )
        next(iter(running))
        queued: dict = {}

        def wait_in_queue() -> None:
            queued["r"] = c.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)

        t = threading.Thread(target=wait_in_queue)
        t.start()
        status = f"{server.url}/cluster/status"
        _wait(lambda: httpx.get(status).json()["engine"]["queued"] == 1)
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": QUESTION, "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 429
        assert r.headers["retry-after"]
        assert r.json()["error"]["type"] == "rate_limit_error"
        running.close()
        t.join(60)
        assert queued["r"].usage.completion_tokens == 2
    finally:
        server.stop()


def test_dead_workers_give_503_not_a_hang(model_path, tmp_path):
    """Every worker gone: no plan can hold the model (test_recovery.py covers re-plans)."""
    workers = start_workers(2, tmp_path, prefix="d")
    server = ServerProcess(
        tmp_path,
        "--model",
        str(model_path),
        "--workers",
        ",".join(w.address for w in workers),
        "--strategy",
        "uniform",
        "--recovery-wait",
        "2",
    )
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        for w in workers:
            w.kill()
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503
        dead = [w for w in health.json()["workers"] if not w["reachable"]]
        assert {w["address"] for w in dead} == {w.address for w in workers}
        started = time.monotonic()
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": QUESTION, "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 503
        assert "could not recover" in r.json()["error"]["message"]
        assert time.monotonic() - started < 30
        # The stream form ends with an error event, not a hang.
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={"messages": QUESTION, "max_tokens": 8, "stream": True},
            timeout=60,
        ) as s:
            body = s.read().decode()
        assert '"error"' in body and body.rstrip().endswith("data: [DONE]")
        assert httpx.get(f"{server.url}/v1/models").status_code == 200
    finally:
        server.stop()
        for w in workers:
            w.stop()


def test_uvicorn_app_is_configured_from_the_environment(model_path, tmp_path, library):
    port = free_port()
    env = dict(os.environ, MLX_DIST_MODEL=str(model_path), MLX_DIST_MODEL_NAME="tiny-qwen")
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "mlx_dist.server:app", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-qwen"]
        text, _, _ = reference(library, chat_ids(library, QUESTION), 8)
        r = c.chat.completions.create(model="tiny-qwen", messages=QUESTION, max_tokens=8)
        assert r.choices[0].message.content == text
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_in_the_background_from_python(model_path, library):
    text, _, _ = reference(library, library[1].encode(PROMPTS[2]), 6)
    handle = mlx_dist.serve(str(model_path), port=0, block=False, log_level="warning")
    try:
        c = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="none", max_retries=0)
        r = c.completions.create(model=model_path.name, prompt=PROMPTS[2], max_tokens=6)
        assert r.choices[0].text == text
    finally:
        handle.stop()


def test_prefix_cache_hits_are_reported_in_usage(server, library):
    system = {"role": "system", "content": "you answer in riddles about foxes. " * 4}
    c = client(server)
    name = model_id(server)
    for question in ("who are you?", "what do you eat?"):
        messages = [system, {"role": "user", "content": question}]
        text, _, _ = reference(library, chat_ids(library, messages), 10)
        r = c.chat.completions.create(model=name, messages=messages, max_tokens=10)
        assert r.choices[0].message.content == text
        cached = r.usage.prompt_tokens_details.cached_tokens
    # The second request reused at least the system prompt's cache.
    assert cached > 20
