"""Bad values get a 400 naming the parameter, never a 500: requests that
crashed the server once, then a schemathesis run over every operation of
the server's own /openapi.json, which must also tell the truth about the
answers (error statuses, content types)."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    status_code_conformance,
)
from server_utils import ServerProcess

QUESTION = [{"role": "user", "content": "hi"}]
BIG = 10**30


@pytest.fixture(scope="module")
def small_server(tiny_model, tmp_path_factory):
    """Completions of 2 tokens unless asked, and a context of 64 tokens, so
    that no request (the fuzzer's neither) generates for long."""
    server = ServerProcess(
        tmp_path_factory.mktemp("validation"),
        "--model",
        str(tiny_model("qwen3", num_layers=4)),
        "--max-tokens",
        "2",
        "--max-context",
        "64",
    )
    yield server
    server.stop()


def _chat(**fields) -> dict:
    return {"messages": QUESTION, **fields}


# (path, body as JSON text, the parameter the 400 names). JSON's "\ud800"
# escapes are lone surrogates once parsed: no tokenizer can take them.
BAD = [
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", json.dumps({"prompt": "hi", "top_k": BIG}), "top_k"),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": BIG}), "logprobs"),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": BIG}), "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "hi", "n": BIG}), "n"),
    ("/v1/completions", json.dumps({"prompt": "hi", "best_of": BIG}), "best_of"),
    ("/v1/completions", json.dumps({"prompt": [1, BIG]}), "prompt"),
    ("/v1/completions", json.dumps({"prompt": [[BIG]]}), "prompt"),
    ("/v1/completions", '{"prompt": ["\\udc80"]}', "prompt[0]"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["ok", "\\ud800"]}', "stop[1]"),
    ("/v1/completions", '{"prompt": "hi", "temperature": 1e400}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "top_p": NaN}', "top_p"),
    (
        "/v1/completions",
        json.dumps({"prompt": "hi", "repetition_context_size": BIG}),
        "repetition_context_size",
    ),
    ("/v1/completions", json.dumps({"prompt": "hi", "logit_bias": {str(BIG): 1}}), "logit_bias"),
    ("/v1/completions", '{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/v1/chat/completions", json.dumps(_chat(top_logprobs=BIG, logprobs=True)), "top_logprobs"),
    ("/v1/chat/completions", json.dumps(_chat(max_completion_tokens=0)), "max_completion_tokens"),
    ("/v1/chat/completions", json.dumps(_chat(max_completion_tokens=BIG)), "max_completion_tokens"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi", "name": "\\udfff"}]}',
        "messages[0].name",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "messages[0].content[0].text",
    ),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": []}', "model"),
    (
        "/v1/chat/completions",
        json.dumps(_chat(chat_template_kwargs={"add_generation_prompt": "yes"})),
        "chat_template_kwargs.add_generation_prompt",
    ),
    (
        "/v1/chat/completions",
        json.dumps(_chat(tools=[], chat_template_kwargs={"tools": []})),
        "tools",
    ),
    (
        "/v1/chat/completions",
        json.dumps(_chat(chat_template_kwargs={"messages": []})),
        "chat_template_kwargs.messages",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": "\\ud800"}}',
        "chat_template_kwargs.x",
    ),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/detokenize", json.dumps({"tokens": [BIG]}), "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_values_get_400_naming_the_parameter(small_server, path, body, param):
    r = httpx.post(
        f"{small_server.url}{path}",
        content=body.encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    else:
        assert err["param"], err


def test_template_variables_may_set_the_generation_prompt_and_tools(small_server):
    url = f"{small_server.url}/v1/chat/completions"
    usual = httpx.post(url, json=_chat(), timeout=30).json()["usage"]["prompt_tokens"]
    r = httpx.post(url, json=_chat(chat_template_kwargs={"add_generation_prompt": False}))
    assert r.status_code == 200, r.text
    # Without "<|im_start|>assistant\n" at the end.
    assert r.json()["usage"]["prompt_tokens"] < usual
    r = httpx.post(url, json=_chat(chat_template_kwargs={"tools": [], "enable_thinking": True}))
    assert r.status_code == 200, r.text


def test_max_context_holds_prompts_and_completions(small_server):
    models = httpx.get(f"{small_server.url}/v1/models", timeout=30).json()
    assert models["data"][0]["max_model_len"] == 64
    r = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": [5] * 64}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "64 tokens (max_context)" in err["message"] and "has 64 tokens" in err["message"]
    r = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": [5] * 60, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "room for 4" in r.json()["error"]["message"]
    r = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": [5] * 60, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_the_library_takes_max_context(tiny_model):
    import mlx_dist
    from mlx_dist.server import ServerSettings

    assert ServerSettings.from_env({"MLX_DIST_MAX_CONTEXT": "100"}).max_context == 100
    model, tok = mlx_dist.load(str(tiny_model("qwen3", num_layers=4)), max_context=12)
    with pytest.raises(ValueError, match="max_context is 12"):
        mlx_dist.generate(model, tok, [5] * 12, max_tokens=2)
    out = list(mlx_dist.stream_generate(model, tok, [5] * 8, max_tokens=50))
    assert len(out) == 4 and out[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="max_context"):
        mlx_dist.load(str(tiny_model("qwen3", num_layers=4)), max_context=1)


def test_the_schema_documents_errors_streams_and_metrics(small_server):
    schema = httpx.get(f"{small_server.url}/openapi.json", timeout=30).json()
    paths = schema["paths"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    for code in ("400", "401", "404", "413", "422", "429", "503"):
        ref = chat[code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse"), (code, chat[code])
    assert "text/event-stream" in chat["200"]["content"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "503" in paths["/health"]["get"]["responses"]
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]


# Every operation the server documents; the test below checks this list
# against /openapi.json, so that a new endpoint is fuzzed too.
OPERATIONS = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("POST", "/cluster/join"),
    ("GET", "/cluster/status"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(small_server):
    return schemathesis.openapi.from_url(f"{small_server.url}/openapi.json")


def test_the_fuzzed_operations_are_all_there_are(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _reach_deeper(body) -> None:
    """A random model name is a 404 and a random role a 400 before any
    other field is read: valid ones let the values after them be tried."""
    if isinstance(body, dict):
        body.pop("model", None)
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                message["role"] = "user"


# Values at the edges of what the core takes, put in place of the valid
# ones the schema gives (hypothesis makes neither lone surrogates nor huge
# numbers often): an integer past every bound, a lone surrogate, a long text.
EDGE_INTS = [10**30, -(10**30), 1 << 64, 1 << 63, 1 << 31, -(1 << 31) - 1, -1, 0]
EDGE_FLOATS = [1e308, -1e308, 5e-324, -0.0]
EDGE_TEXTS = ["a\ud800b", "\udfff", "", " ", "x" * 5000, "<|im_end|>", str(10**30)]


def _edge(value, draw):
    """`value`, or in its place an edge value of its kind, as `draw` picks."""
    # One value in four: more would stop most requests at their first one.
    if isinstance(value, bool) or value is None or draw(st.integers(0, 3)):
        return value
    for kind, edges in ((int, EDGE_INTS), (float, EDGE_FLOATS), (str, EDGE_TEXTS)):
        if isinstance(value, kind):
            return draw(st.sampled_from(edges))
    return value


def _edges(body, draw, top: bool = True) -> None:
    """Puts edge values in some of the numbers and strings of `body` (and
    in some keys below its top), in place."""
    if isinstance(body, list):
        for i, v in enumerate(body):
            _edges(v, draw, False)
            body[i] = _edge(v, draw)
    elif isinstance(body, dict):
        for k, v in list(body.items()):
            _edges(v, draw, False)
            key = k if top or draw(st.integers(0, 7)) else draw(st.sampled_from(EDGE_TEXTS))
            del body[k]
            body[key] = _edge(v, draw)


def _call(case, body):
    """Sends `case` with `body` in place of its own, as ASCII JSON
    ("\\ud800" escapes) as most clients send it. (Schemathesis checks a
    body changed in a case against the schema with a validator that cannot
    take lone surrogates, and would send them as bytes that are not UTF-8.)"""
    kwargs = case.as_transport_kwargs()
    if kwargs.pop("json", None) is not None:
        kwargs["data"] = json.dumps(body).encode()
    return requests.request(**kwargs, timeout=60)


def _fuzz(operation, mode: GenerationMode):
    """A hypothesis test sending `operation` cases of this mode; positive
    ones, valid by the schema, get edge values in some of their fields."""

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case, data):
        body = copy.deepcopy(case.body)
        if mode is GenerationMode.POSITIVE and isinstance(body, dict):
            _reach_deeper(body)
            _edges(body, data.draw)
        response = _call(case, body)
        try:
            case.validate_response(
                response,
                checks=[not_a_server_error, status_code_conformance, content_type_conformance],
            )
        except Exception as e:
            raise AssertionError(f"sent {json.dumps(body)[:2000]}") from e

    return run


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_value_of_any_field_is_a_server_error(api_schema, method, path):
    """Values at the edges of each field, and wrong ones, for every
    operation (bounded: 60 examples of each kind, at most 64 tokens of
    context). No 500, and every status and content type is documented.
    (Schemathesis's own pytest plugin does not run under pytest 9.2: it
    reads a private attribute pytest no longer has.)"""
    operation = api_schema[path][method]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            _fuzz(operation, mode)()
        except Unsatisfiable:
            # Nothing can be sent wrong: no parameter or body, or a path
            # parameter that takes any string.
            if mode is not GenerationMode.NEGATIVE:
                raise
