//! Tokenizers for the tests: a small byte-level BPE directory, and a check of streamed text.
use std::path::Path;

use serde_json::{json, Map, Value};

use super::detokenizer::byte_of_char;
use super::{StreamingDetokenizer, Tokenizer};

pub(super) const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The GPT-2 byte alphabet: the character that spells byte `b`.
pub(super) fn char_of_byte(b: u8) -> char {
    (0..=0x143u32)
        .filter_map(char::from_u32)
        .find(|&c| byte_of_char(c) == Some(b))
        .unwrap()
}

/// A small byte-level BPE tokenizer directory: every byte, a few merges, ChatML specials.
pub(super) fn write_bpe_fixture(dir: &Path, config: Value) {
    let mut vocab = Map::new();
    for b in 0..=255u8 {
        vocab.insert(char_of_byte(b).to_string(), json!(b));
    }
    let merges = [
        ("H", "e"),
        ("l", "l"),
        ("He", "ll"),
        ("Hell", "o"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("Ġwor", "l"),
        ("Ġworl", "d"),
        ("Ã", "©"),
    ];
    for (a, b) in merges {
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), json!(id));
    }
    let n = vocab.len();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            vocab.insert(t.to_string(), json!(n + i));
            json!({"id": n + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": level, "post_processor": level, "decoder": level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

pub(super) fn bpe_fixture() -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "bos_token": "<|im_start|>", "chat_template": CHATML, "clean_up_tokenization_spaces": false,
        "eos_token": {"content": "<|im_end|>", "special": true}, "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
    });
    write_bpe_fixture(dir.path(), config);
    let tok = Tokenizer::from_dir(dir.path(), Some(&json!([268, 3, 268]))).unwrap();
    (dir, tok)
}

/// Runs tokens through the streaming detokenizer; checks every segment is whole text.
pub(super) fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut detok = StreamingDetokenizer::new(tok);
    let mut segments = Vec::new();
    for &id in ids {
        detok.add_token(id);
        segments.push(detok.last_segment());
    }
    detok.finalize();
    segments.push(detok.last_segment());
    assert_eq!(detok.tokens(), ids);
    assert_eq!(detok.text(), segments.concat());
    for s in &segments {
        assert!(
            !s.contains('\u{FFFD}'),
            "segment {s:?} holds a broken character"
        );
    }
    segments
}
