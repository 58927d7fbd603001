//! Chat templates, rendered as transformers renders them: Jinja with trim_blocks and lstrip_blocks,
//! Python's string methods, HF's globals (`raise_exception`, `strftime_now`) and `tojson` filter.
use chrono::Utc;
use minijinja::value::{Value as JValue, ValueKind};
use minijinja::ErrorKind;
use serde_json::{Map, Value};

use super::pyfmt::{py_formatter, py_repr, strftime, tojson_filter, JResult};
use super::Tokenizer;
use crate::error::{Error, Result};

impl Tokenizer {
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
}

pub(super) fn to_jinja(v: &Value) -> JValue {
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

pub(super) fn render_template(source: &str, ctx: JValue) -> Result<String> {
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
        strftime(&format, Utc::now().timestamp())
    });
    let template = env.template_from_str(&source)?;
    Ok(template.render(ctx)?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tokenizer::fixtures::{bpe_fixture, write_bpe_fixture};

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
    fn generation_blocks_render_as_plain_text() {
        let src =
            "{% for m in messages %}{%- generation -%} {{ m }} {%- endgeneration %}{% endfor %}";
        assert_eq!(
            render_template(src, to_jinja(&json!({"messages": ["a", "b"]}))).unwrap(),
            "ab"
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
}
