"""Shared fixtures: tiny random models written once per test session."""

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory `tiny_model(arch="llama", **kwargs) -> Path`, see `make_tiny_model`.

    Each distinct set of arguments is made once per session and the directory is shared,
    so a test that changes files must copy it first.
    """
    made: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True)
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF file (SmolLM2-135M-Instruct, Q4_1), fetched once into the cache."""
    from mlx_dist.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def demo_mlx_dir(demo_gguf, tmp_path_factory) -> Path:
    """The demo model converted once per session into the MLX layout by `mlx_dist._core.convert`.

    Shared by every test that needs it: copy it before changing files.
    """
    from mlx_dist import _core

    out = tmp_path_factory.mktemp("demo-mlx") / "SmolLM2-135M-Instruct"
    _core.convert(str(demo_gguf), str(out))
    return out


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character that spells each byte in the vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    rest = (b for b in range(256) if b not in chars)
    chars |= {b: chr(256 + i) for i, b in enumerate(rest)}
    return chars


@pytest.fixture(scope="session")
def cycle_model(tiny_model, tmp_path_factory):
    """Factory `cycle_model(text) -> (path, ids)`: a tiny llama whose greedy output cycles through `text`.

    `ids` are the single-byte tokens of `text`'s UTF-8 bytes (which must all differ). The attention
    and MLP outputs are zeroed, so the logits depend on the last token alone, and the embeddings and
    head are set so that `ids[i]` is followed by `ids[i + 1]` (and the last by the first): a prompt
    of `[ids[-1]]` generates `text` over and over, each multi-byte character split across tokens.
    """
    import shutil

    import mlx.core as mx

    made: dict[str, tuple[Path, list[int]]] = {}

    def make(text: str) -> tuple[Path, list[int]]:
        if text in made:
            return made[text]
        data = text.encode()
        assert len(set(data)) == len(data), "each byte may occur once"
        src = tiny_model(arch="llama")
        vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
        chars = _byte_level_chars()
        ids = [vocab[chars[b]] for b in data]

        path = Path(shutil.copytree(src, tmp_path_factory.mktemp("cycle") / "model"))
        weights = mx.load(str(path / "model.safetensors"))
        for name in weights:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weights[name] = mx.zeros_like(weights[name])
        embed = weights["model.embed_tokens.weight"]
        head = weights["lm_head.weight"]
        hidden = embed.shape[1]
        assert len(ids) <= hidden
        for i, t in enumerate(ids):
            onehot = mx.zeros((hidden,), dtype=embed.dtype)
            onehot[i] = 1.0
            embed[t] = onehot
            head[ids[(i + 1) % len(ids)]] = 10.0 * onehot
        weights["model.embed_tokens.weight"] = embed
        weights["lm_head.weight"] = head
        weights["model.norm.weight"] = mx.ones_like(weights["model.norm.weight"])
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
        made[text] = (path, ids)
        return made[text]

    return make


@pytest.fixture
def served():
    """`served(template, tail="", **settings) -> (client, state)`: the HTTP app in
    this process over a stand-in model whose chat template is `template`
    (`test_server_tools.TemplateState`), for the tool-call and API-shape tests."""
    from fastapi.testclient import TestClient
    from mlx_dist.server import create_app
    from test_server_tools import HERMES_TEMPLATE, TemplateState

    def make(template: str = HERMES_TEMPLATE, tail: str = "", **settings):
        state = TemplateState(template, tail, **settings)
        return TestClient(create_app(state.settings, state), raise_server_exceptions=False), state

    return make
