//! `Tokenizer`: encoding, decoding and chat templates for Python.
use std::path::PathBuf;

use pyo3::prelude::*;
use serde_json::Value;

use crate::error::Error;
use crate::tokenizer::Tokenizer;

#[pyclass(name = "Tokenizer", module = "mlx_dist._core", frozen)]
pub struct PyTokenizer {
    pub inner: Tokenizer,
}

fn parse_json(what: &str, text: Option<&str>) -> PyResult<Option<Value>> {
    text.map(|t| {
        serde_json::from_str(t)
            .map_err(|e| Error::InvalidArgument(format!("{what} is not valid JSON: {e}")).into())
    })
    .transpose()
}

#[pymethods]
impl PyTokenizer {
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.inner.encode(&text, add_special_tokens))?)
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        Ok(py.detach(|| self.inner.decode(&ids, skip_special_tokens))?)
    }

    /// Renders the chat template; messages, tools and extra variables come
    /// as JSON text.
    #[pyo3(signature = (messages_json, add_generation_prompt = true, tools_json = None, extra_json = None))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages_json: &str,
        add_generation_prompt: bool,
        tools_json: Option<&str>,
        extra_json: Option<&str>,
    ) -> PyResult<String> {
        let messages = parse_json("messages", Some(messages_json))?.unwrap();
        let tools = parse_json("tools", tools_json)?;
        let extra = parse_json("extra", extra_json)?;
        let extra = match extra {
            Some(Value::Object(m)) => Some(m),
            None => None,
            Some(_) => {
                return Err(Error::InvalidArgument(
                    "extra template variables must be a mapping".into(),
                )
                .into())
            }
        };
        // A long conversation takes milliseconds: other threads run meanwhile.
        Ok(py.detach(|| {
            self.inner.apply_chat_template(
                &messages,
                add_generation_prompt,
                tools.as_ref(),
                extra.as_ref(),
            )
        })?)
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids().to_vec()
    }

    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.inner.bos_token().map(str::to_string)
    }

    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.inner.eos_token().map(str::to_string)
    }

    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(str::to_string)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir`.
    fn save(&self, dir: PathBuf) -> PyResult<()> {
        Ok(self.inner.save(&dir)?)
    }
}
