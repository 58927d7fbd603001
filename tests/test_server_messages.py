"""POST /v1/messages (Anthropic's Messages API) over the chat machinery,
in this process with a stand-in model: content blocks to messages, the
answer's blocks and stop reasons, the stream's events, errors in
Anthropic's shape, its x-api-key header."""

from __future__ import annotations

import json

import pytest
from mlx_dist.engine import Done, Failed, Step
from test_server_tools import (
    CALL,
    HERMES_TEMPLATE,
    pieces_of,
    says,
)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK = {"max_tokens": 32, "messages": [{"role": "user", "content": "weather in Paris?"}]}


def anthropic_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    return body["error"]


def typed_events(r) -> list[tuple[str, dict]]:
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.strip().split("\n\n"):
        head, data = block.split("\n")
        body = json.loads(data[len("data: ") :])
        assert head == f"event: {body['type']}", block
        out.append((body["type"], body))
    return out


def test_a_text_answer(served):
    client, state = served()
    says(state, "Sunny", " today.")
    system = [{"type": "text", "text": "Be brief."}]
    r = client.post("/v1/messages", json={**ASK, "system": system})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["id"].startswith("msg_") and body["model"] == "fake"
    assert body["content"] == [{"type": "text", "text": "Sunny today."}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"]["output_tokens"] == 2 and body["usage"]["input_tokens"] > 0
    assert state.rendered[-1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert state.engine.jobs[-1].options["max_tokens"] == 32


def test_a_call_is_a_tool_use_block(served):
    client, state = served()
    says(state, *pieces_of("Checking.\n" + CALL))
    body = client.post("/v1/messages", json={**ASK, "tools": [WEATHER]}).json()
    text, use = body["content"]
    assert text == {"type": "text", "text": "Checking."}
    assert use["type"] == "tool_use" and use["id"].startswith("toolu_")
    assert (use["name"], use["input"]) == ("get_weather", {"city": "Paris"})
    assert body["stop_reason"] == "tool_use"
    [tool] = state.rendered[-1]["tools"]
    assert tool["function"]["parameters"] == WEATHER["input_schema"]


@pytest.mark.parametrize(
    ("choice", "opening"),
    [
        ({"type": "tool", "name": "get_weather"}, '"arguments": {"city": "'),
        ({"type": "any"}, '<tool_call>\n{"name": "'),
    ],
)
def test_tool_choice_steers_the_answer(served, choice, opening):
    client, state = served()
    says(state, 'Paris"}}\n</tool_call>')
    tools = [WEATHER, {"name": "get_time", "input_schema": {"type": "object"}}]
    client.post("/v1/messages", json={**ASK, "tools": tools, "tool_choice": choice})
    want = state.tokenizer.encode(opening)
    assert state.engine.jobs[-1].prompt[-len(want) :] == want


def test_tool_choice_none_shows_no_tools(served):
    client, state = served()
    says(state, "ok")
    body = {**ASK, "tools": [WEATHER], "tool_choice": {"type": "none"}}
    assert client.post("/v1/messages", json=body).json()["content"][0]["text"] == "ok"
    assert state.rendered[-1]["tools"] is None


def test_a_tool_loop_in_blocks(served):
    client, state = served()
    says(state, "21 degrees.")
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": '{"temp": 21}'}],
                },
                {"type": "text", "text": "And in degrees F?"},
            ],
        },
    ]
    body = client.post(
        "/v1/messages", json={"max_tokens": 8, "messages": messages, "tools": [WEATHER]}
    ).json()
    assert body["content"] == [{"type": "text", "text": "21 degrees."}]
    _, assistant, tool, user = state.rendered[-1]["messages"]
    assert assistant["content"] == "Let me look."
    assert assistant["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert tool == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "toolu_1"}
    assert user == {"role": "user", "content": "And in degrees F?"}


def test_stop_reasons(served):
    client, state = served()
    says(state, "word", finish="length")
    assert client.post("/v1/messages", json=ASK).json()["stop_reason"] == "max_tokens"
    # A stop string ends it: the tokens (the stand-in decodes 0 as "a", 1
    # as "b") say more than the text shown.
    state.engine.script = lambda job: [Step("a", 0), Step("", 1), Done("stop", 3, 2)]
    body = client.post("/v1/messages", json={**ASK, "stop_sequences": ["zz", "b"]}).json()
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "b")
    assert state.engine.jobs[-1].options["stop"] == ["zz", "b"]
    # The end token: end_turn, stop sequences or not.
    state.engine.script = lambda job: [Step("a", 0), Step("", 99), Done("stop", 3, 2)]
    body = client.post("/v1/messages", json={**ASK, "stop_sequences": ["b"]}).json()
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)


def test_the_stream_has_anthropics_events(served):
    client, state = served(template=HERMES_TEMPLATE + " <think>")
    says(state, *pieces_of("<think>Weather.</think>On it.\n" + CALL, 4))
    r = client.post("/v1/messages", json={**ASK, "tools": [WEATHER], "stream": True})
    got = typed_events(r)
    kinds = [k for k, _ in got]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    starts = [d for k, d in got if k == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["thinking", "text", "tool_use"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[2]["content_block"]["name"] == "get_weather"
    assert [d["index"] for k, d in got if k == "content_block_stop"] == [0, 1, 2]
    deltas = [d for k, d in got if k == "content_block_delta"]
    by = {}
    for d in deltas:
        kind = d["delta"]["type"]
        field = {"thinking_delta": "thinking", "text_delta": "text"}.get(kind, "partial_json")
        by.setdefault((d["index"], kind), "")
        by[(d["index"], kind)] += d["delta"][field]
    assert by == {
        (0, "thinking_delta"): "Weather.",
        (1, "text_delta"): "On it.",
        (2, "input_json_delta"): '{"city": "Paris"}',
    }
    end = got[-2][1]
    assert end["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert end["usage"]["output_tokens"] > 0


def test_errors_have_anthropics_shape(served):
    client, state = served(api_key="sesame")
    err = anthropic_error(client.post("/v1/messages", json=ASK), 401)
    assert err["type"] == "authentication_error"
    key = {"x-api-key": "sesame"}
    err = anthropic_error(client.post("/v1/messages", json={"messages": []}, headers=key), 422)
    assert err["type"] == "invalid_request_error" and "max_tokens" in err["message"]
    bad = {**ASK, "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    err = anthropic_error(client.post("/v1/messages", json=bad, headers=key), 400)
    assert "messages[0].content[0]" in err["message"]
    err = anthropic_error(
        client.post("/v1/messages", json={**ASK, "model": "claude"}, headers=key), 404
    )
    assert err["type"] == "not_found_error"
    big = {**ASK, "max_tokens": 1 << 30}
    assert anthropic_error(client.post("/v1/messages", json=big, headers=key), 400)["type"] == (
        "invalid_request_error"
    )
    state.engine.script = lambda job: [Failed(ConnectionError("worker w: gone"))]
    err = anthropic_error(client.post("/v1/messages", json=ASK, headers=key), 503)
    assert err == {"type": "overloaded_error", "message": "worker w: gone"}
    got = typed_events(client.post("/v1/messages", json={**ASK, "stream": True}, headers=key))
    assert got[-1] == ("error", {"type": "error", "error": err})
    # The other APIs keep OpenAI's shape.
    assert "error" in client.post("/v1/chat/completions", json={}, headers=key).json()
