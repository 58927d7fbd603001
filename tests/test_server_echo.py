"""`echo` on /v1/completions with the demo model's byte-level tokenizer,
where a completion's first token starts with a space."""

from __future__ import annotations

import httpx
import pytest
from server_utils import ServerProcess

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def demo_server(demo_gguf, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("echo"), "--model", str(demo_gguf))
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_echo_keeps_the_space_between_prompt_and_completion(demo_server, stream):
    url = f"{demo_server.url}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 3, "logprobs": 0}
    plain = httpx.post(url, json=body, timeout=120).json()["choices"][0]
    # The detokenizer drops the leading space of a completion (as mlx-lm's).
    assert plain["text"] == "Paris.\n"
    assert plain["logprobs"]["tokens"][0] == " Paris"
    if stream:
        with httpx.stream("POST", url, json=dict(body, echo=True, stream=True), timeout=120) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
        import json

        chunks = [json.loads(line)["choices"][0] for line in lines]
        text = "".join(c["text"] for c in chunks)
        offsets = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    else:
        echoed = httpx.post(url, json=dict(body, echo=True), timeout=120).json()["choices"][0]
        text = echoed["text"]
        offsets = echoed["logprobs"]["text_offset"]
    assert text == f"{PROMPT} Paris.\n"
    # Each token's offset is where its text starts: " Paris" right after the prompt.
    assert offsets[:2] == [len(PROMPT), len(PROMPT) + len(" Paris")]
