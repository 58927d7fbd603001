"""Samplers and logits processors through the public API, on the tiny model: what each
setting allows at every step (read from the step's log-probabilities), seeds, and
parity with mlx-lm's samplers and processors."""

import math

import mlx.core as mx
import mlx_dist
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors as mlx_lm_processors
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler
from tiny_models import mlx_lm_load, mlx_lm_stream

PROMPT = "The keeper told the children a story about the sea."
STEPS = 64


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """(path, model, tokenizer, prompt ids, greedy tokens) for the tiny llama."""
    path = tiny_model(arch="llama")
    model, tok = mlx_dist.load(str(path))
    ids = tok.encode(PROMPT)
    greedy = [r.token for r in mlx_dist.stream_generate(model, tok, ids, max_tokens=STEPS)]
    return path, model, tok, ids, greedy


def _run(tiny, **kwargs):
    _, model, tok, ids, _ = tiny
    return list(mlx_dist.stream_generate(model, tok, ids, max_tokens=STEPS, **kwargs))


def _tokens(tiny, **kwargs):
    return [r.token for r in _run(tiny, **kwargs)]


def _logprobs(response) -> np.ndarray:
    lp = np.array(response.logprobs.astype(mx.float32))
    assert lp.ndim == 1 and lp.size > 0
    return lp


@pytest.mark.parametrize("k", [1, 2, 5, 20])
def test_top_k_samples_among_the_k_best(tiny, k):
    responses = _run(tiny, sampler=mlx_dist.make_sampler(temp=1.0, top_k=k), seed=0)
    assert len(responses) == STEPS
    vocab = tiny[1].config["vocab_size"]
    for step, r in enumerate(responses):
        lp = _logprobs(r)
        assert lp.shape == (vocab,)
        rank = int((lp > lp[r.token]).sum())
        assert rank < k, (step, r.token, rank)
    if k >= 5:
        # Not greedy in disguise: some step takes a token other than the best.
        assert any(int((_logprobs(r) > _logprobs(r)[r.token]).sum()) > 0 for r in responses)


def test_same_seed_repeats_and_other_seed_differs(tiny):
    sampler = mlx_dist.make_sampler(temp=1.0)
    first = _tokens(tiny, sampler=sampler, seed=1)
    assert _tokens(tiny, sampler=sampler, seed=1) == first
    assert _tokens(tiny, sampler=sampler, seed=2) != first
    assert first != tiny[4]


