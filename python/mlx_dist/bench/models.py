"""The models benches run: random-weight ones of public models' shapes
(``--random-shape``), written in the mlx-lm layout, else ``--model``, else
the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

# Shapes of public models, for random-weight benchmarks.
SHAPES = {
    "tiny": {
        "model_type": "qwen3",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 768,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "vocab_size": 4096,
    },
    "qwen3-1.7b": {
        "model_type": "qwen3",
        "hidden_size": 2048,
        "num_hidden_layers": 28,
        "intermediate_size": 6144,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}


def _word_level_tokenizer(vocab_size: int) -> dict:
    # A tokenizer.json whose tokens are t0..tN, joined by spaces: text of
    # ids encodes back to the same ids (the servers' benchmark sends text).
    vocab = {f"t{i}": i for i in range(vocab_size)}
    return {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }


def make_random_model(shape: str, bits: int | None, path: Path, dtype: str = "bfloat16") -> Path:
    """Writes a random-weight model of a known shape in the mlx-lm layout."""
    from mlx_lm.utils import _get_classes, save_config, save_model

    from mlx import nn

    config = dict(
        SHAPES[shape],
        rms_norm_eps=1e-6,
        rope_theta=SHAPES[shape].get("rope_theta", 1e6),
        max_position_embeddings=40960,
        tie_word_embeddings=SHAPES[shape].get("tie_word_embeddings", True),
        # No EOS: both engines must generate every requested token.
        eos_token_id=[],
    )
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # Small weights keep activations finite through many random layers; a
    # fixed seed makes the same model every time.
    mx.random.seed(0)
    model.update(
        nn.utils.tree_map(
            lambda p: (mx.random.normal(p.shape) * 0.02).astype(getattr(mx, dtype)),
            model.parameters(),
        )
    )
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
        config["quantization_config"] = config["quantization"]
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    (path / "tokenizer.json").write_text(json.dumps(_word_level_tokenizer(config["vocab_size"])))
    # The generic class: transformers would otherwise pick one by model type.
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return path


def model_path(args, tmp: Path) -> str:
    """The model a bench runs: a random one of `--random-shape` made in
    `tmp`, else `--model`, else the demo model."""
    if args.random_shape:
        print(f"making a random {args.random_shape} model ...", flush=True)
        return str(make_random_model(args.random_shape, args.bits, tmp / "m", args.dtype))
    if args.model:
        return args.model
    from mlx_dist.demo import demo_model_path

    return str(demo_model_path())
