"""mlx_dist against mlx-lm on tiny random models: logits, greedy generation and loading."""

import hashlib
import json
import os
import shutil

import mlx.core as mx
import mlx_dist
import numpy as np
import pytest
from tiny_models import (
    ARCHS,
    make_tiny_model,
    mlx_lm_generate,
    mlx_lm_load,
    mlx_lm_logits,
    mlx_lm_stream,
    mlx_lm_tokens,
)

Q4 = {"group_size": 32, "bits": 4}
# original_max_position_embeddings is small so that the scaling changes short prompts.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
PROMPT = "The keeper told the children a story about the sea."
TEXT_PROMPT = "Why is the sky blue?"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

CASES = {
    **{arch: {"arch": arch} for arch in ARCHS},
    **{f"{arch}-q4": {"arch": arch, "quantize": Q4} for arch in ARCHS},
    "llama-bf16": {"arch": "llama", "dtype": "bfloat16"},
    "llama-sharded": {"arch": "llama", "shards": 3},
    "llama-mixed-quant": {"arch": "llama", "quantize": Q4, "quant_overrides": True},
    "llama-rope-llama3": {"arch": "llama", "rope_scaling": LLAMA3_ROPE},
    "llama-bos": {"arch": "llama", "add_bos": True},
}


def _numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def _tolerance(kwargs: dict) -> dict:
    if kwargs.get("dtype", "float32") == "float32":
        # Quantized models run the same quantized matmuls, so they get the float32 bound.
        return {"atol": 1e-4, "rtol": 1e-4}
    return {"atol": 5e-2, "rtol": 2e-2}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_model):
    """(path, mlx_dist model, mlx_dist tokenizer, tolerance) for one model of CASES."""
    kwargs = dict(CASES[request.param])
    path = tiny_model(**kwargs)
    model, tok = mlx_dist.load(str(path))
    return path, model, tok, _tolerance(kwargs)


def test_config(case):
    path, model, _, _ = case
    assert model.config == json.loads((path / "config.json").read_text())


def test_encode_matches_mlx_lm(case):
    path, _, tok, _ = case
    _, ref_tok = mlx_lm_load(path)
    assert tok.encode(PROMPT) == ref_tok.encode(PROMPT)
    assert sorted(tok.eos_token_ids) == sorted(ref_tok.eos_token_ids)


def test_logits_match_mlx_lm(case):
    path, model, tok, tol = case
    ids = tok.encode(PROMPT)
    logits = model(ids)
    assert isinstance(logits, mx.array)
    expected = mlx_lm_logits(path, ids)
    assert logits.shape == (1, *expected.shape)
    np.testing.assert_allclose(_numpy(logits)[0], expected, **tol)


def test_greedy_tokens_match_mlx_lm(case):
    path, model, tok, _ = case
    ids = tok.encode(PROMPT)
    responses = list(mlx_dist.stream_generate(model, tok, ids, max_tokens=32))
    expected = mlx_lm_stream(path, ids, 32)
    assert [r.token for r in responses] == [r.token for r in expected]
    assert "".join(r.text for r in responses) == "".join(r.text for r in expected)
    assert [r.generation_tokens for r in responses] == [r.generation_tokens for r in expected]
    assert [r.finish_reason for r in responses] == [r.finish_reason for r in expected]
    assert all(r.prompt_tokens == len(ids) for r in responses)
    assert responses[0].logprobs.shape == expected[0].logprobs.shape
    np.testing.assert_allclose(
        _numpy(responses[0].logprobs).reshape(-1),
        _numpy(expected[0].logprobs).reshape(-1),
        atol=1e-3,
        rtol=1e-3,
    )


def test_generate_ids_matches_mlx_lm(case):
    path, model, tok, _ = case
    ids = tok.encode(PROMPT)
    text = mlx_dist.generate(model, tok, ids, max_tokens=32)
    assert isinstance(text, str)
    assert text == mlx_lm_generate(path, ids, 32)


def test_generate_string_matches_mlx_lm(case):
    path, model, tok, _ = case
    assert mlx_dist.generate(model, tok, TEXT_PROMPT, max_tokens=16) == mlx_lm_generate(
        path, TEXT_PROMPT, 16
    )


def test_chat_prompt_matches_mlx_lm(case):
    # The templated prompt starts with the bos token of these tokenizers, so mlx-lm
    # encodes it without special tokens.
    path, model, tok, _ = case
    _, ref_tok = mlx_lm_load(path)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    assert mlx_dist.generate(model, tok, prompt, max_tokens=16) == mlx_lm_generate(path, prompt, 16)


def test_quant_overrides_model_is_mixed(tiny_model):
    """Guards the fixture: per-layer entries in config, lm_head left unquantized."""
    path = tiny_model(**CASES["llama-mixed-quant"])
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert "lm_head" not in quant
    model, _ = mlx_lm_load(path)
    assert model.model.layers[0].mlp.down_proj.bits == 8
    assert model.model.layers[1].mlp.down_proj.bits == 4
    assert not hasattr(model.lm_head, "scales")


