"""POST /v1/responses (OpenAI's Responses API) over the chat machinery, in
this process with a stand-in model: input items to messages, output
items, the typed stream events, a tool loop, errors in OpenAI's shape."""

from __future__ import annotations

import json

import pytest
from mlx_dist.engine import Failed
from test_server_http import error_of
from test_server_tools import (
    CALL,
    HERMES_TEMPLATE,
    pieces_of,
    says,
)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def typed_events(r) -> list[tuple[str, dict]]:
    """(type, data) of each event, checking that ``event:`` names its data's type."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in r.text.strip().split("\n\n"):
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), block
        body = json.loads(data[len("data: ") :])
        assert body["type"] == head[len("event: ") :]
        out.append((body["type"], body))
    return out


def test_a_text_input_gives_a_message_item(served):
    client, state = served()
    says(state, "Hello", " there.")
    r = client.post("/v1/responses", json={"input": "hi", "instructions": "Be brief."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "completed" and body["model"] == "fake"
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"] == [
        {"type": "output_text", "text": "Hello there.", "annotations": [], "logprobs": []}
    ]
    assert body["usage"]["output_tokens"] == 2
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + 2
    assert state.rendered[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_a_call_is_a_function_call_item_and_tools_come_flat(served):
    client, state = served()
    says(state, *pieces_of(CALL))
    body = client.post("/v1/responses", json={"input": "weather?", "tools": [WEATHER]}).json()
    [item] = body["output"]
    assert item["type"] == "function_call" and item["call_id"].startswith("call_")
    assert (item["name"], json.loads(item["arguments"])) == ("get_weather", {"city": "Paris"})
    # The template got the tool in the chat API's shape.
    [tool] = state.rendered[-1]["tools"]
    assert tool["type"] == "function" and tool["function"]["name"] == "get_weather"
    assert tool["function"]["parameters"] == WEATHER["parameters"]


def test_a_named_tool_choice_in_the_flat_shape(served):
    client, state = served()
    says(state, 'Paris"}}\n</tool_call>')
    choice = {"type": "function", "name": "get_weather"}
    body = client.post(
        "/v1/responses", json={"input": "x", "tools": [WEATHER], "tool_choice": choice}
    ).json()
    assert json.loads(body["output"][0]["arguments"]) == {"city": "Paris"}


def test_a_tool_loop_in_input_items(served):
    client, state = served()
    says(state, "It is 21 degrees.")
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "weather in Paris?"}]},
        {
            "type": "function_call",
            "call_id": "call_9",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_9", "output": '{"temp": 21}'},
    ]
    body = client.post("/v1/responses", json={"input": items, "tools": [WEATHER]}).json()
    assert body["output"][0]["content"][0]["text"] == "It is 21 degrees."
    user, assistant, tool = state.rendered[-1]["messages"]
    assert user == {"role": "user", "content": "weather in Paris?"}
    assert assistant["tool_calls"][0]["id"] == "call_9"
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tool == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_9"}


def test_a_cut_off_answer_is_incomplete(served):
    client, state = served()
    says(state, "Once upon", finish="length")
    body = client.post("/v1/responses", json={"input": "story", "max_output_tokens": 1}).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert state.engine.jobs[-1].options["max_tokens"] == 1


def test_the_stream_has_the_typed_events(served):
    client, state = served()
    says(state, *pieces_of("Let me check.\n" + CALL, 4))
    r = client.post("/v1/responses", json={"input": "weather?", "tools": [WEATHER], "stream": True})
    got = typed_events(r)
    kinds = [k for k, _ in got]
    assert [d["sequence_number"] for _, d in got] == list(range(len(got)))
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.completed"
    text = "".join(d["delta"] for k, d in got if k == "response.output_text.delta")
    assert text == "Let me check."
    [done_text] = [d for k, d in got if k == "response.output_text.done"]
    assert done_text["text"] == "Let me check."
    args = [d["delta"] for k, d in got if k == "response.function_call_arguments.delta"]
    assert len(args) > 1 and json.loads("".join(args)) == {"city": "Paris"}
    [done_args] = [d for k, d in got if k == "response.function_call_arguments.done"]
    assert done_args["arguments"] == "".join(args) and done_args["name"] == "get_weather"
    # Each item opened is closed, in order, before the next one opens.
    opened = [d["output_index"] for k, d in got if k == "response.output_item.added"]
    closed = [d["output_index"] for k, d in got if k == "response.output_item.done"]
    assert opened == closed == [0, 1]
    final = got[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == done_args["arguments"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] > 0


def test_reasoning_is_a_reasoning_item(served):
    client, state = served(template=HERMES_TEMPLATE + " <think>")
    says(state, *pieces_of("<think>Easy.</think>Paris.", 3))
    body = client.post("/v1/responses", json={"input": "capital?"}).json()
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Easy."}]
    assert message["content"][0]["text"] == "Paris."
    got = typed_events(client.post("/v1/responses", json={"input": "capital?", "stream": True}))
    thought = "".join(d["delta"] for k, d in got if k == "response.reasoning_text.delta")
    assert thought == "Easy."
    assert [i["type"] for i in got[-1][1]["response"]["output"]] == ["reasoning", "message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0][0]"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_values_are_400s_in_openais_shape(served, change, param):
    client, state = served()
    err = error_of(client.post("/v1/responses", json={"input": "x", **change}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    if param == "max_output_tokens":
        assert "max_output_tokens" in err["message"]
    assert state.engine.jobs == []


def test_a_failure_is_its_status_or_an_error_event(served):
    client, state = served()
    assert error_of(client.post("/v1/responses", json={}), 422)["param"] == "input"
    assert error_of(client.post("/v1/responses", json={"input": "x", "model": "gpt"}), 404)
    state.engine.script = lambda job: [Failed(ConnectionError("worker w: gone"))]
    assert error_of(client.post("/v1/responses", json={"input": "x"}), 503)["message"] == (
        "worker w: gone"
    )
    got = typed_events(client.post("/v1/responses", json={"input": "x", "stream": True}))
    assert got[-1] == (
        "error",
        {
            "type": "error",
            "sequence_number": 2,
            "code": "service_unavailable",
            "message": "worker w: gone",
            "param": None,
        },
    )
