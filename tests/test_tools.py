"""Tool calls read from model output, for every template family: plain
text, one call, several, a malformed one (kept as text), and the same
result whatever pieces the output arrives in. The outputs are written as
each model writes them (the formats of its chat template, as vLLM's and
llama.cpp's parser tests have them)."""

from __future__ import annotations

import json
import random

import pytest
from mlx_dist.server.reasoning import ThinkSplitter
from mlx_dist.server.tools.family import Family, detect
from mlx_dist.server.tools.gpt_oss import Harmony
from mlx_dist.server.tools.parser import PlainText
from mlx_dist.server.tools.schema import problems

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": {}}}]
PARIS = ("get_weather", {"city": "Paris"})
BOTH = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]


def parse(family: Family, pieces: list[str], reasoning: bool = False, thinking: bool = False):
    """(content, reasoning, [(name, arguments)]) of output fed in ``pieces``."""
    p = family.parser(TOOLS, calls=True, reasoning=reasoning, thinking=thinking)
    deltas = [p.feed(piece) for piece in pieces] + [p.finish()]
    content = "".join(d.content for d in deltas)
    thought = "".join(d.reasoning for d in deltas)
    calls: dict[int, list] = {}
    for d in deltas:
        for c in d.calls:
            if c.index not in calls:
                assert c.id.startswith("call_") and c.name, c
                calls[c.index] = [c.name, ""]
            else:
                assert c.id is None and c.name is None, c
            calls[c.index][1] += c.arguments
    return content, thought, [(name, args) for name, args in calls.values()]


def splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 16))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def check(family: Family, text: str, content: str, calls: list, **kw) -> None:
    """``text`` parses to ``content`` and ``calls`` (arguments compared as
    JSON), whole, a character at a time and in 60 random splits."""
    whole = parse(family, [text], **kw)
    got_content, _, got_calls = whole
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in got_calls] == calls
    assert parse(family, list(text), **kw) == whole
    for seed in range(60):
        assert parse(family, splits(text, seed), **kw) == whole, seed


