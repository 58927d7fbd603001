//! Finding a model and reading its weights: MLX/Hugging Face directories
//! (one or many safetensors files), GGUF files, and repo ids resolved from
//! the local Hugging Face cache. Safetensors tensors are loaded lazily: a
//! tensor is read from disk only when something evaluates it, so a process
//! that runs a few layers never reads the others.
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::mlx::io::{load_gguf, load_safetensors, GgufValue};
use crate::mlx::Array;

/// Affine quantization parameters of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quant {
    pub group_size: i32,
    pub bits: i32,
}

/// Where a model's files are.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A directory with config.json and safetensors.
    Directory(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Directory(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// The Hugging Face hub cache folder, as `huggingface_hub` computes it.
pub fn hf_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && !s.starts_with('.')
        && !s.contains('\\')
}

/// Resolves a path or a Hugging Face repo id to model files, without any
/// network access.
pub fn resolve(path_or_repo: &str) -> Result<ModelSource> {
    let p = Path::new(path_or_repo);
    if p.is_file() {
        if p.extension().is_some_and(|e| e == "gguf") {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        return Err(Error::InvalidArgument(format!(
            "{path_or_repo} is a file but not a .gguf model; give a model directory, a .gguf file or a repo id"
        )));
    }
    if p.is_dir() {
        return dir_source(p);
    }
    if looks_like_repo_id(path_or_repo) {
        return resolve_hf_cache(path_or_repo, &hf_cache_dir());
    }
    Err(Error::NotFound(format!(
        "no model at {path_or_repo}: not a directory, not a .gguf file, and not a Hugging Face repo id (org/name)"
    )))
}

fn dir_source(dir: &Path) -> Result<ModelSource> {
    if dir.join("config.json").is_file() {
        return Ok(ModelSource::Directory(dir.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(ModelSource::Gguf(one.clone())),
        [] => Err(Error::NotFound(format!(
            "{} has no config.json (and no .gguf file): not a model directory",
            dir.display()
        ))),
        _ => Err(Error::InvalidArgument(format!(
            "{} holds several .gguf files; name one of them",
            dir.display()
        ))),
    }
}

/// Finds `org/name` in a hub cache: `models--org--name/snapshots/<rev>`,
/// the revision named by `refs/main` when present.
pub fn resolve_hf_cache(repo: &str, cache: &Path) -> Result<ModelSource> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let missing = || {
        Error::NotFound(format!(
            "model {repo:?} is not in the Hugging Face cache at {} (looked for {}); \
             download it there first, e.g. `huggingface-cli download {repo}`, or pass a local path",
            cache.display(),
            folder.display()
        ))
    };
    let snapshots = folder.join("snapshots");
    let rev = fs::read_to_string(folder.join("refs/main"))
        .ok()
        .map(|s| s.trim().to_string());
    let snapshot = match rev {
        Some(r) if snapshots.join(&r).is_dir() => snapshots.join(r),
        _ => {
            let mut all: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&snapshots)
                .map_err(|_| missing())?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| {
                    (
                        e.metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH),
                        e.path(),
                    )
                })
                .collect();
            all.sort();
            all.pop().ok_or_else(missing)?.1
        }
    };
    dir_source(&snapshot).map_err(|_| missing())
}

/// Checks a safetensors file against its header before MLX reads it, so a
/// truncated or corrupt file is a clear error rather than a failure deep in
/// evaluation.
fn check_safetensors(path: &Path) -> Result<()> {
    let bad = |msg: String| Error::invalid_model(path, msg);
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("file is shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(bad(format!(
            "header of {n} bytes does not fit in a file of {len} bytes (truncated?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let header: Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
    let mut end = 0u64;
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let offs = info.get("data_offsets").and_then(Value::as_array);
        let e = offs.and_then(|o| o.get(1)).and_then(Value::as_u64);
        end = end.max(e.ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?);
    }
    let need = 8 + n + end;
    if len < need {
        return Err(bad(format!(
            "file is truncated: {len} bytes, but its header describes {need}"
        )));
    }
    Ok(())
}

/// A model's tensors by name, and what is needed to interpret them.
pub struct Weights {
    tensors: HashMap<String, Array>,
    /// `config.json` (or the equivalent built from GGUF metadata).
    pub config: Value,
    /// GGUF metadata, for the tokenizer.
    pub gguf_meta: Option<HashMap<String, GgufValue>>,
    pub source: ModelSource,
}

impl Weights {
    pub fn open(source: &ModelSource) -> Result<Weights> {
        match source {
            ModelSource::Directory(dir) => Self::open_dir(dir),
            ModelSource::Gguf(file) => Self::open_gguf(file),
        }
    }

