"""The generation API on the tiny model: stop strings, max_tokens, response fields,
prompt forms, argument errors, verbose printing, and running in several threads."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx_dist
import numpy as np
import pytest

PROMPT = "The keeper told the children a story about the sea."
STEPS = 48


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """(model, tokenizer, prompt ids, greedy responses) for the tiny llama."""
    model, tok = mlx_dist.load(str(tiny_model(arch="llama")))
    ids = tok.encode(PROMPT)
    greedy = list(mlx_dist.stream_generate(model, tok, ids, max_tokens=STEPS))
    assert greedy[-1].finish_reason == "length", "guards the fixture: no EOS in the greedy run"
    return model, tok, ids, greedy


def _stream(tiny, max_tokens=STEPS, **kwargs):
    model, tok, ids, _ = tiny
    return list(mlx_dist.stream_generate(model, tok, ids, max_tokens=max_tokens, **kwargs))


def _single_token_stop(tiny):
    """A stop string that is one whole greedy token's text: (stop, step of that token)."""
    _, tok, _, greedy = tiny
    chunks = [r.text for r in greedy]
    full = "".join(chunks)
    for i, r in enumerate(greedy):
        text = chunks[i]
        start = len("".join(chunks[:i]))
        plain = len(text) >= 2 and text.isascii() and text.isprintable() and text.strip()
        if plain and tok.decode([r.token]) == text and full.find(text) == start:
            return text, i
    raise AssertionError(f"no single-token stop string in {chunks}")


def _two_token_stop(tiny):
    """A stop string made of the end of one greedy token and the start of the next:
    (stop, where it starts in the text, step of the token that completes it)."""
    chunks = [r.text for r in tiny[3]]
    full = "".join(chunks)
    for i in range(len(chunks) - 1):
        a, b = chunks[i], chunks[i + 1]
        if all(c.isascii() and c.isprintable() and c.strip() for c in (a, b)):
            stop = a[-2:] + b[:2]
            start = len("".join(chunks[: i + 1])) - len(a[-2:])
            if full.find(stop) == start:
                return stop, start, i + 1
    raise AssertionError(f"no two-token stop string in {chunks}")


def _assert_streams_prefixes(responses, expected):
    """Every prefix of the stream is a prefix of `expected`: nothing is shown and then taken back."""
    shown = ""
    for r in responses:
        shown += r.text
        assert expected.startswith(shown), (shown, expected)
    assert shown == expected


def test_stop_string_of_one_token(tiny):
    model, tok, ids, greedy = tiny
    stop, step = _single_token_stop(tiny)
    full = "".join(r.text for r in greedy)
    expected = full[: full.find(stop)]
    responses = _stream(tiny, stop=[stop])
    assert len(responses) == step + 1
    assert [r.token for r in responses] == [r.token for r in greedy[: step + 1]]
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert not any(stop in r.text for r in responses)
    _assert_streams_prefixes(responses, expected)
    assert mlx_dist.generate(model, tok, ids, max_tokens=STEPS, stop=stop) == expected


def test_stop_string_spanning_two_tokens(tiny):
    model, tok, ids, greedy = tiny
    stop, start, step = _two_token_stop(tiny)
    expected = "".join(r.text for r in greedy)[:start]
    responses = _stream(tiny, stop=[stop])
    assert len(responses) == step + 1
    assert responses[-1].finish_reason == "stop"
    assert not any(stop in r.text for r in responses)
    _assert_streams_prefixes(responses, expected)
    assert mlx_dist.generate(model, tok, ids, max_tokens=STEPS, stop=[stop]) == expected


def test_earliest_of_several_stop_strings_wins(tiny):
    greedy = tiny[3]
    one, _ = _single_token_stop(tiny)
    two, _, _ = _two_token_stop(tiny)
    full = "".join(r.text for r in greedy)
    first = min(full.find(one), full.find(two))
    responses = _stream(tiny, stop=[one, two, "never appears \u2603"])
    assert responses[-1].finish_reason == "stop"
    _assert_streams_prefixes(responses, full[:first])


