//! `Model`: a loaded model (or one pipeline stage of it) held by Python.
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::tokenizer::PyTokenizer;
use crate::generate::prompt_logits;
use crate::models::Model;
use crate::prefix::PrefixCache;
use crate::tokenizer::Tokenizer;
use crate::weights::{resolve, ModelSource, Weights};

#[pyclass(name = "Model", module = "mlx_dist._core", frozen)]
pub struct PyModel {
    pub inner: Arc<Model>,
    /// Caches of ended sequences, for later prompts with the same start.
    pub prefixes: Arc<Mutex<PrefixCache>>,
    source: ModelSource,
    /// How GGUF tensors became MLX weights, by GGML type.
    conversions: serde_json::Value,
}

/// Loads the model and tokenizer at a path or cached repo id. The weights
/// are read lazily; `materialize` (default) reads them now. Its prefix
/// cache keeps `prefix_cache_mb` MiB at most (default
/// `MLX_DIST_PREFIX_CACHE_MB`, else 1024; 0: off).
#[pyfunction]
#[pyo3(signature = (path_or_repo, materialize = true, prefix_cache_mb = None))]
pub fn load(
    py: Python<'_>,
    path_or_repo: String,
    materialize: bool,
    prefix_cache_mb: Option<u64>,
) -> PyResult<(PyModel, PyTokenizer)> {
    let prefix_bytes = prefix_cache_mb
        .map_or_else(crate::config::prefix_cache_bytes_from_env, |mb| {
            mb.saturating_mul(1 << 20)
        });
    py.detach(|| -> crate::Result<(PyModel, PyTokenizer)> {
        let source = resolve(&path_or_repo)?;
        let weights = Weights::open(&source)?;
        let model = Model::load(&weights, None)?;
        let tokenizer = Tokenizer::for_model(&weights)?;
        if materialize {
            model.materialize()?;
        }
        let conversions = crate::weights::conversion_summary(&weights.conversions());
        Ok((
            PyModel {
                inner: Arc::new(model),
                prefixes: Arc::new(Mutex::new(PrefixCache::new(prefix_bytes))),
                source,
                conversions,
            },
            PyTokenizer { inner: tokenizer },
        ))
    })
    .map_err(Into::into)
}

/// Writes the model at `path_or_repo` in the MLX/Hugging Face layout
/// (config.json, model.safetensors, tokenizer files) into `out_dir`.
#[pyfunction]
pub fn convert(py: Python<'_>, path_or_repo: String, out_dir: std::path::PathBuf) -> PyResult<()> {
    py.detach(|| -> crate::Result<()> {
        let source = resolve(&path_or_repo)?;
        let weights = Weights::open(&source)?;
        crate::weights::save_mlx_layout(&weights, &out_dir)?;
        Tokenizer::for_model(&weights)?.save(&out_dir)
    })
    .map_err(Into::into)
}

#[pymethods]
impl PyModel {
    /// config.json (or its GGUF equivalent), as a dict.
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(super::json_to_py(py, &self.inner.config)?.unbind())
    }

    /// Bytes of KV cache kept from ended sequences for later prompts
    /// (`load`'s `prefix_cache_mb` bounds it).
    #[getter]
    fn prefix_cache_bytes(&self) -> u64 {
        crate::util::lock(&self.prefixes).bytes()
    }

    /// Prefixes kept from ended sequences.
    #[getter]
    fn prefix_cache_entries(&self) -> usize {
        crate::util::lock(&self.prefixes).len()
    }

    /// The most bytes kept prefixes may hold (`MLX_DIST_PREFIX_CACHE_MB` at
    /// load; 0: off).
    #[getter]
    fn prefix_cache_budget(&self) -> u64 {
        crate::util::lock(&self.prefixes).budget()
    }

    /// For a GGUF model, how its quantized tensors became MLX affine
    /// weights, by GGML type: tensors, bits, group size, whether every
    /// weight is exactly llama.cpp's, and the largest error (absolute, and
    /// relative to the largest weight). Empty for safetensors.
    #[getter]
    fn weight_conversions(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(super::json_to_py(py, &self.conversions)?.unbind())
    }

    #[getter]
    fn model_type(&self) -> String {
        self.inner.args.model_type.clone()
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.args.num_hidden_layers
    }

    #[getter]
    fn vocab_size(&self) -> i32 {
        self.inner.args.vocab_size
    }

    /// The longest sequence the model was trained for, when its config says.
    #[getter]
    fn context_length(&self) -> Option<i64> {
        self.inner.args.max_position_embeddings
    }

    /// Where the model was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.source.path().display().to_string()
    }

    /// Bytes of weights held.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// Logits of a full forward pass over `ids` without a cache, as
    /// (float32 bytes, shape).
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyBytes>, Vec<i32>)> {
        if ids.is_empty() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "no token ids given",
            ));
        }
        let vocab = self.inner.args.vocab_size as u32;
        if let Some(t) = ids.iter().find(|&&t| t >= vocab) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "token {t} is outside the vocabulary of {vocab}"
            )));
        }
        let model = self.inner.clone();
        let (bytes, shape) = py.detach(move || -> crate::Result<(Vec<u8>, Vec<i32>)> {
            let l = prompt_logits(&model, &ids)?;
            Ok((l.to_bytes()?, l.shape()))
        })?;
        Ok((PyBytes::new(py, &bytes), shape))
    }
}
