//! Finding a model and reading its weights. Tensors are read only when a
//! layer asks for them, so a process that runs a few layers never reads the
//! others: MLX reads safetensors lazily, and GGUF is read tensor by tensor.
//!
//! - `source`: where the files are (a directory, a GGUF file, a repo id).
//! - `safetensors`: MLX/Hugging Face directories.
//! - `gguf`: GGUF files, their metadata and llama.cpp's tensor names.
//! - `quants`: GGUF block quantizations as MLX affine weights.
use std::collections::HashMap;
use std::fs;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};

mod gguf;
pub mod quants;
mod safetensors;
mod source;

pub use gguf::{GgufFile, GgufValue};
pub use source::{hf_cache_dir, local_folder, resolve, resolve_hf_cache, ModelSource};

/// Affine quantization parameters of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quant {
    pub group_size: i32,
    pub bits: i32,
}

/// A tensor's shape and dtype in MLX, known before it is read.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub shape: Vec<i32>,
    pub dtype: Dtype,
}

impl TensorInfo {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product::<u64>() * self.dtype.size() as u64
    }
}

/// How one GGUF tensor became MLX affine weights.
#[derive(Clone, Debug, Serialize)]
pub struct Conversion {
    pub tensor: String,
    /// Its GGML type, e.g. "Q6_K".
    pub source: &'static str,
    pub bits: u32,
    pub group_size: u32,
    #[serde(serialize_with = "dtype_name")]
    pub scale_dtype: Dtype,
    /// The largest difference from llama.cpp's dequantized weight (0:
    /// exact), and the largest weight's magnitude.
    pub max_error: f32,
    pub max_abs: f32,
}

fn dtype_name<S: serde::Serializer>(d: &Dtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

enum Store {
    /// Safetensors, as MLX's lazy arrays.
    Arrays(HashMap<String, Array>),
    Gguf(Box<gguf::GgufTensors>),
}

/// A model's tensors by Hugging Face name, and what is needed to interpret
/// them.
pub struct Weights {
    store: Store,
    /// `config.json` (or the equivalent built from GGUF metadata).
    pub config: Value,
    pub source: ModelSource,
}

impl Weights {
    /// Opens the model's config and tensor table; no tensor is read.
    pub fn open(source: &ModelSource) -> Result<Weights> {
        let (store, config) = match source {
            ModelSource::Directory(dir) => {
                let (config, tensors) = safetensors::open_dir(dir)?;
                (Store::Arrays(tensors), config)
            }
            ModelSource::Gguf(file) => {
                let (t, config) = gguf::GgufTensors::open(file)?;
                (Store::Gguf(Box::new(t)), config)
            }
        };
        Ok(Weights {
            store,
            config,
            source: source.clone(),
        })
    }

    /// GGUF metadata, for the tokenizer.
    pub fn gguf_meta(&self) -> Option<&HashMap<String, GgufValue>> {
        match &self.store {
            Store::Gguf(t) => Some(t.meta()),
            Store::Arrays(_) => None,
        }
    }

    /// An error about this model.
    pub fn invalid(&self, msg: impl Into<String>) -> Error {
        Error::invalid_model(self.source.path(), msg)
    }

    /// The tensor `name`; missing is an error naming it.
    pub fn get(&self, name: &str) -> Result<Array> {
        self.try_get(name)?
            .ok_or_else(|| self.invalid(format!("missing weight {name}")))
    }

    /// The tensor `name` when the model has it; a tensor that exists but
    /// cannot be read or converted is an error.
    pub fn try_get(&self, name: &str) -> Result<Option<Array>> {
        match &self.store {
            Store::Arrays(t) => Ok(t.get(name).cloned()),
            Store::Gguf(t) => t.get(name),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Arrays(t) => t.contains_key(name),
            Store::Gguf(t) => t.contains(name),
        }
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.store {
            Store::Arrays(t) => t.keys().cloned().collect(),
            Store::Gguf(t) => t.names().cloned().collect(),
        };
        v.sort();
        v
    }

    /// Shape and dtype of `name`, without reading it.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        match &self.store {
            Store::Arrays(t) => t.get(name).map(|a| TensorInfo {
                shape: a.shape(),
                dtype: a.dtype(),
            }),
            Store::Gguf(t) => t.info(name),
        }
    }

    /// Every tensor's name and size, without reading any.
    pub fn infos(&self) -> Vec<(String, TensorInfo)> {
        self.names()
            .into_iter()
            .filter_map(|n| self.info(&n).map(|i| (n, i)))
            .collect()
    }

    /// How the GGUF tensors read so far were converted (none for safetensors).
    pub fn conversions(&self) -> Vec<Conversion> {
        match &self.store {
            Store::Gguf(t) => t.conversions(),
            Store::Arrays(_) => Vec::new(),
        }
    }

    /// Tensor bytes read from a GGUF file so far, and the file's size
    /// (safetensors are read by MLX: `None`).
    pub fn gguf_bytes_read(&self) -> Option<(u64, u64)> {
        match &self.store {
            Store::Gguf(t) => Some((t.bytes_read(), t.file_bytes())),
            Store::Arrays(_) => None,
        }
    }

    /// A per-layer quantization named in config.json's `quantization`
    /// (mlx-lm writes these for mixed-precision models).
    pub fn quant_override(&self, prefix: &str) -> Option<Quant> {
        let q = self.config.get("quantization")?.get(prefix)?;
        let default = self.config.get("quantization")?;
        let get = |k: &str| {
            q.get(k)
                .or_else(|| default.get(k))
                .and_then(Value::as_i64)
                .map(|v| v as i32)
        };
        Some(Quant {
            group_size: get("group_size")?,
            bits: get("bits")?,
        })
    }
}

/// Summarises conversions by source type: how many tensors, the width each
/// became, and the largest error relative to the largest weight.
pub fn conversion_summary(conversions: &[Conversion]) -> Value {
    let mut by: std::collections::BTreeMap<&str, (usize, u32, f32, f32, bool)> = Default::default();
    for c in conversions {
        let e = by.entry(c.source).or_insert((0, c.bits, 0.0, 0.0, true));
        e.0 += 1;
        e.2 = e.2.max(c.max_error);
        e.3 = e.3.max(c.max_abs);
        e.4 &= c.max_error == 0.0;
    }
    Value::Object(
        by.into_iter()
            .map(|(t, (n, bits, err, big, exact))| {
                let rel = if big > 0.0 { err / big } else { 0.0 };
                (
                    t.to_string(),
                    json!({"tensors": n, "bits": bits, "group_size": quants::GROUP,
                           "exact": exact, "max_error": err, "max_relative_error": rel}),
                )
            })
            .collect(),
    )
}

/// Writes the model in the MLX/Hugging Face layout (config.json and
/// model.safetensors), e.g. to turn a GGUF file into a directory mlx-lm reads.
pub fn save_mlx_layout(weights: &Weights, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let names = weights.names();
    let arrays = names
        .iter()
        .map(|n| Ok((n.as_str(), weights.get(n)?)))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<(&str, &Array)> = arrays.iter().map(|(n, a)| (*n, a)).collect();
    crate::mlx::io::save_safetensors(&dir.join("model.safetensors"), &refs)?;
    let mut config = weights.config.clone();
    if let Some(q) = config.get("quantization").cloned() {
        config["quantization_config"] = q;
    }
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