def test_unfinished_stop_string_is_released(tiny):
    """Text that only starts a stop string is held back, then shown once it cannot match."""
    greedy = tiny[3]
    stop, _ = _single_token_stop(tiny)
    full = "".join(r.text for r in greedy)
    responses = _stream(tiny, stop=[stop + "\u2603never"])
    assert responses[-1].finish_reason == "length"
    assert len(responses) == STEPS
    _assert_streams_prefixes(responses, full)


def test_stop_string_only_in_the_prompt_does_not_stop(tiny):
    greedy = tiny[3]
    full = "".join(r.text for r in greedy)
    assert "keeper" in PROMPT and "keeper" not in full
    responses = _stream(tiny, stop=["keeper"])
    assert [r.token for r in responses] == [r.token for r in greedy]
    assert "".join(r.text for r in responses) == full


@pytest.mark.parametrize(("stop", "expected", "n"), [("中", "é", 5), ("😀a", "é中", 10)])
def test_stop_string_of_multibyte_characters(cycle_model, stop, expected, n):
    """The byte tokens of a character complete a stop string only together."""
    path, ids = cycle_model("é中😀a")
    model, tok = mlx_dist.load(str(path))
    responses = list(mlx_dist.stream_generate(model, tok, [ids[-1]], max_tokens=30, stop=stop))
    assert len(responses) == n
    assert responses[-1].finish_reason == "stop"
    _assert_streams_prefixes(responses, expected)


def test_empty_stop_string_is_refused(tiny):
    with pytest.raises(ValueError, match="stop"):
        _stream(tiny, stop=[""])


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_max_tokens_gives_exactly_n_responses(tiny, n):
    responses = _stream(tiny, max_tokens=n)
    assert len(responses) == n
    assert [r.finish_reason for r in responses] == [None] * (n - 1) + ["length"]
    assert [r.token for r in responses] == [r.token for r in tiny[3][:n]]


def test_response_fields(tiny):
    model, _, ids, greedy = tiny
    vocab = model.config["vocab_size"]
    assert [r.generation_tokens for r in greedy] == list(range(1, STEPS + 1))
    for r in greedy:
        assert isinstance(r, mlx_dist.GenerationResponse)
        assert r.prompt_tokens == len(ids)
        assert isinstance(r.text, str)
        assert 0 <= r.token < vocab
        assert r.prompt_tps > 0
        assert r.generation_tps > 0
        assert r.peak_memory > 0
        assert not r.from_draft
    # The step's log-probabilities: normalized, with the greedy token as their argmax.
    lp = np.array(greedy[3].logprobs.astype(mx.float32))
    assert lp.shape == (vocab,)
    assert np.exp(lp.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-3)
    assert int(lp.argmax()) == greedy[3].token


def test_prompt_forms_give_the_same_tokens(tiny):
    model, tok, ids, greedy = tiny
    expected = [r.token for r in greedy[:12]]
    for prompt in (PROMPT, ids, mx.array(ids), mx.array([ids]), np.array(ids)):
        responses = list(mlx_dist.stream_generate(model, tok, prompt, max_tokens=12))
        assert [r.token for r in responses] == expected, type(prompt)
        assert responses[0].prompt_tokens == len(ids)


def test_string_prompt_starting_with_bos_gets_no_second_bos(tiny_model):
    model, tok = mlx_dist.load(str(tiny_model(arch="llama", add_bos=True)))
    bos = tok.bos_token
    ids = tok.encode(PROMPT)
    assert ids[0] == tok.convert_tokens_to_ids(bos)
    for prompt in (PROMPT, bos + PROMPT):
        first = next(mlx_dist.stream_generate(model, tok, prompt, max_tokens=1))
        assert first.prompt_tokens == len(ids)


