"""Tool calls with the official clients against a real server on the demo
model (SmolLM2-135M-Instruct, whose template knows no tools: the generic
format, described in a system note): a named call whose arguments parse
and fit the schema, the same streamed, a whole tool loop; the Responses
API with openai's client and the Messages API with anthropic's."""

from __future__ import annotations

import json

import openai
import pytest
from server_utils import ServerProcess

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(demo_gguf, tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("tools"), "--model", str(demo_gguf))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def fits(arguments: str) -> dict:
    """The arguments, checked by hand against WEATHER's schema."""
    args = json.loads(arguments)
    assert isinstance(args, dict) and isinstance(args.get("city"), str) and args["city"]
    return args


@pytest.fixture(scope="module")
def named(client):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=ASK,
        tools=[WEATHER],
        tool_choice=NAMED,
        max_tokens=64,
    )


def test_a_named_call_parses_and_fits_its_schema(named):
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    fits(call.function.arguments)
    assert getattr(choice, "tool_call_errors", None) is None
    # It ended at the call's end: no text after it.
    assert choice.message.content is None


def test_the_named_call_streamed_is_the_same(client, named):
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(
        model=named.model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice=NAMED,
        max_tokens=64,
        stream=True,
    ):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    [whole] = named.choices[0].message.tool_calls
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == whole.function.name
    assert calls[0]["arguments"] == whole.function.arguments
    assert content == (named.choices[0].message.content or "")


def test_a_whole_tool_loop(client, named):
    [call] = named.choices[0].message.tool_calls
    messages = [
        *ASK,
        named.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    final = client.chat.completions.create(
        model=named.model, messages=messages, tools=[WEATHER], max_tokens=48
    )
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.choices[0].message.role == "assistant"
    assert final.usage.prompt_tokens > 0 and final.usage.completion_tokens > 0


def test_the_responses_api_with_openais_client(client, named):
    tool = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(
        model=named.model,
        input="What is the weather in Paris?",
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
    )
    [call] = [i for i in r.output if i.type == "function_call"]
    assert call.name == "get_weather"
    assert call.arguments == named.choices[0].message.tool_calls[0].function.arguments
    # The loop's next turn: the result goes back as an input item.
    done = client.responses.create(
        model=named.model,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"},
        ],
        tools=[tool],
        max_output_tokens=24,
        stream=True,
    )
    kinds = [e.type for e in done]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )


def test_the_messages_api_with_anthropics_client(server, named):
    anthropic = pytest.importorskip("anthropic")
    c = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    tool = {
        "name": "get_weather",
        "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"],
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = c.messages.create(
        model=named.model,
        max_tokens=64,
        messages=ask,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    assert use.input == json.loads(named.choices[0].message.tool_calls[0].function.arguments)
    # Streamed with the SDK's own accumulator: the same call.
    with c.messages.stream(
        model=named.model,
        max_tokens=64,
        messages=ask,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as s:
        streamed = s.get_final_message()
    [again] = [b for b in streamed.content if b.type == "tool_use"]
    assert (again.name, again.input) == (use.name, use.input)
    assert streamed.stop_reason == "tool_use"
    # The loop's next turn, with the tool's result.
    final = c.messages.create(
        model=named.model,
        max_tokens=24,
        messages=[
            *ask,
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}],
            },
        ],
        tools=[tool],
    )
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.usage.output_tokens > 0
