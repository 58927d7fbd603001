"""The `mlx-dist` command line: generate on the tiny model, errors, and convert on the demo model."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx_dist
import pytest

MESSAGES = [{"role": "user", "content": "hi"}]


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny(tiny_model):
    path = tiny_model(arch="llama")
    model, tok = mlx_dist.load(str(path))
    return path, model, tok


def test_generate_prints_completion_and_speeds(tiny):
    path, model, tok = tiny
    out = _cli("generate", "--model", path, "--prompt", "hi", "--max-tokens", 8)
    assert out.returncode == 0, out.stderr
    # The prompt goes through the chat template, as in mlx-lm's CLI.
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    responses = list(mlx_dist.stream_generate(model, tok, prompt, max_tokens=8))
    assert responses[-1].finish_reason == "length"
    assert out.stdout == "".join(r.text for r in responses) + "\n"
    assert f"Prompt: {len(prompt)} tokens, " in out.stderr
    assert "Generation: 8 tokens, " in out.stderr
    assert "tokens-per-sec" in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_raw_prompt_without_chat_template(tiny):
    path, model, tok = tiny
    prompt = "The keeper told the children"
    out = _cli(
        "generate", "--model", path, "--prompt", prompt, "--max-tokens", 6, "--ignore-chat-template"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == mlx_dist.generate(model, tok, prompt, max_tokens=6) + "\n"


def test_generate_prompt_from_stdin(tiny):
    path, model, tok = tiny
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", "generate", "--model", str(path), "--prompt", "-"]
        + ["--max-tokens", "6"],
        check=False,
        input="hi",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert out.stdout == mlx_dist.generate(model, tok, prompt, max_tokens=6) + "\n"


def test_seeded_sampling_repeats(tiny):
    path, model, tok = tiny
    args = ("generate", "--model", path, "--prompt", "hi", "--max-tokens", 16)
    first = _cli(*args, "--temp", 0.8, "--seed", 3)
    second = _cli(*args, "--temp", 0.8, "--seed", 3)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    # The same draw as the Python API with the same settings, and not the greedy text.
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    sampler = mlx_dist.make_sampler(temp=0.8)
    sampled = mlx_dist.generate(model, tok, prompt, max_tokens=16, sampler=sampler, seed=3)
    assert first.stdout == sampled + "\n"
    assert first.stdout != _cli(*args).stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--model", "{tmp}/no-such-model"),
        ("--model", "{tmp}"),
        ("--model", "{tmp}/garbage.gguf"),
        ("--model", "{tiny}", "--max-tokens", "0"),
        ("--model", "{tiny}", "--temp", "-1"),
        ("--model", "{tiny}", "--top-k", "-2"),
    ],
    ids=[
        "missing-path",
        "empty-dir",
        "bad-gguf",
        "max-tokens-0",
        "negative-temp",
        "negative-top-k",
    ],
)
def test_bad_input_is_a_one_line_error(tiny, tmp_path, args):
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file")
    args = [a.format(tmp=tmp_path, tiny=tiny[0]) for a in args]
    out = _cli("generate", "--prompt", "hi", *args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mlx-dist: error: ")
    assert out.stdout.strip() == ""


def test_missing_path_error_names_it(tmp_path):
    out = _cli("generate", "--model", tmp_path / "no-such-model", "--prompt", "hi")
    assert out.returncode != 0
    assert str(tmp_path / "no-such-model") in out.stderr


def test_convert_demo_gguf(demo_gguf, demo_mlx_dir, tmp_path):
    """The CLI writes the same files as `_core.convert` (the session's converted demo dir)."""
    out_dir = tmp_path / "converted"
    out = _cli("convert", "--model", demo_gguf, "--out", out_dir, timeout=300)
    assert out.returncode == 0, out.stderr
    assert str(out_dir) in out.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).is_file(), name
        assert (out_dir / name).stat().st_size > 0, name
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config == json.loads((demo_mlx_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).read_text() == (demo_mlx_dir / name).read_text(), name
    assert json.loads((out_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    weights = mx.load(str(out_dir / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights
    assert sorted(weights) == sorted(mx.load(str(demo_mlx_dir / "model.safetensors")))
