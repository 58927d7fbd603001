//! Tokenization, chat templates and streaming detokenization.
//!
//! The reference is mlx-lm on transformers 5: a fast tokenizer built from
//! `tokenizer.json`, chat templates rendered by Jinja with HF's globals, and
//! mlx-lm's streaming detokenizers. GGUF files carry no `tokenizer.json`, so
//! one is built from their `tokenizer.ggml.*` metadata, the way llama.cpp reads it.
//!
//! [`Tokenizer`] is defined here with encoding and decoding; each way in or out has its file:
//! - `hf`: a Hugging Face model directory (`Tokenizer::from_dir`, `Tokenizer::save`);
//! - `gguf`: a `tokenizer.json` from GGUF metadata (`Tokenizer::from_gguf`);
//! - `template`: chat templates (`Tokenizer::apply_chat_template`);
//! - `pyfmt`: Python's printing, `json.dumps` and `strftime`, as templates expect them;
//! - `detokenizer`: [`StreamingDetokenizer`], text as tokens arrive;
//! - `fixtures`: the small tokenizers the tests share.
use std::sync::Arc;

use serde_json::{json, Value};
use tokenizers::ModelWrapper;

use crate::error::Result;

mod detokenizer;
#[cfg(test)]
mod fixtures;
mod gguf;
mod hf;
mod pyfmt;
mod template;

pub use detokenizer::StreamingDetokenizer;

/// Named special tokens as `(name, text)`, e.g. `("eos_token", "</s>")`.
type SpecialTokens = Vec<(String, String)>;

/// The streaming detokenizer mlx-lm picks from the `tokenizer.json` decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DetokKind {
    /// `ByteLevel` decoder: mlx-lm's `BPEStreamingDetokenizer`.
    Bpe,
    /// SentencePiece decoder (`▁` -> space, byte fallback): `SPMStreamingDetokenizer`.
    Spm { trim_space: bool },
    /// Anything else: `NaiveStreamingDetokenizer`, which re-decodes the current line.
    Naive,
}

/// A tokenizer with its special tokens, end-of-sequence ids and chat templates.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// Named special tokens (`bos_token`, ..., and model-specific `*_token`s).
    special: SpecialTokens,
    eos_ids: Vec<u32>,
    /// `(name, source)`; a single template is named "default".
    templates: Vec<(String, String)>,
    clean_up_spaces: bool,
    detok: DetokKind,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("eos_ids", &self.eos_ids)
            .field(
                "templates",
                &self.templates.iter().map(|t| &t.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Tokenizer {
    /// The tokenizer of a model: built from its GGUF metadata, or read from
    /// its directory with the EOS ids of generation_config.json (which, as
    /// in mlx-lm, replace those of config.json).
    pub fn for_model(weights: &crate::weights::Weights) -> Result<Tokenizer> {
        if let Some(meta) = weights.gguf_meta() {
            return Tokenizer::from_gguf(meta);
        }
        let dir = weights.source.path();
        let gen = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("eos_token_id").cloned());
        Tokenizer::from_dir(dir, gen.as_ref().or(weights.config.get("eos_token_id")))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        templates: Vec<(String, String)>,
        clean_up: bool,
    ) -> Tokenizer {
        let decoder = inner
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .unwrap_or(Value::Null);
        let detok = detok_kind(&decoder);
        // transformers skips the clean-up for BPE models: it would eat real spaces.
        let clean_up_spaces = clean_up && !matches!(inner.get_model(), ModelWrapper::BPE(_));
        let eos_ids = special
            .iter()
            .find(|(k, _)| k == "eos_token")
            .and_then(|(_, t)| inner.token_to_id(t))
            .into_iter()
            .collect();
        Tokenizer {
            inner: Arc::new(inner),
            special,
            eos_ids,
            templates,
            clean_up_spaces,
            detok,
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, add_special_tokens)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.inner.decode(ids, skip_special_tokens)?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The number of ids, added tokens included (Python's `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The ids that end generation: the tokenizer's eos token first, then the model config's.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token().and_then(|t| self.token_to_id(t))
    }

    /// A named special token (`"pad_token"`, `"unk_token"`, or a model-specific `"*_token"`).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn clean_up_tokenization(text: &str) -> String {
    let pairs = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    pairs
        .iter()
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// mlx-lm's test on the `tokenizer.json` decoder.
fn detok_kind(decoder: &Value) -> DetokKind {
    let ty = |d: &Value| d.get("type").and_then(Value::as_str).map(str::to_string);
    if ty(decoder).as_deref() == Some("ByteLevel") {
        return DetokKind::Bpe;
    }
    if ty(decoder).as_deref() != Some("Sequence") {
        return DetokKind::Naive;
    }
    let parts = decoder
        .get("decoders")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let replace = json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "});
    let strip = json!({"type": "Strip", "content": " ", "start": 1, "stop": 0});
    let head = |p: &[Value]| {
        p.len() >= 3
            && p[0] == replace
            && p[1] == json!({"type": "ByteFallback"})
            && p[2] == json!({"type": "Fuse"})
    };
    match parts.len() {
        3 if head(parts) => DetokKind::Spm { trim_space: false },
        4 if head(parts) && parts[3] == strip => DetokKind::Spm { trim_space: true },
        _ => DetokKind::Naive,
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::bpe_fixture;
    use super::*;

    #[test]
    fn tokenizer_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn bpe_round_trip_and_special_tokens() {
        let (_dir, tok) = bpe_fixture();
        assert_eq!(tok.vocab_size(), 269);
        assert_eq!(tok.encode("Hello world", true).unwrap(), [259, 264]);
        assert_eq!(
            tok.encode("<|im_start|>user\né", false).unwrap(),
            [267, 117, 115, 101, 114, 10, 265]
        );
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(268));
        assert_eq!(tok.id_to_token(264).as_deref(), Some("Ġworld"));
        assert_eq!(
            (tok.bos_token(), tok.eos_token()),
            (Some("<|im_start|>"), Some("<|im_end|>"))
        );
        for text in [
            "Hello world",
            "  spaces\tand\nlines ",
            "Café naïve 你好 😀🎉",
            "",
        ] {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        let ids = tok.encode("<|im_start|>Hello<|im_end|>", true).unwrap();
        assert_eq!(ids, [267, 259, 268]);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>Hello<|im_end|>"
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), "Hello");
    }

    #[test]
    fn decoder_kinds_follow_mlx_lm() {
        assert_eq!(detok_kind(&json!({"type": "ByteLevel"})), DetokKind::Bpe);
        let spm = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        assert_eq!(detok_kind(&spm), DetokKind::Spm { trim_space: true });
        assert_eq!(detok_kind(&json!({"type": "Metaspace"})), DetokKind::Naive);
        assert_eq!(detok_kind(&Value::Null), DetokKind::Naive);
    }
}