    fn open_dir(dir: &Path) -> Result<Weights> {
        let config_path = dir.join("config.json");
        let text = fs::read_to_string(&config_path)
            .map_err(|e| Error::NotFound(format!("cannot read {}: {e}", config_path.display())))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid_model(&config_path, format!("invalid JSON: {e}")))?;
        if !config.is_object() {
            return Err(Error::invalid_model(
                &config_path,
                "config.json is not a JSON object",
            ));
        }
        let mut files: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        // With an index, exactly the files it names (others may be leftovers).
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let idx: Value = serde_json::from_str(&fs::read_to_string(&index)?)
                .map_err(|e| Error::invalid_model(&index, format!("invalid JSON: {e}")))?;
            let map = idx
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::invalid_model(&index, "no weight_map"))?;
            let mut named: Vec<PathBuf> = map
                .values()
                .filter_map(Value::as_str)
                .map(|f| dir.join(f))
                .collect();
            named.sort();
            named.dedup();
            if let Some(m) = named.iter().find(|f| !f.is_file()) {
                return Err(Error::invalid_model(
                    dir,
                    format!("the index names {} which is missing", m.display()),
                ));
            }
            files = named;
        }
        if files.is_empty() {
            return Err(Error::invalid_model(dir, "no *.safetensors weight files"));
        }
        let mut tensors = HashMap::new();
        for f in &files {
            check_safetensors(f)?;
            let (t, _) = load_safetensors(f).map_err(|e| Error::invalid_model(f, e.to_string()))?;
            tensors.extend(t);
        }
        Ok(Weights {
            tensors,
            config,
            gguf_meta: None,
            source: ModelSource::Directory(dir.to_path_buf()),
        })
    }

    fn open_gguf(file: &Path) -> Result<Weights> {
        let (raw, meta) = load_gguf(file).map_err(|e| Error::invalid_model(file, e.to_string()))?;
        let config = gguf_config(file, &meta, &raw)?;
        let tensors = gguf_to_hf(&config, raw)?;
        Ok(Weights {
            tensors,
            config,
            gguf_meta: Some(meta),
            source: ModelSource::Gguf(file.to_path_buf()),
        })
    }

    /// An error about this model.
    pub fn invalid(&self, msg: impl Into<String>) -> Error {
        Error::invalid_model(self.source.path(), msg)
    }

    /// The tensor `name`; missing is an error naming it.
    pub fn get(&self, name: &str) -> Result<Array> {
        self.try_get(name)
            .ok_or_else(|| self.invalid(format!("missing weight {name}")))
    }

    pub fn try_get(&self, name: &str) -> Option<Array> {
        self.tensors.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
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

    /// Every tensor, for saving in the MLX layout.
    pub fn tensors(&self) -> &HashMap<String, Array> {
        &self.tensors
    }
}

/// Writes the model in the MLX/Hugging Face layout (config.json and
/// model.safetensors), e.g. to turn a GGUF file into a directory mlx-lm reads.
pub fn save_mlx_layout(weights: &Weights, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut names: Vec<&String> = weights.tensors.keys().collect();
    names.sort();
    let arrays: Vec<(&str, &Array)> = names
        .iter()
        .map(|n| (n.as_str(), &weights.tensors[*n]))
        .collect();
    crate::mlx::io::save_safetensors(&dir.join("model.safetensors"), &arrays)?;
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

fn meta_num(meta: &HashMap<String, GgufValue>, key: &str) -> Option<f64> {
    match meta.get(key)? {
        GgufValue::Array(a) if a.size() == 1 => a.item::<f32>().ok().map(|v| v as f64),
        _ => None,
    }
}

fn meta_str<'a>(meta: &'a HashMap<String, GgufValue>, key: &str) -> Option<&'a str> {
    match meta.get(key)? {
        GgufValue::String(s) => Some(s),
        _ => None,
    }
}

/// The GGUF architectures mlx-dist reads, and the `model_type` each becomes.
const GGUF_ARCHS: [(&str, &str); 3] = [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")];

/// A config.json equivalent from GGUF metadata.
fn gguf_config(
    file: &Path,
    meta: &HashMap<String, GgufValue>,
    tensors: &HashMap<String, Array>,
) -> Result<Value> {
    let arch = meta_str(meta, "general.architecture").unwrap_or("");
    let model_type = GGUF_ARCHS
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, t)| *t)
        .ok_or_else(|| Error::UnsupportedArchitecture {
            model_type: format!("gguf:{arch}"),
            supported: GGUF_ARCHS
                .iter()
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let need = |k: &str| {
        meta_num(meta, &format!("{arch}.{k}"))
            .ok_or_else(|| Error::invalid_model(file, format!("GGUF metadata lacks {arch}.{k}")))
    };
    let hidden = need("embedding_length")? as i64;
    let heads = need("attention.head_count")? as i64;
    let vocab = match meta.get("tokenizer.ggml.tokens") {
        Some(GgufValue::Strings(t)) => t.len() as i64,
        _ => tensors
            .get("token_embd.weight")
            .map(|w| w.dim(0) as i64)
            .unwrap_or(0),
    };
    let mut c = json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count")? as i64,
        "intermediate_size": need("feed_forward_length")? as i64,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_num(meta, &format!("{arch}.attention.head_count_kv")).map_or(heads, |v| v as i64),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon")?,
        "rope_theta": meta_num(meta, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
        "vocab_size": vocab,
        "tie_word_embeddings": !tensors.contains_key("output.weight"),
    });
    if let Some(ctx) = meta_num(meta, &format!("{arch}.context_length")) {
        c["max_position_embeddings"] = json!(ctx as i64);
    }
    if let Some(hd) = meta_num(meta, &format!("{arch}.attention.key_length")) {
        c["head_dim"] = json!(hd as i64);
    }
    if let Some(GgufValue::Array(eos)) = meta.get("tokenizer.ggml.eos_token_id") {
        c["eos_token_id"] = json!(eos.item::<u32>()?);
    }
    // Quantized GGUF tensors come as MLX affine triples; record the packing
    // so the MLX-layout copy of this model loads in mlx-lm too.
    if let Some(s) = tensors.get("blk.0.attn_q.scales") {
        let w = &tensors["blk.0.attn_q.weight"];
        let group = hidden as i32 / s.dim(-1);
        let bits = w.dim(-1) * 32 / hidden as i32;
        c["quantization"] = json!({"group_size": group, "bits": bits});
    }
    Ok(c)
}

