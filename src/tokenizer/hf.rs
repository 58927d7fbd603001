//! A Hugging Face model directory, read as transformers 5 reads it: `tokenizer.json`, then the
//! special tokens and chat templates of `tokenizer_config.json` and the files beside it.
use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::AddedToken;

use super::{SpecialTokens, Tokenizer};
use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::fixtures::{bpe_fixture, write_bpe_fixture};

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
}
