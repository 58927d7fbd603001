"""Tiny random models in the mlx-lm / Hugging Face layout, and mlx-lm reference outputs.

The models are built, quantized and saved with mlx-lm's own code, so their files are
exactly what `mlx_lm.convert` would write; the tokenizer is a small byte-level BPE
trained here on a built-in text.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
from pathlib import Path
from unittest import mock

import mlx.core as mx
import mlx.nn
import mlx_lm
import mlx_lm.utils as mlx_lm_utils
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# A ChatML template in the style of SmolLM2's: a default system turn when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a small helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The old lighthouse stood at the end of the harbour, and every night its keeper climbed
the narrow stairs to light the lamp. Ships passing in the dark would see the beam sweep
across the water and know that the rocks were near. In the morning the keeper wrote the
weather in a thick book: the wind from the west, a little rain, the sea calm by noon.
Children from the village liked to visit him. He told them about storms that lasted for
three days, about a whale that once followed a fishing boat into the bay, and about the
winter when the harbour froze and people walked across the ice to the island.
A good recipe for bread needs only flour, water, salt and yeast. Mix them in a large bowl,
knead the dough for ten minutes until it is smooth, then leave it to rise in a warm place.
When it has doubled in size, shape it into a loaf and bake it in a hot oven for about forty
minutes. The crust should be brown and the bottom should sound hollow when you tap it.
Computers store numbers as patterns of bits. A byte holds eight bits, which is enough for
two hundred and fifty six different values. Text is stored by giving every letter a number,
and a program that reads the numbers back can show the letters on the screen again.
Questions are how we learn. What is the capital of France? Paris is the capital of France.
How many days are there in a week? There are seven days in a week. Why is the sky blue?
Sunlight is scattered by the air, and blue light is scattered more than red light.
The garden was quiet in the early summer. Bees moved between the flowers, a cat slept in
the shade of the apple tree, and somewhere a radio was playing an old song about the sea.
She opened the window, made a cup of tea, and sat down to read the letter again.
1 2 3 4 5 6 7 8 9 10 11 12; 100, 250, 1000. "Hello," he said. 'Yes!' (maybe) - ok?
"""


@functools.cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; training is deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tok.to_str()


def _token_ids() -> dict[str, int]:
    vocab = json.loads(_tokenizer_json())["model"]["vocab"]
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    assert sorted(ids.values()) == list(range(len(SPECIAL_TOKENS)))
    return ids


def tokenizer_size() -> int:
    """Number of tokens of the tiny tokenizer (specials included)."""
    return len(json.loads(_tokenizer_json())["model"]["vocab"])


def _write_tokenizer(path: Path, add_bos: bool, special_tokens_map: bool) -> None:
    tok_json = json.loads(_tokenizer_json())
    if add_bos:
        # Prepend <|im_start|> like a Llama-3 style post-processor prepends its BOS.
        bos_id = _token_ids()[IM_START]
        tok_json["post_processor"] = {
            "type": "Sequence",
            "processors": [
                tok_json["post_processor"],
                {
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": IM_START, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                    "pair": [
                        {"SpecialToken": {"id": IM_START, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": IM_START, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {
                        IM_START: {"id": IM_START, "ids": [bos_id], "tokens": [IM_START]}
                    },
                },
            ],
        }
    (path / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=2))

    ids = _token_ids()
    special = {
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": IM_END,
        "unk_token": ENDOFTEXT,
        "additional_special_tokens": [IM_START, IM_END],
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if special_tokens_map:
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _config(arch: str, vocab_size: int, rope_scaling: dict | None, num_layers: int | None) -> dict:
    ids = _token_ids()
    config = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": ids[IM_START],
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[IM_END],
    }
    if arch == "llama":
        config |= {
            "architectures": ["LlamaForCausalLM"],
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": rope_scaling,
        }
    elif arch == "mistral":
        # mlx-lm runs mistral through its llama module.
        config |= {
            "architectures": ["MistralForCausalLM"],
            "num_hidden_layers": 3,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        }
    elif arch == "qwen2":
        # mlx-lm's qwen2 always has q/k/v biases, whatever the config says.
        config |= {
            "architectures": ["Qwen2ForCausalLM"],
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        }
    elif arch == "qwen3":
        # head_dim differs from hidden_size / num_attention_heads, as in the real models.
        config |= {
            "architectures": ["Qwen3ForCausalLM"],
            "num_hidden_layers": 3,
            "head_dim": 32,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "attention_bias": False,
        }
    elif arch == "phi3":
        config |= {
            "architectures": ["Phi3ForCausalLM"],
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "rope_scaling": None,
        }
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if rope_scaling is not None and arch != "llama":
        raise ValueError("rope_scaling is only wired up for llama")
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    return config


