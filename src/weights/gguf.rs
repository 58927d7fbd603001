//! GGUF files, read lazily: the header, metadata and tensor table at open,
//! each tensor's bytes (a positioned read) only when a layer asks for it, so
//! a stage holding a third of the layers reads about a third of the file.
//! llama.cpp's tensor names become Hugging Face names, and its quantized
//! blocks MLX affine weights (see `quants`).
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Value};

use super::quants::{self, GgmlType, Kind, GROUP};
use super::{Conversion, TensorInfo};
use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};

/// A GGUF metadata value: numbers as MLX arrays (0-d for a scalar).
#[derive(Debug, Clone)]
pub enum GgufValue {
    Array(Array),
    String(String),
    Strings(Vec<String>),
}

/// One tensor of the file's table.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    /// ggml order: `dims[0]` is the innermost (a row's length).
    dims: Vec<u64>,
    ty: GgmlType,
    /// Absolute offset of its first byte.
    offset: u64,
}

impl Entry {
    fn count(&self) -> u64 {
        self.dims.iter().product()
    }
    fn nbytes(&self) -> u64 {
        self.ty.bytes(self.count())
    }
    /// The shape in MLX (row-major) order.
    fn shape(&self) -> Vec<i32> {
        self.dims.iter().rev().map(|&d| d as i32).collect()
    }
}

/// A header parsed from a GGUF file, and the open file to read tensors from.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    pub meta: HashMap<String, GgufValue>,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    /// Tensor bytes read so far.
    read: AtomicU64,
}

const MAGIC: &[u8; 4] = b"GGUF";

/// A bounded sequential reader of the header.
struct Header<'a> {
    r: BufReader<&'a File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl Header<'_> {
    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::invalid_model(self.path, msg)
    }

    fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.bad(format!(
                "header field of {n} bytes at offset {} runs past the end of the {}-byte file (truncated?)",
                self.pos, self.len
            )));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        self.pos += n;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let b = self.bytes(n)?;
        String::from_utf8(b).map_err(|_| self.bad("a metadata string is not UTF-8"))
    }

    /// One value of metadata type `ty`; numbers as 0-d arrays.
    fn value(&mut self, ty: u32) -> Result<Option<GgufValue>> {
        if ty == 8 {
            return Ok(Some(GgufValue::String(self.string()?)));
        }
        if ty == 9 {
            let (elem, n) = (self.u32()?, self.u64()?);
            return self.values(elem, n);
        }
        let (dtype, size) =
            scalar_type(ty).ok_or_else(|| self.bad(format!("unknown metadata type {ty}")))?;
        let raw = self.bytes(size as u64)?;
        Ok(Some(GgufValue::Array(number_array(
            &raw,
            dtype,
            size,
            &[],
        )?)))
    }

    /// An array of `n` values of type `elem`: strings, or a 1-d array.
    fn values(&mut self, elem: u32, n: u64) -> Result<Option<GgufValue>> {
        if n > self.len {
            return Err(self.bad(format!("a metadata array claims {n} elements")));
        }
        match elem {
            8 => {
                let v = (0..n).map(|_| self.string()).collect::<Result<Vec<_>>>()?;
                Ok(Some(GgufValue::Strings(v)))
            }
            9 => {
                // Arrays of arrays: nothing here reads them; skip over.
                for _ in 0..n {
                    let (e, m) = (self.u32()?, self.u64()?);
                    self.values(e, m)?;
                }
                Ok(None)
            }
            _ => {
                let (dtype, size) = scalar_type(elem)
                    .ok_or_else(|| self.bad(format!("unknown metadata type {elem}")))?;
                let raw = self.bytes(n * size as u64)?;
                Ok(Some(GgufValue::Array(number_array(
                    &raw,
                    dtype,
                    size,
                    &[n as i32],
                )?)))
            }
        }
    }
}

