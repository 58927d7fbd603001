"""mlx_dist's tokenizer against Hugging Face transformers and mlx-lm: encoding, decoding,
chat templates and streaming detokenization, on the tiny model and on the demo model's
tokenizer built from its GGUF metadata."""

import json
import shutil

import mlx_dist
import pytest
from tiny_models import IM_END, IM_START, mlx_lm_stream
from transformers import AutoTokenizer, PreTrainedTokenizerFast

STRINGS = [
    "Hello, world!",
    "café naïve résumé Ångström Ünïcödé",
    "日本語のテキスト、中文，한국어",
    "emoji 😀👍🏽 🇫🇷 family 👨‍👩‍👧 ✨",
    "  lots   of\t\tspaces \n\n\n end  ",
    " leading space",
    "1234567890 3.14159 -42 1e10 2024-01-31",
    f"{IM_START}user\nhi{IM_END}\n",
    f"text{IM_END}more<|endoftext|>{IM_START}",
    "almost special <|im_start| and <im_end|>",
    "def f(x):\n    return x**2  # square",
    "I'm sure it's, like, \"quoted\" (maybe)?!",
    "a\u00a0b\u200bc\r\nd\x00e",
    " ",
    "",
]

MESSAGES = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system-user": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue. 😀"},
        {"role": "user", "content": "And grass, café?"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ],
}

# The SmolLM2-Instruct ChatML rendering, with its default system turn.
SMOLLM2_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# Ids of SmolLM2's own tokenizer (digits split one by one, byte-level BPE).
SMOLLM2_IDS = {
    "Hello world": [19556, 905],
    "The year 2024 had 366 days.": [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30],
    "<|im_start|>user\nHi<|im_end|>\n": [1, 4093, 198, 26843, 2, 198],
}


def _hf_chat_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(out)


@pytest.fixture(scope="module", params=["plain", "bos"])
def tiny(request, tiny_model):
    """(path, mlx_dist tokenizer, HF tokenizer) for the tiny llama; "bos" prepends a BOS."""
    path = tiny_model(arch="llama", add_bos=request.param == "bos")
    _, tok = mlx_dist.load(str(path))
    return path, tok, AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", STRINGS)
def test_encode_matches_hf(tiny, text, add_special_tokens):
    _, tok, hf = tiny
    assert tok.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
        text, add_special_tokens=add_special_tokens
    )


def test_bos_is_added_only_when_asked(tiny_model):
    _, tok = mlx_dist.load(str(tiny_model(arch="llama", add_bos=True)))
    bos = tok.convert_tokens_to_ids(IM_START)
    with_bos = tok.encode("Hello", add_special_tokens=True)
    assert with_bos[0] == bos
    assert with_bos[1:] == tok.encode("Hello", add_special_tokens=False)


@pytest.mark.parametrize("text", STRINGS)
def test_decode_round_trip(tiny, text):
    _, tok, hf = tiny
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_skips_special_tokens(tiny):
    _, tok, _ = tiny
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(MESSAGES))
def test_chat_template_matches_hf(tiny, name, add_generation_prompt):
    _, tok, hf = tiny
    messages = MESSAGES[name]
    text = tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert isinstance(text, str)
    assert text == hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text.endswith(f"{IM_START}assistant\n") == add_generation_prompt
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == _hf_chat_ids(hf, messages, add_generation_prompt)
    assert tok.decode(ids) == text


def _without_chat_template(src, dst):
    path = shutil.copytree(src, dst)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("tokenize", [True, False])
def test_missing_chat_template_is_a_clear_error(tiny_model, tmp_path, tokenize):
    path = _without_chat_template(tiny_model(arch="llama"), tmp_path / "model")
    _, tok = mlx_dist.load(str(path))
    assert not tok.has_chat_template
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES["user"], tokenize=tokenize)
    # Encoding still works without a template.
    assert tok.encode("hi") == AutoTokenizer.from_pretrained(str(path)).encode("hi")


