"""GGUF models read lazily and kept quantized, against llama.cpp's own dequantization.

Every file here is written by `gguf_models.make_gguf_model` with the `gguf` package
llama.cpp publishes; the reference is the same model in the mlx-lm layout holding the
weights `gguf.quants.dequantize` gives, run by mlx-lm.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx_dist
import mlx_lm
import numpy as np
import pytest
from cluster_utils import start_workers
from gguf import GGMLQuantizationType as T
from gguf_models import make_gguf_model
from mlx_dist import _core
from tiny_models import mlx_lm_logits, mlx_lm_tokens

EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K]
APPROXIMATE = {T.Q2_K: 4, T.Q3_K: 5, T.Q6_K: 8, T.IQ4_NL: 6, T.IQ4_XS: 6}
PROMPT = [5, 17, 33, 80, 121, 7, 250, 64]


def cycling(types, embed=T.F32):
    """Each matrix gets the next type of `types` in name order; the embedding `embed`
    (a float32 matrix makes the file's scales float32)."""
    order = {}

    def pick(name, shape):
        if "embed_tokens" in name:
            return embed
        return types[order.setdefault(name, len(order)) % len(types)]

    return pick


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array([PROMPT])))[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_exact_types_give_the_references_logits_and_tokens(arch, tmp_path):
    path, ref = make_gguf_model(tmp_path, arch, cycling(EXACT))
    model, _ = mlx_dist.load(str(path))
    np.testing.assert_allclose(_logits(model), mlx_lm_logits(ref, PROMPT), atol=1e-4, rtol=1e-4)
    got = [r.token for r in mlx_dist.stream_generate(model, _tok(path), PROMPT, max_tokens=12)]
    assert got == mlx_lm_tokens(ref, PROMPT, 12)
    report = model.weight_conversions
    assert {t.name for t in EXACT} <= set(report), report
    assert all(r["exact"] and r["max_error"] == 0 for r in report.values()), report
    assert report["Q5_K"]["bits"] == 5 and report["Q8_0"]["bits"] == 8


def _tok(path):
    return mlx_dist.load(str(path), lazy=True)[1]


def test_approximate_types_are_requantized_within_half_a_step(tmp_path):
    path, ref = make_gguf_model(tmp_path, "llama", cycling(list(APPROXIMATE)))
    model, _ = mlx_dist.load(str(path))
    report = model.weight_conversions
    for ty, bits in APPROXIMATE.items():
        r = report[ty.name]
        assert (r["bits"], r["group_size"], r["exact"]) == (bits, 32, False), (ty, r)
        assert 0 < r["max_relative_error"] < 0.5 / (2**bits - 1) * 2, (ty, r)
    # Each weight lies within half a step of its group's range at the new width:
    # checked on the MLX-layout copy, dequantized by MLX, against llama.cpp's weights.
    out = tmp_path / "mlx"
    _core.convert(str(path), str(out))
    got = mx.load(str(out / "model.safetensors"))
    want = mx.load(str(ref / "model.safetensors"))
    config = mlx_dist.load(str(path), lazy=True)[0].config
    checked = 0
    for name in want:
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" not in got:
            continue
        q = config["quantization"].get(stem, config["quantization"])
        w = mx.dequantize(
            got[name],
            got[f"{stem}.scales"],
            got[f"{stem}.biases"],
            group_size=q["group_size"],
            bits=q["bits"],
        )
        ref_w = np.array(want[name]).reshape(w.shape[0], -1, 32)
        step = (ref_w.max(-1) - ref_w.min(-1)) / (2 ** q["bits"] - 1)
        err = np.abs(np.array(w).reshape(ref_w.shape) - ref_w).max(-1)
        assert (err <= step / 2 * 1.001 + 1e-7).all(), name
        checked += 1
    assert checked >= 10
    # The model stays close to the reference: stated bound 5% of the largest logit.
    want_logits = mlx_lm_logits(ref, PROMPT)
    assert np.abs(_logits(model) - want_logits).max() < 0.05 * np.abs(want_logits).max()


def test_half_precision_scales_when_the_file_has_no_float32_matrix(tmp_path):
    path, ref = make_gguf_model(tmp_path, "qwen3", cycling(EXACT, embed=T.Q8_0))
    model, _ = mlx_dist.load(str(path))
    report = model.weight_conversions
    # Scales d, d*8, d*16, d*128 and Q4_1's minimum are exact in float16; the
    # K-quants' d*sc products are rounded, by at most half a float16 ulp.
    for ty in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        assert report[ty.name]["exact"], report
    for ty in (T.Q4_K, T.Q5_K):
        assert 0 < report[ty.name]["max_relative_error"] < 2**-10, report
    out = tmp_path / "mlx"
    _core.convert(str(path), str(out))
    scales = [a for k, a in mx.load(str(out / "model.safetensors")).items() if k.endswith("scales")]
    assert scales and all(a.dtype == mx.float16 for a in scales)
    np.testing.assert_allclose(_logits(model), mlx_lm_logits(ref, PROMPT), atol=2e-2, rtol=2e-2)


def test_a_mixed_file_becomes_per_layer_overrides_mlx_lm_reads(tmp_path):
    # Q4_K_M's pattern: most matrices Q4_K, the down projections and head Q6_K.
    def q4_k_m(name, shape):
        if "embed_tokens" in name:
            return T.F32
        return T.Q6_K if "down_proj" in name or "lm_head" in name else T.Q4_K

    path, _ = make_gguf_model(tmp_path, "llama", q4_k_m)
    model, _ = mlx_dist.load(str(path))
    q = model.config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    assert q["lm_head"] == {"group_size": 32, "bits": 8}
    assert "model.layers.0.mlp.up_proj" not in q
    out = tmp_path / "mlx"
    _core.convert(str(path), str(out))
    reference, _ = mlx_lm.load(str(out))
    np.testing.assert_allclose(
        _logits(model), np.array(reference(mx.array([PROMPT]))[0]), atol=1e-4, rtol=1e-4
    )


def test_quantized_weights_take_their_quantized_size_in_memory(tmp_path):
    path, _ = make_gguf_model(tmp_path, "llama", cycling([T.Q4_K]), num_layers=4)
    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = mlx_dist.load(str(path))
    used = mx.get_active_memory() - before
    n_weights = sum(np.prod(s) for s in _matrix_shapes(model.config))
    # 4 bits per weight plus a float32 scale and bias per 32 weights; the
    # float32 embedding and norms on top.
    quantized = n_weights * (4 + 64 / 32) / 8
    embed = model.config["vocab_size"] * model.config["hidden_size"] * 4
    assert model.nbytes < (quantized + embed) * 1.05
    assert used < (quantized + embed) * 1.2
    assert used < (n_weights * 2 + embed) * 0.5  # far from float16's size
    del model


def _matrix_shapes(c):
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    return layer * n + [(c["vocab_size"], h)]  # lm_head


def test_a_type_with_no_conversion_is_an_error_naming_the_tensor_and_type(tmp_path):
    def pick(name, shape):
        return T.TQ2_0 if name == "model.layers.1.mlp.up_proj.weight" else T.F32

    path, _ = make_gguf_model(tmp_path, "llama", pick)
    with pytest.raises(ValueError) as e:
        mlx_dist.load(str(path))
    assert "blk.1.ffn_up.weight" in str(e.value) and "TQ2_0" in str(e.value), e.value


def test_mlx_reads_the_same_weights_from_the_file(tmp_path):
    """MLX's own (eager) GGUF reader as a second reference for the types it keeps
    quantized: its dequantized matrices equal ours."""
    path, _ = make_gguf_model(tmp_path, "qwen3", cycling([T.Q4_0, T.Q4_1, T.Q8_0], embed=T.Q8_0))
    theirs = mx.load(str(path))
    out = tmp_path / "mlx"
    _core.convert(str(path), str(out))
    ours = mx.load(str(out / "model.safetensors"))
    pairs = {
        "model.layers.0.self_attn.q_proj": "blk.0.attn_q",
        "model.layers.1.mlp.down_proj": "blk.1.ffn_down",
        "model.embed_tokens": "token_embd",
    }
    for hf, gg in pairs.items():

        def deq(t, p):
            w, s, b = t[f"{p}.weight"], t[f"{p}.scales"], t[f"{p}.biases"]
            return mx.dequantize(w, s, b, group_size=32, bits=w.shape[-1] // s.shape[-1])

        np.testing.assert_array_equal(np.array(deq(ours, hf)), np.array(deq(theirs, gg)))


def _rchar(pid: int) -> int:
    """Bytes the process has read through read(2)/pread(2) so far (Linux /proc)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["rchar"])


@pytest.mark.parametrize("layout", ["gguf", "safetensors"])
def test_a_worker_reads_only_its_own_layers(layout, tmp_path):
    path, ref = make_gguf_model(tmp_path / "m", "llama", lambda n, s: T.F32, num_layers=9)
    source = path if layout == "gguf" else ref
    files = [path] if layout == "gguf" else list(ref.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    config = mlx_dist.load(str(ref), lazy=True)[0].config
    matrix = config["vocab_size"] * config["hidden_size"] * 4  # the embedding, or the head
    procs = start_workers(3, tmp_path)
    try:
        before = [_rchar(p.proc.pid) for p in procs]
        mine = _rchar(os.getpid())
        model, _ = mlx_dist.load(
            str(source), workers=[p.address for p in procs], strategy="uniform"
        )
        planned = _rchar(os.getpid()) - mine
        stages = model.plan_dict["stages"]
        assert [s["layers"]["end"] - s["layers"]["start"] for s in stages] == [3, 3, 3], stages
        read = [_rchar(p.proc.pid) - b for p, b in zip(procs, before)]
        print(f"{layout}: file {size} bytes; workers read {read}; coordinator {planned}")
        # A third of the layers: at most 40% of the file, plus the embedding or head it holds.
        assert read[0] <= 0.4 * size + matrix, (read, size)
        assert read[1] <= 0.4 * size, (read, size)
        assert read[2] <= 0.4 * size + matrix, (read, size)
        assert min(read) >= 0.25 * size, (read, size)  # it did read its layers
        # The coordinator plans from the header alone: the header, and the first
        # MiB the model's id hashes, whatever the model's size.
        assert planned < 2 << 20, (planned, size)
        got = [r.token for r in mlx_dist.stream_generate(model, _tok(source), PROMPT, max_tokens=6)]
        assert got == mlx_lm_tokens(ref, PROMPT, 6)
    finally:
        for p in procs:
            p.stop()