HERMES = detect("{{ tools }} <tool_call> {{ tool_calls }}")
CASES = {
    "hermes": (
        HERMES,
        [
            ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
            (
                (
                    'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                    '"Paris"}}\n</tool_call>'
                ),
                "I will check.\n",
                [PARIS],
            ),
            (
                (
                    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
                    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
                ),
                "\n",
                BOTH,
            ),
            (
                '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call> sorry',
                '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call> sorry',
                [],
            ),
        ],
    ),
    "llama3": (
        detect("<|start_header_id|>{{ tools }}<|python_tag|>{{ tool_calls }}"),
        [
            ("Paris is in France.", "Paris is in France.", []),
            ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
            (
                (
                    '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": '
                    '{"city": "Paris", "days": 3}}; {"name": "get_time", "parameters": {}}'
                ),
                "",
                BOTH,
            ),
            ('{"answer": "Paris"}', '{"answer": "Paris"}', []),
            ('<|python_tag|>get_weather(city="Paris")', "", [PARIS]),
            ("<|python_tag|>get_weather(city=", "<|python_tag|>get_weather(city=", []),
        ],
    ),
    "mistral": (
        detect("{{ tools }}[TOOL_CALLS]{{ name }}[ARGS]{{ tool_calls }}"),
        [
            ("Bonjour!", "Bonjour!", []),
            ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [PARIS]),
            (
                (
                    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}'
                    "[TOOL_CALLS]get_time[ARGS]{}"
                ),
                "",
                BOTH,
            ),
            (
                (
                    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},'
                    ' {"name": "get_time", "arguments": {}}]'
                ),
                "",
                BOTH,
            ),
            ('[TOOL_CALLS]get weather?[ARGS]{"city"', '[TOOL_CALLS]get weather?[ARGS]{"city"', []),
        ],
    ),
    "gpt-oss": (
        detect("<|start|>{{ tools }}<|channel|>{{ tool_calls }}"),
        [
            (
                (
                    "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final"
                    "<|message|>Paris is sunny."
                ),
                "Paris is sunny.",
                [],
            ),
            (
                (
                    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
                    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                    '{"city":"Paris"}'
                ),
                "",
                [PARIS],
            ),
            (
                (
                    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                    '{"city":"Paris","days":3}<|call|><|start|>assistant to=functions.get_time'
                    "<|channel|>commentary json<|message|>{}<|call|>"
                ),
                "",
                BOTH,
            ),
            ("<|channel|>final no message marker", "<|channel|>final no message marker", []),
        ],
    ),
    "deepseek": (
        detect("{{ tools }}<｜tool▁call▁begin｜>function<｜tool▁sep｜>```json {{ tool_calls }}"),
        [
            ("Paris is sunny.", "Paris is sunny.", []),
            (
                (
                    "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                    'get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
                ),
                "Checking.",
                [PARIS],
            ),
            (
                (
                    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    '```json\n{"city": "Paris", "days": 3}\n```\n<｜tool▁call▁end｜>\n'
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```"
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
                ),
                "",
                BOTH,
            ),
            (
                # V3.1's form.
                (
                    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                    '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
                ),
                "",
                [PARIS],
            ),
            (
                "<｜tool▁calls▁begin｜>oops, no call here",
                "<｜tool▁calls▁begin｜>oops, no call here",
                [],
            ),
        ],
    ),
    "glm": (
        detect("{{ tools }}<tool_call>{{ name }}<arg_key>{{ tool_calls }}"),
        [
            ("Paris is sunny.", "Paris is sunny.", []),
            (
                (
                    "Let me look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
                    "<arg_value>Paris</arg_value>\n</tool_call>"
                ),
                "Let me look.\n",
                [PARIS],
            ),
            (
                (
                    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
                    "<tool_call>get_time\n</tool_call>"
                ),
                "",
                BOTH,
            ),
            (
                '<tool_call>{"name": "get_weather"}</tool_call>',
                '<tool_call>{"name": "get_weather"}</tool_call>',
                [],
            ),
        ],
    ),
}


def test_each_family_is_told_by_its_template():
    assert {name: f.name for name, (f, _) in CASES.items()} == {n: n for n in CASES}
    assert CASES["mistral"][0].variant and CASES["deepseek"][0].variant
    # No template, or one that renders no tools (SmolLM2's): the generic format.
    assert detect(None).name == detect("{{ messages }}", "llama").name == "generic"
    # Tools rendered, no marker known: the model type decides.
    assert detect("{{ tools }}", "qwen3").name == "hermes"


@pytest.mark.parametrize("family", sorted(CASES))
def test_calls_are_read_alike_whole_and_in_any_pieces(family):
    fam, cases = CASES[family]
    for text, content, calls in cases:
        check(fam, text, content, calls, reasoning=True)


def test_a_call_cut_off_keeps_what_was_written():
    """A call whose name was read stays a call, with the arguments so far
    (the caller then says they are not JSON); no marker reaches the text."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    content, _, calls = parse(HERMES, [text])
    assert content == "" and calls == [("get_weather", '{"city": "Par')]
    for seed in range(30):
        assert parse(HERMES, splits(text, seed)) == (content, "", calls)


def test_text_that_may_start_a_marker_is_held_until_it_does_not():
    p = HERMES.parser(TOOLS, calls=True, reasoning=False, thinking=False)
    assert p.feed("2 < 3 and <tool").content == "2 < 3 and "
    assert p.feed("s are>").content == "<tools are>"
    assert p.finish().content == ""


def test_a_marker_in_an_argument_ends_the_call_there_streamed_or_not():
    text = '<tool_call>{"name": "get_time", "arguments": {"a": "</tool_call>"}}</tool_call>'
    whole = parse(HERMES, [text])
    assert whole[2] == [("get_time", '{"a": "')]
    for seed in range(30):
        assert parse(HERMES, splits(text, seed)) == whole


def test_think_blocks_are_reasoning_opened_in_the_output_or_the_prompt():
    qwen = detect("{{ tools }}<tool_call><think>{{ tool_calls }}")
    assert qwen.thinks
    text = '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for pieces in ([text], list(text), splits(text, 1), splits(text, 2)):
        got = parse(qwen, pieces, reasoning=True)
        assert got == ("", "The user wants weather.", [("get_weather", '{"city": "Paris"}')])
    # DeepSeek-R1's template opens the block in the prompt.
    text = "Paris is a city.\n</think>\n\nIt is sunny."
    for pieces in ([text], list(text), splits(text, 3)):
        assert parse(qwen, pieces, reasoning=True, thinking=True) == (
            "It is sunny.",
            "Paris is a city.",
            [],
        )
    # Never closed (cut off): all reasoning.
    assert parse(qwen, ["still thinking"], reasoning=True, thinking=True)[:2] == (
        "",
        "still thinking",
    )
    # No block: all text; reasoning off: the block stays in the text.
    assert parse(qwen, ["  Hello"], reasoning=True)[:2] == ("  Hello", "")
    assert parse(qwen, ["<think>x</think>y"], reasoning=False)[0] == "<think>x</think>y"


def test_gpt_oss_analysis_is_reasoning_and_calls_can_be_left_unread():
    text = (
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary "
        "to=functions.get_time <|constrain|>json<|message|>{}<|call|>"
    )
    whole = Harmony()
    d = whole.feed(text).add(whole.finish())
    assert (d.reasoning, d.content, [c.name for c in d.calls if c.id]) == (
        "Think.",
        "",
        ["get_time"],
    )
    off = Harmony(calls=False, reasoning=False)
    d = off.feed(text).add(off.finish())
    assert (d.reasoning, d.content, d.calls) == ("", "Think.", [])


def test_a_parser_without_calls_passes_text_through():
    splitter = ThinkSplitter(PlainText())
    d = splitter.feed("<think>a</think>b <tool_call>{}</tool_call>").add(splitter.finish())
    assert (d.reasoning, d.content) == ("a", "b <tool_call>{}</tool_call>")


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ({"city": "Paris"}, []),
        ({"city": "Paris", "days": 3, "unit": "celsius"}, []),
        ({}, ["arguments lacks the required 'city'"]),
        ({"city": 12}, ["arguments.city should be string, got integer"]),
        ({"city": "Paris", "unit": "kelvin"}, ["arguments.unit should be one of"]),
        ({"city": "Paris", "days": 2.5}, ["arguments.days should be integer, got number"]),
        ([], ["arguments should be object, got array"]),
    ],
)
def test_arguments_are_checked_against_the_schema(value, found):
    got = problems(value, WEATHER["function"]["parameters"])
    assert len(got) == len(found) and all(g.startswith(f) for g, f in zip(got, found, strict=True))