@pytest.mark.parametrize(
    "settings",
    [
        {"temp": 1.0},
        {"temp": 0.7, "top_k": 5},
        {"temp": 1.0, "top_p": 0.9},
        {"temp": 1.3, "min_p": 0.1},
    ],
    ids=["temp", "top_k", "top_p", "min_p"],
)
def test_seeded_sampling_matches_mlx_lm(tiny, settings):
    """A seed draws MLX's random key sequence, as `mx.random.seed` does for mlx-lm."""
    path = tiny[0]
    mlx_lm_load(path)  # loading initializes weights with the global RNG: do it before seeding
    ours = _tokens(tiny, sampler=mlx_dist.make_sampler(**settings), seed=5)
    mx.random.seed(5)
    theirs = mlx_lm_stream(path, tiny[3], STEPS, sampler=mlx_lm_sampler(**settings))
    assert ours == [r.token for r in theirs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temp_zero_is_greedy_regardless_of_seed(tiny, seed):
    assert _tokens(tiny, sampler=mlx_dist.make_sampler(temp=0.0), seed=seed) == tiny[4]
    # top_k is ignored by the greedy sampler, even one the vocabulary could not serve.
    vocab = tiny[1].config["vocab_size"]
    greedy_k = mlx_dist.make_sampler(temp=0.0, top_k=vocab)
    assert _tokens(tiny, sampler=greedy_k, seed=seed) == tiny[4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_top_p_keeps_only_the_argmax(tiny, seed):
    sampler = mlx_dist.make_sampler(temp=2.0, top_p=0.01)
    assert _tokens(tiny, sampler=sampler, seed=seed) == tiny[4]


def test_top_p_samples_within_the_nucleus(tiny):
    top_p = 0.5
    responses = _run(tiny, sampler=mlx_dist.make_sampler(temp=1.0, top_p=top_p), seed=0)
    for step, r in enumerate(responses):
        probs = np.exp(_logprobs(r).astype(np.float64))
        # The mass of the tokens ranked above the drawn one is below top_p.
        above = probs[probs > probs[r.token]].sum()
        assert above < top_p + 1e-4, (step, above)
    assert _tokens(tiny, sampler=mlx_dist.make_sampler(temp=1.0, top_p=top_p), seed=0) != tiny[4]


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_samples_above_the_threshold(tiny, min_p):
    responses = _run(tiny, sampler=mlx_dist.make_sampler(temp=1.5, min_p=min_p), seed=0)
    for step, r in enumerate(responses):
        lp = _logprobs(r)
        assert lp[r.token] >= lp.max() + math.log(min_p) - 1e-4, step
    assert [r.token for r in responses] != tiny[4]


@pytest.mark.parametrize("seed", [0, 1])
def test_min_p_one_is_greedy(tiny, seed):
    assert _tokens(tiny, sampler=mlx_dist.make_sampler(temp=2.0, min_p=1.0), seed=seed) == tiny[4]


PENALTIES = {
    "repetition": {"repetition_penalty": 1.5},
    "repetition-context-4": {"repetition_penalty": 2.0, "repetition_context_size": 4},
    "presence": {"presence_penalty": 1.0},
    "frequency": {"frequency_penalty": 0.5},
    "all": {
        "repetition_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "frequency_context_size": 8,
    },
    "logit-bias": {"logit_bias": {5: 3.0, 200: -2.0}},
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_logits_processors_change_output_and_match_mlx_lm(tiny, name):
    path, _, _, ids, greedy = tiny
    settings = PENALTIES[name]
    processors = mlx_dist.make_logits_processors(**settings)
    assert processors
    ours = _tokens(tiny, logits_processors=processors)
    assert ours != greedy
    theirs = mlx_lm_stream(path, ids, STEPS, logits_processors=mlx_lm_processors(**settings))
    assert ours == [r.token for r in theirs]


def test_repetition_penalty_lowers_repeats(tiny):
    """The penalized run repeats tokens of its recent context less than greedy does."""

    def repeats(tokens, window=20):
        return sum(t in tokens[max(0, i - window) : i] for i, t in enumerate(tokens))

    greedy = tiny[4]
    penalized = _tokens(
        tiny, logits_processors=mlx_dist.make_logits_processors(presence_penalty=5.0)
    )
    assert repeats(penalized) < repeats(greedy)


def test_penalties_of_zero_or_none_are_no_processors(tiny):
    assert mlx_dist.make_logits_processors() == []
    assert mlx_dist.make_logits_processors(repetition_penalty=0, presence_penalty=None) == []
    assert _tokens(tiny, logits_processors=[]) == tiny[4]


def _bad_settings(vocab):
    return {
        "temp-negative": {"temp": -1.0},
        "temp-nan": {"temp": float("nan")},
        "top_p-2": {"temp": 1.0, "top_p": 2.0},
        "top_p-negative": {"temp": 1.0, "top_p": -0.1},
        "min_p-above-1": {"temp": 1.0, "min_p": 1.5},
        "top_k-negative": {"temp": 1.0, "top_k": -1},
        "top_k-float": {"temp": 1.0, "top_k": 2.5},
        "top_k-vocab": {"temp": 1.0, "top_k": vocab},
        "top_k-above-vocab": {"temp": 1.0, "top_k": vocab + 10},
        "min_tokens_to_keep-0": {"temp": 1.0, "min_p": 0.1, "min_tokens_to_keep": 0},
    }


@pytest.mark.parametrize("name", list(_bad_settings(0)))
def test_invalid_sampler_settings_raise_value_error(tiny, name):
    settings = _bad_settings(tiny[1].config["vocab_size"])[name]
    with pytest.raises(ValueError):
        _run(tiny, sampler=mlx_dist.make_sampler(**settings), seed=0)
    # The model is still usable.
    assert _tokens(tiny) == tiny[4]


@pytest.mark.parametrize(
    "settings",
    [{"repetition_penalty": -1.0}, {"logit_bias": {10_000: 1.0}}],
    ids=["negative-repetition", "bias-outside-vocab"],
)
def test_invalid_processor_settings_raise_value_error(tiny, settings):
    with pytest.raises(ValueError):
        _run(tiny, logits_processors=mlx_dist.make_logits_processors(**settings))
    assert _tokens(tiny) == tiny[4]


def test_plain_callables_are_refused_with_type_error(tiny):
    with pytest.raises(TypeError, match="make_logits_processors"):
        _run(tiny, logits_processors=[lambda tokens, logits: logits])
    with pytest.raises(TypeError, match="make_logits_processors"):
        _run(
            tiny, logits_processors=[*mlx_dist.make_logits_processors(presence_penalty=1.0), print]
        )
    with pytest.raises(TypeError, match="make_sampler"):
        _run(tiny, sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    assert _tokens(tiny) == tiny[4]
