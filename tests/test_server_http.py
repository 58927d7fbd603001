"""The HTTP layer alone, in this process, over a stand-in for the model and
its engine (no MLX): values checked and named, each failure's status,
server-sent events' framing. The real model behind it: test_server.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from mlx_dist import _core
from mlx_dist.engine import CapacityExceeded, Done, EngineStopped, Failed, QueueFull, Step
from mlx_dist.server import ServerSettings, ServerState, create_app
from mlx_dist.server.errors import engine_error


class FakeTokenizer:
    """One token a character; no chat template (messages go as plain text)."""

    has_chat_template = False
    bos_token = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


class FakeEngine:
    """Takes a job and plays ``script(job)``: the events it sends, or an
    exception it raises as the queue would."""

    active = 0
    queued = 0

    def __init__(self):
        self.jobs = []
        self.script = lambda job: [Step("hi", 5), Done("stop", len(job.prompt), 1)]

    def submit(self, job) -> None:
        self.jobs.append(job)
        events = self.script(job)
        if isinstance(events, BaseException):
            raise events
        for event in events:
            job.sink(event)

    def stop(self, timeout: float = 30.0) -> None:
        pass


class FakeState(ServerState):
    """A loaded model of a 100-token vocabulary and a 64-token context."""

    vocab_size = 100
    context_limit = 64
    context_length = 64
    distributed = False

    def __init__(self, settings: ServerSettings, *, ready: bool = True):
        super().__init__(settings)
        self.model = SimpleNamespace(max_context=None)
        self.tokenizer = FakeTokenizer()
        self.engine = FakeEngine() if ready else None
        self.name = "fake"
        self.aliases = {"fake"}


@pytest.fixture
def served():
    def make(ready: bool = True, **settings) -> tuple[TestClient, FakeState]:
        state = FakeState(ServerSettings(**settings), ready=ready)
        app = create_app(state.settings, state)
        return TestClient(app, raise_server_exceptions=False), state

    return make


CHAT = {"messages": [{"role": "user", "content": "hey"}]}


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 500}, "max_completion_tokens"),
        ({"top_k": 10**30}, "top_k"),
        ({"n": 2}, "n"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {"100": 1}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ],
)
def test_a_bad_value_is_a_400_naming_it(served, change, param):
    client, state = served()
    # Encoded here: a lone surrogate is JSON's escape, not UTF-8.
    body = json.dumps({**CHAT, **change})
    err = error_of(client.post("/v1/chat/completions", content=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert state.engine.jobs == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hey"}, "messages"),
        ({**CHAT, "max_tokens": "many"}, "max_tokens"),
        ({}, "messages"),
    ],
)
def test_a_wrong_type_or_missing_field_is_a_422_naming_it(served, body, param):
    client, _ = served()
    assert error_of(client.post("/v1/chat/completions", json=body), 422)["param"] == param


def test_malformed_json_unknown_model_and_long_prompts(served):
    client, _ = served()
    r = client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "x"})
    assert "not valid JSON" in error_of(r, 400)["message"]
    err = error_of(client.post("/v1/completions", json={"prompt": "x", "model": "gpt"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    err = error_of(client.post("/v1/completions", json={"prompt": [5] * 64}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = error_of(client.post("/detokenize", json={"tokens": [100]}), 400)
    assert err["param"] == "tokens" and "outside the vocabulary" in err["message"]
    assert error_of(client.get("/v1/nothing"), 404)["message"].startswith("no such endpoint")


def test_while_loading_requests_get_503(served):
    client, _ = served(ready=False)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert error_of(r, 503)["message"] == "the model is still loading"
    assert r.headers["retry-after"] == "5"
    assert client.get("/health").json() == {"status": "loading"}


FAILURES = [
    (ValueError("bad stop"), 400, None),
    (TypeError("not a list"), 400, None),
    (CapacityExceeded("needs 210 tokens, but the budget is 100"), 413, "insufficient_capacity"),
    (MemoryError("it holds 256 sequences"), 503, "insufficient_capacity"),
    (ConnectionError("worker w (h:1): stage 0 failed"), 503, "service_unavailable"),
    (EngineStopped("stopped"), 503, "service_unavailable"),
    (QueueFull("8 running and 64 waiting"), 429, "rate_limit_exceeded"),
    (RuntimeError("boom"), 500, "internal_error"),
    # The core's classes, each its own status.
    (_core.KvBudgetFull("worker w: no room for now"), 429, "kv_cache_full"),
    (_core.KvBudgetExceeded("needs 3 GB, the budget is 2 MB"), 413, "insufficient_capacity"),
    (_core.CapacityError("over the message limit"), 413, "insufficient_capacity"),
    (_core.TlsError("worker h:1: TLS refused"), 502, "worker_tls_mismatch"),
    (_core.WorkerError("worker w (h:1): its stream ended"), 503, "worker_unavailable"),
    (_core.NotReadyError("worker w (h:1): holds no model"), 503, "worker_not_ready"),
]


def test_statuses_come_from_the_class_never_the_message():
    """The words of a message mean nothing: a dead stage that mentions TLS
    or memory is a dead stage, a TLS failure that says neither is one."""
    dead = _core.WorkerError("worker w: TLS certificate out of memory, budget full")
    dead.stage, dead.address = "w", "h:1"
    assert (engine_error(dead).status, engine_error(dead).code) == (503, "worker_unavailable")
    assert engine_error(_core.TlsError("gone")).status == 502
    assert engine_error(_core.KvBudgetFull("worker down")).status == 429
    assert engine_error(_core.KvBudgetExceeded("TLS")).status == 413
    # Their bases still answer as before, for exceptions of other origins.
    assert engine_error(MemoryError("no room")).status == 503
    assert engine_error(ConnectionError("TLS")).code == "service_unavailable"


@pytest.mark.parametrize(("error", "status", "code"), FAILURES)
def test_each_failure_maps_to_its_status(error, status, code):
    e = engine_error(error)
    assert (e.status, e.code) == (status, code)
    assert str(error) in e.message
    retry = {429: "1", 503: "5"}.get(status)
    assert (e.headers or {}).get("Retry-After") == retry


@pytest.mark.parametrize(("error", "status", "code"), FAILURES)
def test_a_failed_generation_answers_with_its_status(served, error, status, code):
    client, state = served()
    state.engine.script = lambda job: [Step("a", 1), Failed(error)]
    err = error_of(client.post("/v1/completions", json={"prompt": "x"}), status)
    assert err["code"] == code and str(error) in err["message"]


def test_a_refused_submit_answers_with_its_status(served):
    client, state = served()
    state.engine.script = lambda job: QueueFull("8 running and 64 waiting")
    r = client.post("/v1/chat/completions", json=CHAT)
    assert error_of(r, 429)["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    state.engine.script = lambda job: EngineStopped("the engine has stopped")
    assert error_of(client.post("/v1/chat/completions", json=CHAT), 503)["code"] == (
        "service_unavailable"
    )
    # Not one the engine raises: the crash handler's 500, counted by type.
    state.engine.script = lambda job: KeyError("surprise")
    err = error_of(client.post("/v1/chat/completions", json=CHAT), 500)
    assert err["message"] == "internal error: KeyError: 'surprise'"
    assert b'mlx_dist_errors_total{type="KeyError"} 1.0' in state.metrics.render()


def test_the_local_workers_address_stays_out_of_messages(served):
    client, state = served()
    state.local_worker = "127.0.0.1:38795"
    state.engine.script = lambda job: [Failed(ConnectionError("worker (127.0.0.1:38795): gone"))]
    assert error_of(client.post("/v1/completions", json={"prompt": "x"}), 503)["message"] == (
        "worker: gone"
    )


def events(r) -> list:
    """The stream's events, checking its framing: every event one
    ``data:`` line and a blank line, nothing else."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("\n\n")
    out = []
    for block in r.text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_chat_stream_is_framed_as_server_sent_events(served):
    client, state = served()
    state.engine.script = lambda job: [
        Step("he", 7),
        Step("", 8),
        Step("llo", 9),
        Done("stop", 4, 3),
    ]
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(client.post("/v1/chat/completions", json=body))
    assert chunks[-1] == "[DONE]"
    first, *texts, finish, usage, _ = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # A step with no text (a stop string pending) sends nothing.
    assert [c["choices"][0]["delta"]["content"] for c in texts] == ["he", "llo"]
    assert {c["id"] for c in chunks[:-1]} == {first["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7


def test_a_failure_mid_stream_is_an_error_event_then_done(served):
    client, state = served()
    state.engine.script = lambda job: [Step("he", 7), Failed(ConnectionError("worker w: gone"))]
    chunks = events(client.post("/v1/completions", json={"prompt": "x", "stream": True}))
    assert [c["choices"][0]["text"] for c in chunks[:1]] == ["he"]
    assert chunks[1] == {
        "error": {
            "message": "worker w: gone",
            "type": "service_unavailable",
            "param": None,
            "code": "service_unavailable",
        }
    }
    assert chunks[2:] == ["[DONE]"]


def test_a_whole_answer_and_its_usage(served):
    client, state = served()
    state.engine.script = lambda job: [Step("he", 7), Step("llo", 9), Done("length", 3, 2, 1)]
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    [job] = state.engine.jobs
    assert job.options["max_tokens"] == 2 and job.options["temp"] == 0.0


def test_the_guard_checks_the_key_and_the_body_size(served):
    client, _ = served(api_key="sesame", max_body_bytes=1024)
    err = error_of(client.get("/v1/models"), 401)
    assert err["code"] == "invalid_api_key"
    key = {"Authorization": "Bearer sesame"}
    assert client.get("/v1/models", headers=key).json()["data"][0]["id"] == "fake"
    assert client.get("/health").status_code == 200
    big = {"prompt": "x" * 2000}
    assert error_of(client.post("/v1/completions", json=big, headers=key), 413)