def _assert_no_new_replacement_chars(ours, theirs):
    """No chunk of ours holds U+FFFD unless mlx-lm's chunk at that step does too."""
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert "\ufffd" not in a or "\ufffd" in b, (step, a, b)


@pytest.mark.parametrize(
    "prompt", ["The keeper told the children a story about the sea.", "café 中文 😀"]
)
def test_streamed_text_matches_mlx_lm(tiny_model, prompt):
    path = tiny_model(arch="llama")
    model, tok = mlx_dist.load(str(path))
    ours = [r.text for r in mlx_dist.stream_generate(model, tok, prompt, max_tokens=48)]
    theirs = [r.text for r in mlx_lm_stream(path, prompt, 48)]
    assert "".join(ours) == "".join(theirs)
    _assert_no_new_replacement_chars(ours, theirs)


CYCLE_TEXT = "é中😀a"


def test_streamed_multibyte_characters_split_across_tokens(cycle_model):
    path, ids = cycle_model(CYCLE_TEXT)
    model, tok = mlx_dist.load(str(path))
    n = 3 * len(ids)
    responses = list(mlx_dist.stream_generate(model, tok, [ids[-1]], max_tokens=n))
    # Guards the fixture: one token per UTF-8 byte.
    assert [r.token for r in responses] == ids * 3
    chunks = [r.text for r in responses]
    assert "".join(chunks) == CYCLE_TEXT * 3
    assert not any("\ufffd" in c for c in chunks)
    # A character shows up whole, at the token that completes it.
    assert chunks[: len(ids)] == ["", "é", "", "", "中", "", "", "", "😀", "a"]
    assert chunks == [r.text for r in mlx_lm_stream(path, [ids[-1]], n)]


@pytest.mark.parametrize("n", [1, 3, 4, 7, 11])
def test_stream_ending_inside_a_character_matches_mlx_lm(cycle_model, n):
    """max_tokens cuts a character in two: the last chunk is what mlx-lm shows."""
    path, ids = cycle_model(CYCLE_TEXT)
    model, tok = mlx_dist.load(str(path))
    ours = [r.text for r in mlx_dist.stream_generate(model, tok, [ids[-1]], max_tokens=n)]
    theirs = [r.text for r in mlx_lm_stream(path, [ids[-1]], n)]
    assert "".join(ours) == "".join(theirs)
    _assert_no_new_replacement_chars(ours, theirs)


@pytest.fixture(scope="module")
def demo_tokenizers(demo_gguf, demo_mlx_dir):
    """(mlx_dist tokenizer from the GGUF file, transformers on the converted tokenizer.json)."""
    _, tok = mlx_dist.load(str(demo_gguf), lazy=True)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(demo_mlx_dir / "tokenizer.json"))
    return tok, hf


DEMO_STRINGS = [
    *STRINGS,
    "What is the capital of France?",
    "The year 2024 had 366 days.",
    "I'm can't we'll they've",
    "https://example.com/a?b=c&d=e",
]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_demo_tokenizer_matches_hf(demo_tokenizers, add_special_tokens):
    tok, hf = demo_tokenizers
    for text in DEMO_STRINGS:
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf.encode(text, add_special_tokens=add_special_tokens), text
        assert tok.decode(ids) == hf.decode(ids) == text


def test_demo_tokenizer_known_ids(demo_tokenizers):
    tok, _ = demo_tokenizers
    for text, ids in SMOLLM2_IDS.items():
        assert tok.encode(text) == ids, text
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token) == (IM_START, IM_END)
    assert tok.eos_token_ids == [tok.convert_tokens_to_ids(IM_END)]


def test_demo_chat_template_is_smollm2_chatml(demo_tokenizers, demo_mlx_dir):
    tok, _ = demo_tokenizers
    messages = MESSAGES["user"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == SMOLLM2_CHAT
    hf = AutoTokenizer.from_pretrained(str(demo_mlx_dir))
    for name, msgs in MESSAGES.items():
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert ours == hf.apply_chat_template(
                msgs, add_generation_prompt=gen, tokenize=False
            ), name
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == _hf_chat_ids(
                hf, msgs, gen
            )