/// The MLX dtype a metadata number is kept in, and its size in the file.
fn scalar_type(ty: u32) -> Option<(Dtype, usize)> {
    Some(match ty {
        0 => (Dtype::Uint8, 1),
        1 => (Dtype::Int8, 1),
        2 => (Dtype::Uint16, 2),
        3 => (Dtype::Int16, 2),
        4 => (Dtype::Uint32, 4),
        5 => (Dtype::Int32, 4),
        6 => (Dtype::Float32, 4),
        7 => (Dtype::Bool, 1),
        10 => (Dtype::Uint64, 8),
        11 => (Dtype::Int64, 8),
        12 => (Dtype::Float32, 8), // float64, narrowed: MLX GPUs have none
        _ => return None,
    })
}

fn number_array(raw: &[u8], dtype: Dtype, size: usize, shape: &[i32]) -> Result<Array> {
    if size == 8 && dtype == Dtype::Float32 {
        let v: Vec<f32> = raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect();
        return Array::from_slice(&v, shape);
    }
    if dtype == Dtype::Bool {
        let v: Vec<u8> = raw.iter().map(|&b| (b != 0) as u8).collect();
        return Array::from_bytes(&v, shape, dtype);
    }
    Array::from_bytes(raw, shape, dtype)
}

impl GgufFile {
    /// Reads the header, metadata and tensor table, and checks that every
    /// tensor lies inside the file; no tensor data is read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path)
            .map_err(|e| Error::NotFound(format!("cannot open {}: {e}", path.display())))?;
        let len = file.metadata()?.len();
        let mut h = Header {
            r: BufReader::with_capacity(64 << 10, &file),
            pos: 0,
            len,
            path,
        };
        if &h
            .array::<4>()
            .map_err(|_| h.bad("not a GGUF file (too short)"))?
            != MAGIC
        {
            return Err(h.bad("not a GGUF file (no GGUF magic)"));
        }
        let version = h.u32()?;
        if !(2..=3).contains(&version) {
            return Err(h.bad(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let (n_tensors, n_kv) = (h.u64()?, h.u64()?);
        if n_tensors > len / 8 || n_kv > len / 8 {
            return Err(h.bad(format!("header claims {n_tensors} tensors and {n_kv} keys")));
        }
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let key = h.string()?;
            let ty = h.u32()?;
            if let Some(v) = h.value(ty)? {
                meta.insert(key, v);
            }
        }
        let mut entries = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = h.string()?;
            let n_dims = h.u32()?;
            if n_dims > 8 {
                return Err(h.bad(format!("tensor {name} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| h.u64()).collect::<Result<Vec<_>>>()?;
            let id = h.u32()?;
            let ty = GgmlType::from_id(id)
                .ok_or_else(|| h.bad(format!("tensor {name} has unknown GGML type {id}")))?;
            let offset = h.u64()?;
            entries.push(Entry {
                name,
                dims,
                ty,
                offset,
            });
        }
        let align = match meta.get("general.alignment") {
            Some(GgufValue::Array(a)) => a.item::<u32>()? as u64,
            _ => 32,
        };
        if align == 0 {
            return Err(h.bad("general.alignment is 0"));
        }
        let data = h.pos.div_ceil(align) * align;
        let mut by_name = HashMap::new();
        for (i, e) in entries.iter_mut().enumerate() {
            let count = e.count();
            if e.dims
                .first()
                .is_some_and(|&d| !d.is_multiple_of(e.ty.block as u64))
                || e.dims.iter().any(|&d| d > i32::MAX as u64)
            {
                return Err(h.bad(format!(
                    "tensor {} of shape {:?} does not split into {} blocks of {}",
                    e.name, e.dims, e.ty.name, e.ty.block
                )));
            }
            e.offset += data;
            let end = e.offset.checked_add(e.ty.bytes(count));
            if end.is_none_or(|end| end > len) {
                return Err(h.bad(format!(
                    "tensor {} ends past the end of the {len}-byte file (truncated?)",
                    e.name
                )));
            }
            by_name.insert(e.name.clone(), i);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            meta,
            entries,
            by_name,
            read: AtomicU64::new(0),
        })
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    fn read(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; e.nbytes() as usize];
        self.file.read_exact_at(&mut buf, e.offset).map_err(|err| {
            Error::invalid_model(&self.path, format!("reading tensor {}: {err}", e.name))
        })?;
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf)
    }
}

/// What a Hugging Face name is in the file: which tensor, which part.
#[derive(Clone, Copy, Debug)]
enum Part {
    Whole,
    Weight,
    Scales,
    Biases,
}

#[derive(Clone)]
enum Converted {
    Float(Array),
    Quantized([Array; 3]),
}

/// The tensors of a GGUF model under Hugging Face names, converted to MLX
/// when first asked for.
pub struct GgufTensors {
    file: GgufFile,
    names: HashMap<String, (usize, Part)>,
    /// Heads of the llama q/k projections whose rows llama.cpp permuted.
    permuted: HashMap<usize, usize>,
    /// The dtype of every quantized tensor's scales and biases.
    scale_dtype: Dtype,
    done: Mutex<HashMap<usize, Converted>>,
    conversions: Mutex<Vec<Conversion>>,
}

/// The GGUF architectures mlx-dist reads, and the `model_type` each becomes.
const ARCHS: [(&str, &str); 4] = [
    ("llama", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("phi3", "phi3"),
];

/// llama.cpp's block tensor names and their Hugging Face counterparts.
fn hf_part(arch: &str, part: &str) -> Option<&'static str> {
    Some(match (arch, part) {
        ("phi3", "attn_qkv") => "self_attn.qkv_proj",
        ("phi3", "ffn_up") => "mlp.gate_up_proj",
        (_, "attn_q") => "self_attn.q_proj",
        (_, "attn_k") => "self_attn.k_proj",
        (_, "attn_v") => "self_attn.v_proj",
        (_, "attn_output") => "self_attn.o_proj",
        (_, "attn_q_norm") => "self_attn.q_norm",
        (_, "attn_k_norm") => "self_attn.k_norm",
        (_, "ffn_gate") => "mlp.gate_proj",
        (_, "ffn_up") => "mlp.up_proj",
        (_, "ffn_down") => "mlp.down_proj",
        (_, "attn_norm") => "input_layernorm",
        (_, "ffn_norm") => "post_attention_layernorm",
        _ => return None,
    })
}

fn hf_stem(arch: &str, stem: &str) -> Option<String> {
    Some(match stem {
        "token_embd" => "model.embed_tokens".into(),
        "output_norm" => "model.norm".into(),
        "output" => "lm_head".into(),
        _ => {
            let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
            format!("model.layers.{layer}.{}", hf_part(arch, part)?)
        }
    })
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

impl GgufTensors {
    /// Opens `path`, and the config.json equivalent of its metadata.
    pub fn open(path: &Path) -> Result<(GgufTensors, Value)> {
        let file = GgufFile::open(path)?;
        let config = config(&file)?;
        let arch = meta_str(&file.meta, "general.architecture").unwrap_or("");
        let llama = arch == "llama";
        let heads = config["num_attention_heads"].as_u64().unwrap_or(1) as usize;
        let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(1) as usize;
        let mut names = HashMap::new();
        let mut permuted = HashMap::new();
        for (i, e) in file.entries.iter().enumerate() {
            let Some((stem, suffix)) = e.name.rsplit_once('.') else {
                continue;
            };
            let Some(hf) = hf_stem(arch, stem) else {
                continue;
            };
            if llama && (suffix == "weight" || suffix == "bias") {
                if hf.ends_with("q_proj") {
                    permuted.insert(i, heads);
                } else if hf.ends_with("k_proj") {
                    permuted.insert(i, kv_heads);
                }
            }
            if suffix == "weight" && e.ty.bits().is_some() {
                names.insert(format!("{hf}.weight"), (i, Part::Weight));
                names.insert(format!("{hf}.scales"), (i, Part::Scales));
                names.insert(format!("{hf}.biases"), (i, Part::Biases));
            } else {
                names.insert(format!("{hf}.{suffix}"), (i, Part::Whole));
            }
        }
        // Scales as precise as the file's float matrices; float16 (as MLX's
        // own GGUF reader) when it has none, or only half-precision ones.
        let f32_matrices = file
            .entries
            .iter()
            .any(|e| e.dims.len() >= 2 && matches!(e.ty.kind, Kind::Float(Dtype::Float32)));
        let scale_dtype = if f32_matrices {
            Dtype::Float32
        } else {
            Dtype::Float16
        };
        let t = GgufTensors {
            file,
            names,
            permuted,
            scale_dtype,
            done: Mutex::new(HashMap::new()),
            conversions: Mutex::new(Vec::new()),
        };
        Ok((t, config))
    }

    pub fn meta(&self) -> &HashMap<String, GgufValue> {
        &self.file.meta
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }

    /// Shape and dtype of `name` as it will be in MLX, from the table alone.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        let &(i, part) = self.names.get(name)?;
        let e = &self.file.entries[i];
        let mut shape = e.shape();
        let cols = *shape.last().unwrap_or(&1);
        let last = shape.len().saturating_sub(1);
        let dtype = match (part, e.ty.kind) {
            (Part::Whole, Kind::Float(d)) => d,
            (Part::Whole, _) => Dtype::Uint8,
            (Part::Weight, _) => {
                shape[last] = cols * e.ty.bits().unwrap_or(0) as i32 / 32;
                Dtype::Uint32
            }
            (Part::Scales | Part::Biases, _) => {
                shape[last] = cols / GROUP as i32;
                self.scale_dtype
            }
        };
        Some(TensorInfo { shape, dtype })
    }

    /// Tensor bytes read from the file so far.
    pub fn bytes_read(&self) -> u64 {
        self.file.read.load(Ordering::Relaxed)
    }

    pub fn file_bytes(&self) -> u64 {
        self.file.file.metadata().map_or(0, |m| m.len())
    }

    pub fn conversions(&self) -> Vec<Conversion> {
        crate::util::lock(&self.conversions).clone()
    }

    pub fn get(&self, name: &str) -> Result<Option<Array>> {
        let Some(&(i, part)) = self.names.get(name) else {
            return Ok(None);
        };
        let cached = crate::util::lock(&self.done).get(&i).cloned();
        let c = match cached {
            Some(c) => c,
            None => {
                let c = self.convert(i)?;
                crate::util::lock(&self.done).insert(i, c.clone());
                c
            }
        };
        Ok(Some(match (c, part) {
            (Converted::Float(a), _) => a,
            (Converted::Quantized([w, _, _]), Part::Weight | Part::Whole) => w,
            (Converted::Quantized([_, s, _]), Part::Scales) => s,
            (Converted::Quantized([_, _, b]), Part::Biases) => b,
        }))
    }

    fn convert(&self, i: usize) -> Result<Converted> {
        let e = &self.file.entries[i];
        let shape = e.shape();
        // A vector (a bias) is a column of rows, for the llama reordering.
        let cols = match e.dims.as_slice() {
            [_] => 1,
            d => d.first().copied().unwrap_or(1) as usize,
        };
        let rows = (e.count() / cols.max(1) as u64) as usize;
        let order = self
            .permuted
            .get(&i)
            .map(|&heads| llama_row_order(rows, heads))
            .transpose()
            .map_err(|msg| Error::invalid_model(&self.file.path, format!("{}: {msg}", e.name)))?;
        match e.ty.kind {
            Kind::Float(dtype) => {
                let raw = self.file.read(e)?;
                let raw = match &order {
                    Some(o) => reorder_rows(&raw, o, cols * dtype.size()),
                    None => raw,
                };
                Ok(Converted::Float(Array::from_bytes(&raw, &shape, dtype)?))
            }
            Kind::Unsupported => Err(Error::invalid_model(
                &self.file.path,
                format!(
                    "tensor {} is {}, which mlx-dist cannot convert to MLX (supported: F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)",
                    e.name, e.ty.name
                ),
            )),
            Kind::Affine { .. } | Kind::Values { .. } => {
                let raw = self.file.read(e)?;
                let mut a = quants::to_affine(&e.ty, &raw, rows, cols, order.as_deref(), self.scale_dtype);
                if !a.max_error.is_finite() && self.scale_dtype != Dtype::Float32 {
                    // A scale past float16's range: this tensor keeps float32.
                    a = quants::to_affine(&e.ty, &raw, rows, cols, order.as_deref(), Dtype::Float32);
                }
                let mut wshape = shape.clone();
                let mut gshape = shape;
                let last = wshape.len() - 1;
                wshape[last] = (cols * a.bits as usize / 32) as i32;
                gshape[last] = (cols / GROUP) as i32;
                let w = Array::from_slice(&a.words, &wshape)?;
                let s = Array::from_bytes(&a.scales, &gshape, a.dtype)?;
                let b = Array::from_bytes(&a.biases, &gshape, a.dtype)?;
                let exact = a.max_error == 0.0;
                if !exact {
                    tracing::debug!(
                        "{} ({}) became {}-bit affine, max error {:.3e} (largest weight {:.3e})",
                        e.name, e.ty.name, a.bits, a.max_error, a.max_abs
                    );
                }
                crate::util::lock(&self.conversions).push(Conversion {
                    tensor: e.name.clone(),
                    source: e.ty.name,
                    bits: a.bits,
                    group_size: GROUP as u32,
                    scale_dtype: a.dtype,
                    max_error: a.max_error,
                    max_abs: a.max_abs,
                });
                Ok(Converted::Quantized([w, s, b]))
            }
        }
    }
}

/// Source row of each result row, undoing llama.cpp's
/// `reshape(n_head, 2, d/2).swapaxes(1, 2)` of the llama q/k rows so the
/// model runs with standard rope, as mlx-lm does.
fn llama_row_order(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!("{rows} rows do not split into {heads} heads"));
    }
    let half = rows / heads / 2;
    // permuted[h, j, i] = hf[h, i, j] with i in 0..2, j in 0..half.
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                order[h * 2 * half + i * half + j] = h * 2 * half + j * 2 + i;
            }
        }
    }
    Ok(order)
}

