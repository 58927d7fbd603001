"""Tool calls and reasoning through /v1/chat/completions, in this process,
over a stand-in model whose template is a family's (no MLX): tool_calls
and finish_reason whole and streamed, tool_choice, the messages a tool
loop gives the template, reasoning_content. With the real demo model:
test_server_tools_e2e.py."""

from __future__ import annotations

import json

import pytest
from mlx_dist.engine import Done, Step
from mlx_dist.server import ServerSettings
from test_server_http import FakeState, FakeTokenizer, error_of, events

HERMES_TEMPLATE = "{{ tools }} <tool_call> {{ tool_calls }}"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK = {"messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER, TIME]}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class TemplateTokenizer(FakeTokenizer):
    has_chat_template = True

    def __init__(self, template: str):
        self.chat_template = template
        self.eos_token_ids = [99]


class TemplateState(FakeState):
    """A model whose template is ``template``: rendering records what it
    was given and writes the messages as JSON (then ``tail``)."""

    context_limit = 1 << 20
    context_length = 1 << 20

    def __init__(self, template: str, tail: str = "", **settings):
        super().__init__(ServerSettings(**settings))
        self.tokenizer = TemplateTokenizer(template)
        self.tail = tail
        self.rendered: list[dict] = []

    def render_chat(self, messages, add_generation_prompt, tools, extra):
        seen = {
            "messages": json.loads(messages),
            "tools": json.loads(tools) if tools else None,
            "extra": json.loads(extra) if extra else None,
        }
        self.rendered.append(seen)
        return json.dumps(seen["messages"]) + self.tail


def says(state, *pieces: str, finish: str = "stop") -> None:
    """The engine answers with these pieces of text, a step each."""
    state.engine.script = lambda job: [
        *(Step(p, i) for i, p in enumerate(pieces)),
        Done(finish, len(job.prompt), len(pieces)),
    ]


def pieces_of(text: str, n: int = 5) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


def chat(client, body: dict) -> dict:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(client, body: dict) -> tuple[str, str, dict, str | None, list]:
    """(content, reasoning, {index: call}, finish_reason, chunks) of a
    stream, the calls reassembled from their deltas as OpenAI's clients do."""
    chunks = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[-1] == "[DONE]"
    content, reasoning, calls, finish = "", "", {}, None
    for c in chunks[:-1]:
        choice = c["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for tc in delta.get("tool_calls") or []:
            if tc["index"] not in calls:
                assert tc["id"].startswith("call_") and tc["type"] == "function"
                calls[tc["index"]] = {"id": tc["id"], **tc["function"]}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
        finish = choice["finish_reason"] or finish
    return content, reasoning, calls, finish, chunks


def test_a_call_is_tool_calls_with_its_finish_reason(served):
    client, state = served()
    says(state, *pieces_of("I will look.\n" + CALL))
    choice = chat(client, ASK)
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] == "I will look."
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert "tool_call_errors" not in choice
    # The template was given the tools.
    assert state.rendered[-1]["tools"] == [WEATHER, TIME]


def test_calls_alone_have_no_content_and_several_keep_their_order(served):
    client, state = served()
    other = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    says(state, *pieces_of(f"{CALL}\n{other}\n", 3))
    message = chat(client, ASK)["message"]
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_a_streamed_call_is_sent_as_openai_sends_it(served):
    client, state = served()
    says(state, *pieces_of("Checking.\n" + CALL, 4))
    content, _, calls, finish, chunks = streamed(client, ASK)
    assert content == "Checking." and finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    # The arguments came in several pieces, and no marker reached the text.
    pieces = [tc for c in chunks[:-1] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert len(pieces) > 3
    assert all("<tool" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks[:-1])
    # The whole answer is the same.
    whole = chat(client, ASK)["message"]
    assert whole["content"] == content
    assert whole["tool_calls"][0]["function"]["arguments"] == calls[0]["arguments"]


def test_a_named_function_is_steered_into_and_its_arguments_checked(served):
    client, state = served()
    says(state, 'Paris"}}\n</tool_call>')
    choice = {"type": "function", "function": {"name": "get_weather"}}
    got = chat(client, {**ASK, "tool_choice": choice})
    # The answer was begun with the call, up to its first required argument.
    [job] = state.engine.jobs
    opening = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    assert job.prompt[-len(opening) :] == state.tokenizer.encode(opening)
    # One call is asked for: the answer ends at its end marker.
    assert job.options["stop"] == ["</tool_call>"]
    [call] = got["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert got["finish_reason"] == "tool_calls" and "tool_call_errors" not in got
    # Streamed: the opening's call is the first delta, then the rest.
    content, _, calls, finish, _ = streamed(client, {**ASK, "tool_choice": choice})
    assert content == "" and finish == "tool_calls"
    assert calls[0]["arguments"] == call["function"]["arguments"]


def test_arguments_that_do_not_fit_are_returned_and_said_so(served):
    client, state = served()
    says(state, 'get_weather", "arguments": {"city": 12}}\n</tool_call>')
    got = chat(client, {**ASK, "tool_choice": "required"})
    # required with two tools: the answer is begun with a call, the model names it.
    opening = state.tokenizer.encode('<tool_call>\n{"name": "')
    assert state.engine.jobs[-1].prompt[-len(opening) :] == opening
    [call] = got["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": 12}
    assert got["tool_call_errors"] == [
        "tool_calls[0]: arguments.city should be string, got integer"
    ]
    says(state, 'get_weather", "arguments": {"city": "Pa')
    got = chat(client, {**ASK, "tool_choice": "required"})
    assert got["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Pa'
    assert got["tool_call_errors"][0].startswith("tool_calls[0]: the arguments are not valid JSON")


def test_output_that_is_no_call_is_kept_as_text(served):
    client, state = served()
    text = "<tool_call>\nsorry, I cannot\n</tool_call>"
    says(state, *pieces_of(text))
    got = chat(client, {**ASK, "tool_choice": "required"})
    # The text with the server's own opening, as the answer was written.
    assert got["message"]["content"] == '<tool_call>\n{"name": "' + text
    assert "tool_calls" not in got["message"] and got["finish_reason"] == "stop"
    assert got["tool_call_errors"] == ["tool_choice asked for a tool call, but the answer has none"]
    content, _, calls, _, chunks = streamed(client, {**ASK, "tool_choice": "required"})
    assert content == got["message"]["content"] and calls == {}
    assert chunks[-2]["choices"][0]["tool_call_errors"] == got["tool_call_errors"]


def test_tool_choice_none_shows_no_tools_and_reads_no_calls(served):
    client, state = served()
    says(state, CALL)
    got = chat(client, {**ASK, "tool_choice": "none"})
    assert got["message"]["content"] == CALL and got["finish_reason"] == "stop"
    assert state.rendered[-1]["tools"] is None


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"reasoning_format": "loud"}, "reasoning_format"),
    ],
)
def test_bad_tools_and_choices_are_400s_naming_them(served, change, param):
    client, state = served()
    err = error_of(client.post("/v1/chat/completions", json={**ASK, **change}), 400)
    assert err["param"] == param, err
    assert state.engine.jobs == []


