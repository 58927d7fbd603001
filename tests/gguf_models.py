"""Tiny random GGUF models, written with llama.cpp's own `gguf` package, and their
references: the same model in the mlx-lm layout holding exactly the weights that
`gguf.quants.dequantize` (llama.cpp's dequantization, ported) gives for each tensor.

Tensor names come from `gguf`'s own name map and the llama q/k rows are permuted as
llama.cpp's convert script does, so nothing here shares code with the reader under test.
Types the package can quantize (Q4_0 ... Q8_0, BF16) are quantized from the random
weights; K-quants and IQ4 it cannot write, so their blocks are random bytes with
small finite scales, which are valid blocks of those formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from tiny_models import CHAT_TEMPLATE, _token_ids, _tokenizer_json, make_tiny_model

GGUF_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}

# Rows long enough for 256-weight super-blocks: every matrix's input size is 256 or 512.
SIZES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}

# Where each format keeps its float16 scales: (offset, weight of the scale).
_SCALE_FIELDS = {
    T.Q2_K: [(80, 1.0), (82, 0.5)],
    T.Q3_K: [(108, 1.0)],
    T.Q4_K: [(0, 1.0), (2, 7.0)],
    T.Q5_K: [(0, 0.5), (2, 7.0)],
    T.Q6_K: [(208, 1.0)],
    T.IQ4_NL: [(0, 1.0)],
    T.IQ4_XS: [(0, 1.0)],
}
# A typical |weight| of one scale unit, so weights come out near 1/sqrt(cols).
_UNIT = {
    T.Q2_K: 8.0,
    T.Q3_K: 96.0,
    T.Q4_K: 240.0,
    T.Q5_K: 480.0,
    T.Q6_K: 1000.0,
    T.IQ4_NL: 60.0,
    T.IQ4_XS: 2000.0,
}


_QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16)


def _random_blocks(rng, ty: T, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    target = 1.5 / np.sqrt(cols)
    for at, w in _SCALE_FIELDS[ty]:
        d = (target / _UNIT[ty] * w * rng.uniform(0.5, 1.5, size=raw.shape[:2])).astype(np.float16)
        raw[:, :, at : at + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script's reordering of the llama q/k rows."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _encode(rng, w: np.ndarray, ty: T) -> tuple[np.ndarray, np.ndarray]:
    """(what the file holds, the weights llama.cpp reads back from it)."""
    if ty == T.F32:
        return w, w
    if ty == T.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    if ty in _SCALE_FIELDS:
        raw = _random_blocks(rng, ty, *w.shape)
    elif ty in _QUANTIZABLE:
        raw = gguf.quants.quantize(w, ty)
    else:
        # A type mlx-dist refuses: random bytes, and no reference weights.
        block, size = gguf.GGML_QUANT_SIZES[ty]
        raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
        return raw, np.zeros_like(w)
    return raw, gguf.quants.dequantize(raw, ty).astype(np.float32).reshape(w.shape)


def _write_tokenizer(writer: gguf.GGUFWriter) -> None:
    tok = json.loads(_tokenizer_json())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = _token_ids()
    special = set(ids.values())
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_bos_token_id(ids["<|im_start|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_chat_template(CHAT_TEMPLATE)


def make_gguf_model(
    tmp: Path,
    arch: str,
    types,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    sizes: dict | None = None,
) -> tuple[Path, Path]:
    """Writes `arch` as `tmp/model.gguf` and its reference as `tmp/reference` (mlx-lm
    layout, float32). `types(hf_name, shape)` picks each matrix's GGML type; vectors
    (norms, biases) stay F32. Returns (gguf file, reference directory)."""
    tmp = Path(tmp)
    ref = make_tiny_model(
        tmp / "reference", arch, seed=seed, num_layers=num_layers, config_overrides=sizes or SIZES
    )
    config = json.loads((ref / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(ref / "model.safetensors")).items()}
    rng = np.random.default_rng(seed)
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], n_layers)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    path = tmp / "model.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    writer.add_block_count(n_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "phi3":
        writer.add_rope_dimension_count(config["hidden_size"] // heads)
    _write_tokenizer(writer)

    reference = {}
    for name, w in sorted(weights.items()):
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname, name
        ty = types(name, w.shape) if w.ndim == 2 else T.F32
        permute = arch == "llama" and (".q_proj." in name or ".k_proj." in name)
        h = heads if ".q_proj." in name else kv_heads
        src = _permute(w, h) if permute else w
        raw, back = _encode(rng, src.astype(np.float32), ty)
        reference[name] = mx.array(_unpermute(back, h) if permute else back)
        if ty in (T.F32, T.F16):
            writer.add_tensor(gname, raw)
        else:
            writer.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=ty)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # The reference holds exactly llama.cpp's dequantized weights.
    for f in ref.glob("model*.safetensors*"):
        f.unlink()
    mx.save_safetensors(str(ref / "model.safetensors"), reference)
    return path, ref