def test_rope_scaling_changes_logits(tiny_model):
    """Guards the fixture: the llama3 scaling must matter for the test prompt."""
    plain = tiny_model(**CASES["llama"])
    scaled = tiny_model(**CASES["llama-rope-llama3"])
    _, ref_tok = mlx_lm_load(plain)
    ids = ref_tok.encode(PROMPT)
    assert np.abs(mlx_lm_logits(plain, ids) - mlx_lm_logits(scaled, ids)).max() > 1e-2


@pytest.mark.parametrize(
    "sampler_kwargs", [{"temp": 0.0}, {"temp": 1.0, "top_k": 1}], ids=["temp0", "top_k1"]
)
def test_deterministic_samplers_are_greedy(tiny_model, sampler_kwargs):
    path = tiny_model(arch="llama")
    model, tok = mlx_dist.load(str(path))
    ids = tok.encode(PROMPT)
    sampler = mlx_dist.make_sampler(**sampler_kwargs)
    tokens = [
        r.token for r in mlx_dist.stream_generate(model, tok, ids, max_tokens=16, sampler=sampler)
    ]
    assert tokens == mlx_lm_tokens(path, ids, 16)


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_stops_at_eos_from_config(tiny_model, tmp_path, where):
    """An EOS id taken from the model files ends generation like in mlx-lm."""
    src = tiny_model(arch="llama")
    _, ref_tok = mlx_lm_load(src)
    ids = ref_tok.encode(PROMPT)
    greedy = mlx_lm_tokens(src, ids, 32)
    # Promote the first token that is new at step >= 3 to an EOS id.
    stop_at = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])
    stop = greedy[stop_at]

    path = shutil.copytree(src, tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    eos = [*config["eos_token_id"], stop]
    if where == "config.json":
        config["eos_token_id"] = eos
        (path / "config.json").write_text(json.dumps(config))
    else:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    expected = mlx_lm_stream(path, ids, 32)
    assert [r.token for r in expected] == greedy[: stop_at + 1]

    model, tok = mlx_dist.load(str(path))
    assert stop in tok.eos_token_ids
    responses = list(mlx_dist.stream_generate(model, tok, ids, max_tokens=32))
    assert [r.token for r in responses] == [r.token for r in expected]
    assert responses[-1].finish_reason == "stop"
    assert mlx_dist.generate(model, tok, ids, max_tokens=32) == mlx_lm_generate(path, ids, 32)


def test_load_empty_dir(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="config.json"):
        mlx_dist.load(str(tmp_path))


@pytest.mark.parametrize("keep", ["half", "header"])
def test_load_truncated_safetensors(tiny_model, tmp_path, keep):
    path = shutil.copytree(tiny_model(arch="llama"), tmp_path / "model")
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2 if keep == "half" else 10)
    with pytest.raises((ValueError, RuntimeError), match="model.safetensors"):
        mlx_dist.load(str(path))


def test_load_unknown_model_type(tiny_model, tmp_path):
    path = shutil.copytree(tiny_model(arch="llama"), tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "nonexistent"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        mlx_dist.load(str(path))
    message = str(info.value)
    assert "nonexistent" in message
    assert "llama" in message and "qwen3" in message


def test_load_without_tokenizer(tiny_model, tmp_path):
    path = shutil.copytree(tiny_model(arch="llama"), tmp_path / "model")
    (path / "tokenizer.json").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="(?i)tokenizer"):
        mlx_dist.load(str(path))


def _hf_env(monkeypatch, tmp_path, via: str):
    """Point the Hugging Face cache into tmp_path, offline; returns the hub cache dir."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    if via == "HF_HUB_CACHE":
        cache = tmp_path / "hub-cache"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    else:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    return cache


def _fake_hf_snapshot(cache, repo_id: str, src):
    """Lay `src` out as the hub does: blobs, snapshot symlinks to them, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.mark.parametrize("via", ["HF_HUB_CACHE", "HF_HOME"])
def test_load_missing_repo(monkeypatch, tmp_path, via):
    cache = _hf_env(monkeypatch, tmp_path, via)
    with pytest.raises((OSError, ValueError, RuntimeError)) as info:
        mlx_dist.load("mlx-community/does-not-exist")
    message = str(info.value)
    assert "mlx-community/does-not-exist" in message
    assert str(cache) in message


@pytest.mark.parametrize("via", ["HF_HUB_CACHE", "HF_HOME"])
def test_load_from_hf_cache(tiny_model, monkeypatch, tmp_path, via):
    cache = _hf_env(monkeypatch, tmp_path, via)
    snapshot = _fake_hf_snapshot(cache, "org/name", tiny_model(arch="qwen3"))
    model, tok = mlx_dist.load("org/name")
    ids = tok.encode(PROMPT)
    np.testing.assert_allclose(
        _numpy(model(ids))[0], mlx_lm_logits(snapshot, ids), atol=1e-4, rtol=1e-4
    )


def test_make_tiny_model_is_reproducible(tmp_path):
    a = make_tiny_model(tmp_path / "a", "qwen2", seed=3)
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=3)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