fn reorder_rows(raw: &[u8], order: &[usize], row: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for &r in order {
        out.extend_from_slice(&raw[r * row..(r + 1) * row]);
    }
    out
}

/// A config.json equivalent from the metadata and the tensor table.
fn config(file: &GgufFile) -> Result<Value> {
    let meta = &file.meta;
    let arch = meta_str(meta, "general.architecture").unwrap_or("");
    let model_type = ARCHS
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, t)| *t)
        .ok_or_else(|| Error::UnsupportedArchitecture {
            model_type: format!("gguf:{arch}"),
            supported: ARCHS.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", "),
        })?;
    let num = |k: &str| meta_num(meta, &format!("{arch}.{k}"));
    let need = |k: &str| {
        num(k).ok_or_else(|| {
            Error::invalid_model(&file.path, format!("GGUF metadata lacks {arch}.{k}"))
        })
    };
    let hidden = need("embedding_length")? as i64;
    let heads = need("attention.head_count")? as i64;
    // The embedding's rows: a vocabulary padded past its tokens has more.
    let vocab = match file.entry("token_embd.weight").and_then(|e| e.dims.get(1)) {
        Some(&rows) => rows as i64,
        None => match meta.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Strings(t)) => t.len() as i64,
            _ => 0,
        },
    };
    let mut c = json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count")? as i64,
        "intermediate_size": need("feed_forward_length")? as i64,
        "num_attention_heads": heads,
        "num_key_value_heads": num("attention.head_count_kv").map_or(heads, |v| v as i64),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon")?,
        "rope_theta": num("rope.freq_base").unwrap_or(10000.0),
        "vocab_size": vocab,
        "tie_word_embeddings": file.entry("output.weight").is_none(),
    });
    if let Some(ctx) = num("context_length") {
        c["max_position_embeddings"] = json!(ctx as i64);
    }
    let head_dim = num("attention.key_length").map(|v| v as i64);
    if let Some(hd) = head_dim {
        c["head_dim"] = json!(hd);
    }
    if arch == "phi3" {
        let hd = head_dim.unwrap_or(hidden / heads.max(1));
        if let Some(rot) = num("rope.dimension_count").filter(|&r| r as i64 != hd) {
            c["partial_rotary_factor"] = json!(rot / hd as f64);
        }
        if let Some(orig) = num("rope.scaling.original_context_length") {
            c["original_max_position_embeddings"] = json!(orig as i64);
        }
        if file.entry("rope_factors_long.weight").is_some() {
            return Err(Error::invalid_model(
                &file.path,
                "phi3 with longrope factors in GGUF is not supported yet; use its safetensors",
            ));
        }
    }
    if let Some(GgufValue::Array(eos)) = meta.get("tokenizer.ggml.eos_token_id") {
        c["eos_token_id"] = json!(eos.item::<u32>()?);
    }
    // How the quantized matrices are packed, so the MLX-layout copy of this
    // model loads in mlx-lm too: the commonest width as the default, the
    // others as per-layer overrides (how mlx-lm writes mixed precision).
    let arch_of = |e: &Entry| e.name.rsplit_once('.').and_then(|(s, _)| hf_stem(arch, s));
    let mut widths: HashMap<u32, usize> = HashMap::new();
    let quantized: Vec<(String, u32)> = file
        .entries
        .iter()
        .filter(|e| e.name.ends_with(".weight"))
        .filter_map(|e| Some((arch_of(e)?, e.ty.bits()?)))
        .collect();
    for (_, b) in &quantized {
        *widths.entry(*b).or_default() += 1;
    }
    if let Some((&bits, _)) = widths.iter().max_by_key(|(b, n)| (**n, **b)) {
        let mut q = json!({"group_size": GROUP, "bits": bits});
        for (name, b) in quantized.iter().filter(|(_, b)| *b != bits) {
            q[name] = json!({"group_size": GROUP, "bits": b});
        }
        c["quantization"] = q;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_row_order_inverts_llama_cpp_permutation() {
        // rows 0..8 of 2 heads, permuted as llama.cpp's convert script does.
        let hf: Vec<usize> = (0..8).collect();
        let a =
            Array::from_slice(&hf.iter().map(|&x| x as f32).collect::<Vec<_>>(), &[8, 1]).unwrap();
        let permuted = a
            .reshape(&[2, 2, 2, 1])
            .unwrap()
            .swapaxes(1, 2)
            .unwrap()
            .reshape(&[8, 1])
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let order = llama_row_order(8, 2).unwrap();
        let back: Vec<usize> = order.iter().map(|&r| permuted[r] as usize).collect();
        assert_eq!(back, hf);
        assert!(llama_row_order(6, 2).is_err());
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_naming_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("m.gguf");
        std::fs::write(&f, b"GGML....").unwrap();
        let err = GgufFile::open(&f).err().unwrap().to_string();
        assert!(err.contains("GGUF magic"), "{err}");
        // A header whose one tensor runs past the end of the file.
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(b"w");
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        b.resize(64 + 100, 0);
        std::fs::write(&f, &b).unwrap();
        let err = GgufFile::open(&f).err().unwrap().to_string();
        assert!(err.contains("tensor w ends past the end"), "{err}");
        b.truncate(30);
        std::fs::write(&f, &b).unwrap();
        let err = GgufFile::open(&f).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
