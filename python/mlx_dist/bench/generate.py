"""``mlx-dist bench``: prompt and decode tokens/s of mlx-dist and of mlx-lm
on the same model, measured alternately in one run, and their ratio."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
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


def _run_mlx_dist(model, tok, ids, gen):
    import mlx_dist

    last = None
    for last in mlx_dist.stream_generate(model, tok, ids, max_tokens=gen):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def _run_mlx_lm(model, tok, ids, gen):
    import mlx_lm

    last = None
    for last in mlx_lm.stream_generate(model, tok, mx.array(ids), max_tokens=gen):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def main(args) -> int:
    import mlx_dist

    with tempfile.TemporaryDirectory() as tmp:
        if args.random_shape:
            print(
                f"making a random {args.random_shape} model ({args.dtype}, {args.bits or 'no'} quantization bits) ...",
                flush=True,
            )
            path = str(
                make_random_model(args.random_shape, args.bits, Path(tmp) / "model", args.dtype)
            )
        elif args.model:
            path = args.model
        else:
            from mlx_dist.demo import demo_model_path

            gguf = demo_model_path()
            path = str(Path(tmp) / "demo")
            mlx_dist._core.convert(str(gguf), path)
        print(f"device: {mx.default_device()}, model: {path}", flush=True)
        d_model, d_tok = mlx_dist.load(path)
        try:
            import mlx_lm
        except ImportError:
            mlx_lm = None
            print("mlx-lm is not installed: measuring mlx-dist alone")
        if mlx_lm is not None:
            l_model, l_tok = mlx_lm.load(path)
            # Generation must not stop early on a random model's EOS.
            l_tok._eos_token_ids = set()
        vocab = d_model.config["vocab_size"]
        ids = [(i * 7919) % (vocab - 1) + 1 for i in range(args.prompt_tokens)]
        runs: dict[str, list] = {"mlx-dist": [], "mlx-lm": []}
        # One warm-up each, then alternate so both see the same machine state.
        _run_mlx_dist(d_model, d_tok, ids[:16], 4)
        if mlx_lm is not None:
            _run_mlx_lm(l_model, l_tok, ids[:16], 4)
        for _ in range(args.repeats):
            runs["mlx-dist"].append(_run_mlx_dist(d_model, d_tok, ids, args.gen_tokens))
            if mlx_lm is not None:
                runs["mlx-lm"].append(_run_mlx_lm(l_model, l_tok, ids, args.gen_tokens))
            time.sleep(0.1)
        print(
            f"prompt {args.prompt_tokens} tokens, generate {args.gen_tokens}, {args.repeats} runs (median)"
        )
        med = {}
        for name, rs in runs.items():
            if not rs:
                continue
            p = statistics.median(r[0] for r in rs)
            g = statistics.median(r[1] for r in rs)
            n = min(r[2] for r in rs)
            med[name] = (p, g)
            print(f"{name:9s} prompt {p:10.1f} tok/s   decode {g:8.1f} tok/s   ({n} tokens)")
        if len(med) == 2:
            print(
                f"ratio mlx-dist/mlx-lm: prompt {med['mlx-dist'][0] / med['mlx-lm'][0]:.3f}x, "
                f"decode {med['mlx-dist'][1] / med['mlx-lm'][1]:.3f}x"
            )
    return 0