/// Renames GGUF tensors to Hugging Face names and undoes llama.cpp's
/// permutation of the llama q/k projections (rows reordered for
/// interleaved rope), so the model runs with standard rope like mlx-lm.
fn gguf_to_hf(config: &Value, raw: HashMap<String, Array>) -> Result<HashMap<String, Array>> {
    let llama = config["model_type"] == "llama";
    let heads = config["num_attention_heads"].as_i64().unwrap_or(1) as i32;
    let kv_heads = config["num_key_value_heads"].as_i64().unwrap_or(1) as i32;
    let mut out = HashMap::new();
    for (name, a) in raw {
        let (stem, suffix) = match name.rsplit_once('.') {
            Some(p) => p,
            None => continue,
        };
        let hf_stem = match stem {
            "token_embd" => "model.embed_tokens".to_string(),
            "output_norm" => "model.norm".to_string(),
            "output" => "lm_head".to_string(),
            _ => {
                let Some(rest) = stem.strip_prefix("blk.") else {
                    continue;
                };
                let Some((layer, part)) = rest.split_once('.') else {
                    continue;
                };
                let part = match part {
                    "attn_q" => "self_attn.q_proj",
                    "attn_k" => "self_attn.k_proj",
                    "attn_v" => "self_attn.v_proj",
                    "attn_output" => "self_attn.o_proj",
                    "attn_q_norm" => "self_attn.q_norm",
                    "attn_k_norm" => "self_attn.k_norm",
                    "ffn_gate" => "mlp.gate_proj",
                    "ffn_up" => "mlp.up_proj",
                    "ffn_down" => "mlp.down_proj",
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    _ => continue,
                };
                format!("model.layers.{layer}.{part}")
            }
        };
        let a = if llama && (hf_stem.ends_with("q_proj") || hf_stem.ends_with("k_proj")) {
            let h = if hf_stem.ends_with("q_proj") {
                heads
            } else {
                kv_heads
            };
            unpermute_rows(&a, h)?
        } else {
            a
        };
        out.insert(format!("{hf_stem}.{suffix}"), a);
    }
    Ok(out)
}

/// Inverse of llama.cpp's `reshape(n_head, 2, d/2, ...).swapaxes(1, 2)` on
/// the rows of a projection (and of its quantization scales and biases).
fn unpermute_rows(a: &Array, n_head: i32) -> Result<Array> {
    let shape = a.shape();
    let rows = shape[0];
    let mut split = vec![n_head, rows / n_head / 2, 2];
    split.extend_from_slice(&shape[1..]);
    a.reshape(&split)?.swapaxes(1, 2)?.reshape(&shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_resolve_from_the_cache_or_fail_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_hf_cache("org/model", tmp.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/model") && err.contains(&tmp.path().display().to_string()),
            "{err}"
        );

        let snap = tmp.path().join("models--org--model/snapshots/abc123");
        fs::create_dir_all(&snap).unwrap();
        fs::write(snap.join("config.json"), "{}").unwrap();
        fs::create_dir_all(tmp.path().join("models--org--model/refs")).unwrap();
        fs::write(tmp.path().join("models--org--model/refs/main"), "abc123\n").unwrap();
        assert_eq!(
            resolve_hf_cache("org/model", tmp.path()).unwrap(),
            ModelSource::Directory(snap)
        );
    }

    #[test]
    fn truncated_safetensors_are_rejected_with_the_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("w.safetensors");
        let a = Array::from_slice(&[1.0f32; 64], &[8, 8]).unwrap();
        crate::mlx::io::save_safetensors(&f, &[("a", &a)]).unwrap();
        check_safetensors(&f).unwrap();
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
        let err = check_safetensors(&f).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        fs::write(&f, &bytes[..4]).unwrap();
        assert!(check_safetensors(&f).is_err());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // rows 0..8 for 2 heads: llama.cpp order interleaves the two halves.
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let a = Array::from_slice(&hf, &[8, 1]).unwrap();
        let permuted = a
            .reshape(&[2, 2, 2, 1])
            .unwrap()
            .swapaxes(1, 2)
            .unwrap()
            .reshape(&[8, 1])
            .unwrap();
        let back = unpermute_rows(&permuted, 2)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(back, hf);
    }
}