LOOP = [
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def test_a_tool_loop_reaches_the_template_with_arguments_as_objects(served):
    client, state = served()
    says(state, "It is 21 degrees.")
    got = chat(client, {"messages": LOOP, "tools": [WEATHER]})
    assert got["message"]["content"] == "It is 21 degrees." and got["finish_reason"] == "stop"
    messages = state.rendered[-1]["messages"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}


def test_a_template_without_tools_is_told_them_and_shown_calls_as_text(served):
    client, state = served(template="{{ messages }}")
    says(state, CALL)
    got = chat(client, {"messages": LOOP, "tools": [WEATHER]})
    assert got["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    seen = state.rendered[-1]
    system, _, assistant, result = seen["messages"]
    assert system["role"] == "system" and "<tools>" in system["content"]
    assert json.dumps(WEATHER) in system["content"]
    assert assistant == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert result == {
        "role": "user",
        "content": '<tool_response>\n{"temp": 21}\n</tool_response>',
    }


THINKING = "{{ tools }} <tool_call> {{ tool_calls }} <think>"


def test_reasoning_is_apart_whole_and_streamed(served):
    client, state = served(template=THINKING)
    says(state, *pieces_of("<think>\nParis is in France.\n</think>\n\nIt is sunny.", 3))
    body = {"messages": ASK["messages"]}
    message = chat(client, body)["message"]
    assert message == {
        "role": "assistant",
        "content": "It is sunny.",
        "reasoning_content": "Paris is in France.",
    }
    content, reasoning, _, finish, chunks = streamed(client, body)
    assert (content, reasoning, finish) == ("It is sunny.", "Paris is in France.", "stop")
    assert any("reasoning_content" in c["choices"][0]["delta"] for c in chunks[:-1])
    # Switched off: the block stays in the text.
    off = chat(client, {**body, "reasoning_format": "none"})["message"]
    assert off == {
        "role": "assistant",
        "content": "<think>\nParis is in France.\n</think>\n\nIt is sunny.",
    }


def test_a_think_block_opened_by_the_prompt_and_a_call_after_it(served):
    client, state = served(template=THINKING, tail="<think>\n")
    says(state, *pieces_of("Need the weather.\n</think>\n\n" + CALL, 6))
    message = chat(client, ASK)["message"]
    assert message["reasoning_content"] == "Need the weather."
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == (
        "get_weather"
    )
    # A named call cannot start inside the block: the opening closes it.
    says(state, 'Paris"}}\n</tool_call>')
    choice = {"type": "function", "function": {"name": "get_weather"}}
    got = chat(client, {**ASK, "tool_choice": choice})
    tail = state.tokenizer.encode(
        '<think>\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    )
    assert state.engine.jobs[-1].prompt[-len(tail) :] == tail
    assert got["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert "reasoning_content" not in got["message"]


def test_the_server_setting_sets_reasoning_formats_default(served):
    client, state = served(template=THINKING, reasoning_format="none")
    says(state, "<think>a</think>b")
    assert chat(client, {"messages": ASK["messages"]})["message"]["content"] == "<think>a</think>b"
    got = chat(client, {"messages": ASK["messages"], "reasoning_format": "auto"})["message"]
    assert (got["reasoning_content"], got["content"]) == ("a", "b")


def test_gpt_oss_channels_through_the_api(served):
    client, state = served(template="<|start|>{{ tools }}<|channel|>{{ tool_calls }}")
    says(
        state,
        *pieces_of(
            "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>"
            'commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}',
            7,
        ),
    )
    message = chat(client, ASK)["message"]
    assert message["reasoning_content"] == "Look it up." and message["content"] is None
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'