BAD_CALLS = {
    "empty-string": ("", {}),
    "empty-list": ([], {}),
    "token-at-vocab-size": ("VOCAB", {}),
    "token-far-outside": ([1, 2, 10**6], {}),
    "negative-token": ([5, -1], {}),
    "max_tokens-0": (None, {"max_tokens": 0}),
    "max_tokens-negative": (None, {"max_tokens": -3}),
    "max_tokens-float": (None, {"max_tokens": 2.5}),
    "unknown-kwarg": (None, {"temperature_typo": 0.5}),
    "max_kv_size": (None, {"max_kv_size": 64}),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_and_later_generate_works(tiny, name):
    model, tok, ids, greedy = tiny
    prompt, kwargs = BAD_CALLS[name]
    if prompt is None:
        prompt = ids
    elif prompt == "VOCAB":
        prompt = [*ids, model.config["vocab_size"]]
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises((ValueError, TypeError)) as info:
        list(mlx_dist.stream_generate(model, tok, prompt, **kwargs))
    assert str(info.value)
    with pytest.raises((ValueError, TypeError)):
        mlx_dist.generate(model, tok, prompt, **kwargs)
    # The failed call left nothing behind: the next one is the plain greedy run.
    assert [r.token for r in _stream(tiny, max_tokens=8)] == [r.token for r in greedy[:8]]


def test_verbose_prints_text_and_speeds(tiny, capsys):
    model, tok, ids, _ = tiny
    text = mlx_dist.generate(model, tok, ids, max_tokens=10, verbose=True)
    out = capsys.readouterr().out
    assert f"==========\n{text}\n==========\n" in out
    assert f"Prompt: {len(ids)} tokens, " in out
    assert "Generation: 10 tokens, " in out and "tokens-per-sec" in out
    assert "Peak memory: " in out
    assert mlx_dist.generate(model, tok, ids, max_tokens=10) == text
    assert capsys.readouterr().out == ""


def test_threads_generate_concurrently_with_sequential_results(tiny):
    model, tok, ids, _ = tiny
    prompts = {"a": ids, "b": "Why is the sky blue?", "c": ids[:5]}
    sampler = mlx_dist.make_sampler(temp=1.0, top_k=20)
    kwargs = {"max_tokens": 64, "sampler": sampler, "seed": 3}
    expected = {k: mlx_dist.generate(model, tok, p, **kwargs) for k, p in prompts.items()}

    count = 0
    stop = threading.Event()

    def counter():
        nonlocal count
        while not stop.is_set():
            count += 1
            time.sleep(0.0005)

    ticker = threading.Thread(target=counter)
    ticker.start()
    try:
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            futures = {
                k: pool.submit(mlx_dist.generate, model, tok, p, **kwargs)
                for k, p in prompts.items()
            }
            before = count
            results = {k: f.result(timeout=120) for k, f in futures.items()}
            after = count
    finally:
        stop.set()
        ticker.join()
    assert results == expected
    assert after > before


def test_gil_is_released_during_prefill(tiny):
    """A long prompt is prefilled in one native call; another thread keeps running meanwhile."""
    model, tok, ids, _ = tiny
    long_prompt = (ids * 200)[:1500]
    ticks: list[float] = []
    marks: list[float] = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        time.sleep(0.02)
        mlx_dist.generate(
            model,
            tok,
            long_prompt,
            max_tokens=1,
            prompt_progress_callback=lambda done, total: marks.append(time.perf_counter()),
        )
    finally:
        stop.set()
        ticker.join()
    # The callback runs before and after the prefill.
    start, end = marks
    inside = [t for t in ticks if start <= t <= end]
    gaps = np.diff([start, *inside, end])
    assert end - start > 0.05, "guards the test: the prefill must take a while"
    assert len(inside) >= 10
    assert gaps.max() < 0.5 * (end - start)
