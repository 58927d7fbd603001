//! mlx-lm's streaming detokenizers: text as tokens arrive, never cut inside a character.
use super::{DetokKind, Tokenizer};

/// The byte a GPT-2 byte-level character stands for.
pub(super) fn byte_of_char(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff => Some(c as u8),
        // The other 68 bytes are spelled from U+0100 on, in byte order.
        0x100..=0x120 => Some((c - 0x100) as u8),
        0x121..=0x142 => Some((c - 0x121 + 0x7f) as u8),
        0x143 => Some(0xad),
        _ => None,
    }
}

/// The bytes of byte-level token text the way mlx-lm's streaming detokenizer
/// reads it: a character standing for byte 0 (or for none) stays as its own
/// UTF-8 while streaming, and becomes its byte only when `flushing`.
fn streamed_bytes(text: &str, flushing: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match byte_of_char(c) {
            Some(b) if b != 0 || flushing => out.push(b),
            _ => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// A SentencePiece token's bytes: `<0xNN>` is one byte, `▁` a space.
fn spm_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

enum DetokState {
    Bpe {
        /// Token text (byte-level characters) not yet shown.
        unflushed: String,
    },
    Spm {
        unflushed: Vec<u8>,
        trim_space: bool,
    },
    Naive {
        current: Vec<u32>,
        current_text: String,
        clean_spaces: bool,
    },
}

/// Incremental detokenizer: add ids one at a time; `last_segment()` returns the new text since the previous call
/// and never returns a string ending in a broken UTF-8 sequence (partial byte tokens are held back until complete);
/// `finalize()` flushes what remains. Decoding all tokens at once must equal the concatenation of segments.
///
/// It follows the detokenizer mlx-lm picks for the tokenizer, so the visible text is mlx-lm's: the
/// byte-level and SentencePiece ones drop one leading space of the whole text (a completion of
/// "The capital is" reads "Paris", not " Paris"), and special tokens are kept.
pub struct StreamingDetokenizer {
    tokenizer: Tokenizer,
    tokens: Vec<u32>,
    text: String,
    offset: usize,
    state: DetokState,
}

impl StreamingDetokenizer {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let state = match tokenizer.detok {
            DetokKind::Bpe => DetokState::Bpe {
                unflushed: String::new(),
            },
            DetokKind::Spm { trim_space } => DetokState::Spm {
                unflushed: Vec::new(),
                trim_space,
            },
            DetokKind::Naive => {
                // mlx-lm holds a trailing space back when decoding removes the space before ",".
                let probe = tokenizer
                    .encode("a ,b", false)
                    .and_then(|ids| tokenizer.decode(&ids, false));
                let clean_spaces = probe.is_ok_and(|t| !t.contains(" ,"));
                DetokState::Naive {
                    current: Vec::new(),
                    current_text: String::new(),
                    clean_spaces,
                }
            }
        };
        StreamingDetokenizer {
            tokenizer: tokenizer.clone(),
            tokens: Vec::new(),
            text: String::new(),
            offset: 0,
            state,
        }
    }

    pub fn add_token(&mut self, id: u32) {
        self.tokens.push(id);
        let token = self.tokenizer.id_to_token(id);
        match &mut self.state {
            DetokState::Bpe { unflushed } => {
                // Ids past the vocabulary (padded embeddings) show as "!", as in mlx-lm.
                let token = token.unwrap_or_else(|| "!".to_string());
                unflushed.push_str(&token);
                let bytes = streamed_bytes(unflushed, false);
                let text = String::from_utf8_lossy(&bytes);
                // Wait for the rest of a character, and keep a lone space for the next token.
                let lone_space = token.chars().count() == 1
                    && token.chars().next().and_then(byte_of_char) == Some(b' ');
                if !text.ends_with('\u{FFFD}') && !lone_space {
                    let text = text.into_owned();
                    push_trimmed(&mut self.text, &text);
                    unflushed.clear();
                }
            }
            DetokState::Spm {
                unflushed,
                trim_space,
            } => {
                let Some(token) = token else { return };
                unflushed.extend(spm_bytes(&token));
                let trim = *trim_space;
                flush_spm(&mut self.text, unflushed, trim, false);
            }
            DetokState::Naive {
                current,
                current_text,
                clean_spaces,
            } => {
                current.push(id);
                let decoded = self.tokenizer.decode(current, false).unwrap_or_default();
                let mut shown = decoded.trim_end_matches('\u{FFFD}').to_string();
                if shown.len() == decoded.len() && *clean_spaces && shown.ends_with(' ') {
                    shown.pop();
                }
                // A finished line is never decoded again.
                if decoded.ends_with('\n') {
                    self.text.push_str(&decoded);
                    current.clear();
                    current_text.clear();
                } else {
                    *current_text = shown;
                }
            }
        }
    }

    /// The text added since the last call.
    pub fn last_segment(&mut self) -> String {
        // Only the naive detokenizer has text that may still change; the
        // others append, so the new part is sliced without copying it all.
        if let DetokState::Naive { .. } = self.state {
            let text = self.text();
            let segment = text.get(self.offset..).unwrap_or_default().to_string();
            self.offset = text.len();
            return segment;
        }
        let segment = self.text.get(self.offset..).unwrap_or_default().to_string();
        self.offset = self.text.len();
        segment
    }

    /// Flushes what was held back.
    pub fn finalize(&mut self) {
        match &mut self.state {
            DetokState::Bpe { unflushed } => {
                let text = String::from_utf8_lossy(&streamed_bytes(unflushed, true)).into_owned();
                push_trimmed(&mut self.text, &text);
                unflushed.clear();
            }
            DetokState::Spm {
                unflushed,
                trim_space,
            } => {
                let trim = *trim_space;
                flush_spm(&mut self.text, unflushed, trim, true);
            }
            DetokState::Naive {
                current,
                current_text,
                ..
            } => {
                self.text
                    .push_str(&self.tokenizer.decode(current, false).unwrap_or_default());
                current.clear();
                current_text.clear();
            }
        }
    }

    /// All the text so far.
    pub fn text(&self) -> String {
        match &self.state {
            DetokState::Naive { current_text, .. } => format!("{}{current_text}", self.text),
            _ => self.text.clone(),
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Appends `chunk`, without its leading space when nothing was shown yet (mlx-lm's BPE detokenizer).
fn push_trimmed(text: &mut String, chunk: &str) {
    let chunk = if text.is_empty() {
        chunk.strip_prefix(' ').unwrap_or(chunk)
    } else {
        chunk
    };
    text.push_str(chunk);
}

fn flush_spm(text: &mut String, unflushed: &mut Vec<u8>, trim_space: bool, force: bool) {
    let chunk = String::from_utf8_lossy(unflushed);
    if !force && chunk.ends_with('\u{FFFD}') {
        return;
    }
    let chunk = if text.is_empty() && trim_space {
        chunk.strip_prefix(' ').unwrap_or(&chunk)
    } else {
        &chunk
    };
    text.push_str(chunk);
    unflushed.clear();
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::tokenizer::fixtures::{bpe_fixture, stream};

    #[test]
    fn streaming_bpe_holds_back_partial_characters() {
        let (_dir, tok) = bpe_fixture();
        let text = "Hello world 你好😀é!\nHello";
        let ids = tok.encode(text, false).unwrap();
        let segments = stream(&tok, &ids);
        assert_eq!(segments.concat(), tok.decode(&ids, false).unwrap());
        assert_eq!(segments.concat(), text);
        // mlx-lm's segments for the same ids: a lone space waits for the next token, and
        // 你 (three one-byte tokens) shows only when complete.
        let mlx_lm = [
            "Hello", " world", "", "", "", " 你", "", "", "好", "", "", "", "😀", "é", "!", "\n",
            "Hello", "",
        ];
        assert_eq!(segments, mlx_lm);
        // Like mlx-lm, a leading space of the whole text is dropped.
        let ids = tok.encode(" world", false).unwrap();
        assert_eq!(stream(&tok, &ids).concat(), "world");
    }

    #[test]
    fn streaming_naive_for_other_decoders() {
        let (dir, _) = bpe_fixture();
        // A ByteLevel decoder wrapped in a Sequence is not one mlx-lm recognises: it re-decodes lines.
        let path = dir.path().join("tokenizer.json");
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["decoder"] = json!({"type": "Sequence", "decoders": [json["decoder"].take()]});
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
        assert_eq!(tok.detok, DetokKind::Naive);
        let ids = tok.encode("Hello world 你好😀é!\nHello", false).unwrap();
        let segments = stream(&tok, &ids);
        let mlx_lm = [
            "Hello", " world", " ", "", "", "你", "", "", "好", "", "", "", "😀", "é", "!", "\n",
            "Hello", "",
        ];
        assert_eq!(segments, mlx_lm);
        assert_eq!(stream(&tok, &[264]), [" world", ""]);
    }
}