def _init_weights(model: mlx.nn.Module, n_tokens: int, tied: bool) -> None:
    """Replace mlx-lm's init with one that gives varied, context-dependent greedy output."""
    # A tied embedding is also the output head: smaller, so the logits are not too peaked.
    embed_scale = 0.25 if tied else 1.0
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * mx.random.normal(w.shape)
        elif name.endswith(".bias"):
            w = 0.1 * mx.random.normal(w.shape)
        elif "embed_tokens" in name:
            w = embed_scale * mx.random.normal(w.shape)
        else:
            w = mx.random.normal(w.shape) * (1.5 / math.sqrt(w.shape[-1]))
        if "embed_tokens" in name or "lm_head" in name:
            # Padding rows past the tokenizer stay zero, like untrained rows of real
            # checkpoints, so greedy decoding never picks an id the tokenizer lacks;
            # smaller special-token rows make early EOS rarer.
            w[n_tokens:] = 0.0
            w[: len(SPECIAL_TOKENS)] *= 0.5  # the trainer gives the specials the first ids
        weights[name] = w
    model.update(tree_unflatten(list(weights.items())))


def _override_predicate(num_layers: int):
    """Mixed precision in mlx-lm's format: per-path dicts; unquantized layers get no scales."""

    def predicate(path: str, module: mlx.nn.Module):
        if path == "lm_head":
            return False
        if path.startswith("model.layers.0.mlp."):
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        if path == f"model.layers.{num_layers - 1}.self_attn.v_proj":
            return {"group_size": 64, "bits": 6, "mode": "affine"}
        return True

    return predicate


def _split_shards(n: int):
    def make_shards(weights: dict, max_file_size_gb: int = 0) -> list:
        keys = list(weights)
        bounds = [round(i * len(keys) / n) for i in range(n + 1)]
        return [{k: weights[k] for k in keys[a:b]} for a, b in itertools.pairwise(bounds)]

    return make_shards


def make_tiny_model(
    path: str | Path,
    arch: str,
    *,
    quantize: dict | None = None,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    quant_overrides: bool = False,
    rope_scaling: dict | None = None,
    add_bos: bool = False,
    special_tokens_map: bool = True,
    num_layers: int | None = None,
    config_overrides: dict | None = None,
) -> Path:
    """Write a tiny random `arch` model to `path` and return the path.

    quantize: mlx-lm affine quantization parameters, e.g. {"group_size": 32, "bits": 4}.
    quant_overrides: with quantize, layer 0's MLP at 8 bits, the last layer's v_proj at
        6 bits / group 64, and lm_head left unquantized (needs an untied arch, e.g. llama).
    shards: number of safetensors files; mlx-lm writes model.safetensors.index.json always.
    rope_scaling: llama only, copied into config.json (e.g. a llama3 scaling dict).
    add_bos: the tokenizer prepends <|im_start|> (the bos_token) when encoding.
    num_layers: overrides the architecture's small default layer count.
    config_overrides: other config.json sizes, e.g. a wider hidden_size.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tokens = tokenizer_size()
    config = _config(
        arch, vocab_size=-(-n_tokens // 64) * 64, rope_scaling=rope_scaling, num_layers=num_layers
    )
    config |= config_overrides or {}
    config["torch_dtype"] = dtype

    model_class, args_class = mlx_lm_utils._get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    _init_weights(model, n_tokens, config["tie_word_embeddings"])
    model.set_dtype(getattr(mx, dtype))

    if quantize is not None:
        predicate = _override_predicate(config["num_hidden_layers"]) if quant_overrides else None
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = mlx_lm_utils.quantize_model(
                model,
                config,
                quantize["group_size"],
                quantize["bits"],
                mode=quantize.get("mode", "affine"),
                quant_predicate=predicate,
            )
    elif quant_overrides:
        raise ValueError("quant_overrides needs quantize")

    mx.eval(model.parameters())
    with mock.patch.object(mlx_lm_utils, "make_shards", _split_shards(shards)):
        mlx_lm_utils.save_model(path, model)
    mlx_lm_utils.save_config(config, path / "config.json")
    _write_tokenizer(path, add_bos, special_tokens_map)
    return path


@functools.lru_cache(maxsize=8)
def _mlx_lm_load(path: str):
    return mlx_lm.load(path)


def mlx_lm_load(path: str | Path):
    """mlx-lm's (model, tokenizer) for `path`, loaded once per process."""
    return _mlx_lm_load(str(path))


def mlx_lm_logits(path: str | Path, prompt_ids: list[int]) -> np.ndarray:
    """mlx-lm's float32 logits [L, vocab] for the whole prompt, without a cache."""
    model, _ = mlx_lm_load(path)
    logits = model(mx.array(prompt_ids)[None])
    return np.array(logits[0].astype(mx.float32))


def mlx_lm_stream(path: str | Path, prompt: str | list[int], max_tokens: int, **kwargs) -> list:
    """All of mlx-lm's stream_generate responses (greedy unless a sampler is passed)."""
    model, tokenizer = mlx_lm_load(path)
    return list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs))


def mlx_lm_tokens(path: str | Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from mlx-lm's stream_generate; on EOS the last one is the EOS id."""
    return [r.token for r in mlx_lm_stream(path, prompt_ids, max_tokens)]


def mlx_lm_generate(path: str | Path, prompt: str | list[int], max_tokens: int) -> str:
    """Greedy text from mlx-lm's generate."""
    model, tokenizer = mlx_lm_load(path)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)
