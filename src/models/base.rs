//! The building blocks every architecture is made of: linear layers (dense
//! or affine-quantized), embeddings, RMS norm, rotary embeddings and
//! attention. Each mirrors the op sequence of its `mlx.nn` counterpart so
//! that results are bit-identical to mlx-lm's.
use serde_json::Value;

use crate::cache::{CacheRef, Positions};
use crate::error::{Error, Result};
use crate::mlx::{ops, Array, Dtype, Mask};
use crate::weights::{Quant, Weights};

/// A weight matrix `[out, in]`, dense or packed by `mx.quantize`.
#[derive(Clone)]
pub enum Matrix {
    Dense(Array),
    Quantized {
        weight: Array,
        scales: Array,
        biases: Option<Array>,
        quant: Quant,
    },
}

impl Matrix {
    /// Loads `{prefix}.weight`, quantized when `{prefix}.scales` exists (as
    /// mlx-lm decides), with `in_dims` to infer the packing when the config
    /// does not name it.
    pub fn load(w: &Weights, prefix: &str, in_dims: i32) -> Result<Matrix> {
        let weight = w.get(&format!("{prefix}.weight"))?;
        let Some(scales) = w.try_get(&format!("{prefix}.scales"))? else {
            return Ok(Matrix::Dense(weight));
        };
        if scales.dtype() == Dtype::Uint8 {
            return Err(w.invalid(format!(
                "{prefix}: only affine quantization is supported (found uint8 scales)"
            )));
        }
        let quant = match w.quant_override(prefix) {
            Some(q) => q,
            None => {
                let groups = scales.dim(-1);
                if groups <= 0 || in_dims % groups != 0 {
                    return Err(w.invalid(format!(
                        "{prefix}: scales of shape {:?} do not fit {in_dims} inputs",
                        scales.shape()
                    )));
                }
                Quant {
                    group_size: in_dims / groups,
                    bits: weight.dim(-1) * 32 / in_dims,
                }
            }
        };
        let biases = w.try_get(&format!("{prefix}.biases"))?;
        Ok(Matrix::Quantized {
            weight,
            scales,
            biases,
            quant,
        })
    }

    /// `x @ W.T`.
    pub fn matmul_t(&self, x: &Array) -> Result<Array> {
        one_matrix(x, |x| self.matmul_t_as_is(x))
    }

    fn matmul_t_as_is(&self, x: &Array) -> Result<Array> {
        match self {
            Matrix::Dense(w) => x.matmul(&w.t()?),
            Matrix::Quantized {
                weight,
                scales,
                biases,
                quant,
            } => ops::quantized_matmul(
                x,
                weight,
                scales,
                biases.as_ref(),
                true,
                quant.group_size,
                quant.bits,
            ),
        }
    }

    /// Rows `ids` of the matrix, dequantized (an embedding lookup).
    pub fn rows(&self, ids: &Array) -> Result<Array> {
        match self {
            Matrix::Dense(w) => w.take(ids, 0),
            Matrix::Quantized {
                weight,
                scales,
                biases,
                quant,
            } => {
                let b = biases.as_ref().map(|b| b.take(ids, 0)).transpose()?;
                ops::dequantize(
                    &weight.take(ids, 0)?,
                    &scales.take(ids, 0)?,
                    b.as_ref(),
                    quant.group_size,
                    quant.bits,
                )
            }
        }
    }

    pub fn nbytes(&self) -> usize {
        match self {
            Matrix::Dense(w) => w.nbytes(),
            Matrix::Quantized {
                weight,
                scales,
                biases,
                ..
            } => weight.nbytes() + scales.nbytes() + biases.as_ref().map_or(0, |b| b.nbytes()),
        }
    }

    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Matrix::Dense(w) => vec![w],
            Matrix::Quantized {
                weight,
                scales,
                biases,
                ..
            } => {
                let mut v = vec![weight, scales];
                v.extend(biases.as_ref());
                v
            }
        }
    }
}

/// `f(x)` for a matrix product on the last axis, with a batch of single
/// rows (`[B, 1, K]`, a decode step of B sequences) passed as one `[B, K]`
/// matrix. MLX's CUDA backend multiplies a quantized `[B, 1, K]` as B
/// products of one row each, at about B times the cost of one (on an H200,
/// 8-bit 2048 × 6144: 46 µs for 8 rows, 79 µs for 16); one matrix of B rows
/// reads the weights once (17 µs for 8 or 16), with the same values.
fn one_matrix(x: &Array, f: impl FnOnce(&Array) -> Result<Array>) -> Result<Array> {
    let s = x.shape();
    if s.len() != 3 || s[1] != 1 || s[0] == 1 {
        return f(x);
    }
    let y = f(&x.reshape(&[s[0], s[2]])?)?;
    y.reshape(&[s[0], 1, y.dim(-1)])
}

/// `nn.Linear` / `nn.QuantizedLinear`.
#[derive(Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Array>,
}

impl Linear {
    pub fn load(w: &Weights, prefix: &str, in_dims: i32, bias: bool) -> Result<Linear> {
        let weight = Matrix::load(w, prefix, in_dims)?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        match (&self.weight, &self.bias) {
            // nn.Linear fuses the bias with addmm; QuantizedLinear adds it after.
            (Matrix::Dense(w), Some(b)) => one_matrix(x, |x| ops::addmm(b, x, &w.t()?)),
            (m, Some(b)) => m.matmul_t(x)?.add(b),
            (m, None) => m.matmul_t(x),
        }
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.weight.arrays();
        v.extend(self.bias.as_ref());
        v
    }
}

/// `nn.Embedding` / `nn.QuantizedEmbedding`, usable as the tied output head.
#[derive(Clone)]
pub struct Embedding {
    pub weight: Matrix,
}

impl Embedding {
    pub fn load(w: &Weights, prefix: &str, dims: i32) -> Result<Embedding> {
        Ok(Embedding {
            weight: Matrix::load(w, prefix, dims)?,
        })
    }

    pub fn forward(&self, ids: &Array) -> Result<Array> {
        self.weight.rows(ids)
    }

    /// The tied output projection (`as_linear`).
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        self.weight.matmul_t(x)
    }
}

/// `nn.RMSNorm`.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, prefix: &str, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: w.get(&format!("{prefix}.weight"))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        ops::rms_norm(x, Some(&self.weight), self.eps)
    }
}

/// Rotary position embeddings, in the variants `initialize_rope` builds.
#[derive(Clone)]
pub enum Rope {
    /// `nn.RoPE` (also "linear" scaling, through `scale`).
    Base {
        dims: i32,
        traditional: bool,
        base: f32,
        scale: f32,
    },
    /// Precomputed frequencies (llama3, longrope/su), with an optional
    /// scaling of the rotated part of the input first.
    Freqs {
        dims: i32,
        traditional: bool,
        freqs: Array,
        input_scale: Option<f32>,
    },
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// `base ** (arange(0, dims, 2) / dims)`, in float32, as mlx-lm computes it.
fn base_freqs(base: f32, dims: i32) -> Result<Array> {
    let exps = Array::arange(0.0, dims as f64, 2.0, Dtype::Float32)?
        .div(&Array::scalar(dims as f64, Dtype::Float32)?)?;
    Array::scalar(base as f64, Dtype::Float32)?.power(&exps)
}

impl Rope {
    /// Builds the rope for `dims` rotated features from a config's
    /// `rope_theta`, `rope_traditional` and `rope_scaling`.
    pub fn from_config(
        dims: i32,
        base: f32,
        traditional: bool,
        scaling: Option<&Value>,
        max_pos: Option<i64>,
    ) -> Result<Rope> {
        let Some(sc) = scaling.filter(|v| !v.is_null()) else {
            return Ok(Rope::Base {
                dims,
                traditional,
                base,
                scale: 1.0,
            });
        };
        let kind = sc
            .get("type")
            .or_else(|| sc.get("rope_type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = num(sc, "factor");
        match kind {
            "default" => Ok(Rope::Base { dims, traditional, base, scale: 1.0 }),
            "linear" => {
                let f = factor.ok_or_else(|| Error::InvalidArgument("linear rope_scaling needs a factor".into()))?;
                Ok(Rope::Base { dims, traditional, base, scale: (1.0 / f) as f32 })
            }
            "llama3" => Self::llama3(dims, base, traditional, sc),
            "longrope" | "su" => {
                let orig = num(sc, "original_max_position_embeddings").unwrap_or(4096.0);
                Self::su(dims, base, sc, max_pos.unwrap_or(131072) as f64, orig)
            }
            other => Err(Error::InvalidArgument(format!(
                "unsupported rope_scaling type {other:?}; supported: default, linear, llama3, longrope"
            ))),
        }
    }

    fn llama3(dims: i32, base: f32, traditional: bool, sc: &Value) -> Result<Rope> {
        let f32s = |v: f64| Array::scalar(v, Dtype::Float32);
        let factor = num(sc, "factor")
            .ok_or_else(|| Error::InvalidArgument("llama3 rope_scaling needs a factor".into()))?;
        let low = num(sc, "low_freq_factor").unwrap_or(1.0);
        let high = num(sc, "high_freq_factor").unwrap_or(4.0);
        let old = num(sc, "original_max_position_embeddings").unwrap_or(8192.0);
        let low_wavelen = old / low;
        let high_wavelen = old / high;
        let freqs = base_freqs(base, dims)?;
        let wavelens = freqs.mul(&f32s(2.0 * std::f64::consts::PI)?)?;
        let freqs = ops::where_(
            &wavelens.greater(&f32s(low_wavelen)?)?,
            &freqs.mul(&f32s(factor)?)?,
            &freqs,
        )?;
        let medium = wavelens
            .greater(&f32s(high_wavelen)?)?
            .logical_and(&wavelens.less(&f32s(low_wavelen)?)?)?;
        let smooth = f32s(old)?
            .div(&wavelens)?
            .sub(&f32s(low)?)?
            .div(&f32s(high - low)?)?;
        let one = f32s(1.0)?;
        let denom = one.sub(&smooth)?.div(&f32s(factor)?)?.add(&smooth)?;
        let smooth_freqs = freqs.div(&denom)?;
        let freqs = ops::where_(&medium, &smooth_freqs, &freqs)?;
        Ok(Rope::Freqs {
            dims,
            traditional,
            freqs,
            input_scale: None,
        })
    }

    fn su(dims: i32, base: f32, sc: &Value, max_pos: f64, orig: f64) -> Result<Rope> {
        let long: Vec<f32> = match sc.get("long_factor") {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_f64().unwrap_or(1.0) as f32).collect(),
            Some(v) => vec![v.as_f64().unwrap_or(1.0) as f32; (dims / 2) as usize],
            None => vec![1.0; (dims / 2) as usize],
        };
        let long = Array::from_slice(&long, &[long.len() as i32])?;
        let freqs = long.mul(&base_freqs(base, dims)?)?;
        let factor = max_pos / orig;
        let scale = match num(sc, "long_mscale") {
            Some(s) if s != 0.0 => s,
            _ if factor <= 1.0 => 1.0,
            _ => (1.0 + factor.ln() / orig.ln()).sqrt(),
        };
        Ok(Rope::Freqs {
            dims,
            traditional: false,
            freqs,
            input_scale: Some(scale as f32),
        })
    }

    /// Rotates `x` (`[B, H, L, D]`) for positions starting at `at`.
    pub fn forward(&self, x: &Array, at: &Positions) -> Result<Array> {
        match self {
            Rope::Base {
                dims,
                traditional,
                base,
                scale,
            } => ops::rope(x, *dims, *traditional, Some(*base), *scale, at, None),
            Rope::Freqs {
                dims,
                traditional,
                freqs,
                input_scale,
            } => {
                let x = match input_scale {
                    // `x.at[..., :dims].multiply(s)`
                    Some(s) => {
                        let d = x.dim(-1);
                        let head = x
                            .slice_axis(-1, 0, *dims)?
                            .mul(&Array::scalar(*s as f64, x.dtype())?)?;
                        let mut lo = vec![0; x.ndim()];
                        let mut hi = x.shape();
                        *lo.last_mut().unwrap() = 0;
                        *hi.last_mut().unwrap() = (*dims).min(d);
                        x.slice_update(&head, &lo, &hi)?
                    }
                    None => x.clone(),
                };
                ops::rope(&x, *dims, *traditional, None, 1.0, at, Some(freqs))
            }
        }
    }
}

pub use crate::mlx::ops::swiglu;

/// Shapes of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
}

impl Heads {
    /// `[B, L, H*D]` -> `[B, H, L, D]`.
    pub fn split(x: &Array, heads: i32) -> Result<Array> {
        let s = x.shape();
        x.reshape(&[s[0], s[1], heads, -1])?
            .transpose(&[0, 2, 1, 3])
    }

    /// `[B, H, L, D]` -> `[B, L, H*D]`.
    pub fn merge(x: &Array) -> Result<Array> {
        let s = x.shape();
        x.transpose(&[0, 2, 1, 3])?.reshape(&[s[0], s[2], -1])
    }
}

/// Rope, cache update and scaled dot-product attention on `[B, H, L, D]`
/// queries, keys and values; returns `[B, L, H*D]`.
pub fn attend(
    q: &Array,
    k: &Array,
    v: &Array,
    rope: &Rope,
    scale: f32,
    mask: &AttnMask,
    cache: Option<CacheRef<'_>>,
) -> Result<Array> {
    let Some(mut cache) = cache else {
        let at = Positions::From(0);
        let (q, k) = (rope.forward(q, &at)?, rope.forward(k, &at)?);
        return Heads::merge(&ops::scaled_dot_product_attention(
            &q,
            &k,
            v,
            scale,
            mask.as_mask(),
        )?);
    };
    let (q, k) = {
        let at = cache.positions();
        (rope.forward(q, &at)?, rope.forward(k, &at)?)
    };
    let (k, v) = cache.update_and_fetch(&k, v)?;
    let m = match cache.mask() {
        Some(rows) => Mask::Array(rows),
        None => mask.as_mask(),
    };
    Heads::merge(&ops::scaled_dot_product_attention(&q, &k, &v, scale, m)?)
}

/// The mask for one forward pass: none for a single query, causal for
/// several (MLX aligns it to the end of the keys, so it works with a cache).
pub enum AttnMask {
    None,
    Causal,
    Array(Array),
}

impl AttnMask {
    fn as_mask(&self) -> Mask<'_> {
        match self {
            AttnMask::None => Mask::None,
            AttnMask::Causal => Mask::Causal,
            AttnMask::Array(a) => Mask::Array(a),
        }
    }

    pub fn for_length(l: i32) -> AttnMask {
        if l > 1 {
            AttnMask::Causal
        } else {
            AttnMask::None
        }
    }
}

/// How the query/key/value projections are stored.
pub enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    /// One `qkv_proj` whose output is split (phi3).
    Fused(Linear),
}

/// Grouped-query self-attention with rotary embeddings, optionally with
/// RMS norms on queries and keys (qwen3).
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: Heads,
    pub scale: f32,
    pub rope: Rope,
}

impl Attention {
    pub fn forward(
        &self,
        x: &Array,
        mask: &AttnMask,
        cache: Option<CacheRef<'_>>,
    ) -> Result<Array> {
        let (q, k, v) = self.project(x)?;
        self.o_proj
            .forward(&attend(&q, &k, &v, &self.rope, self.scale, mask, cache)?)
    }

    /// Queries, keys and values as `[B, heads, L, head_dim]`.
    fn project(&self, x: &Array) -> Result<(Array, Array, Array)> {
        let Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        } = self.heads;
        let (q, k, v) = match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?),
            Qkv::Fused(qkv) => {
                let q_end = n_heads * head_dim;
                let mut parts = qkv
                    .forward(x)?
                    .split(&[q_end, q_end + n_kv_heads * head_dim], -1)?
                    .into_iter();
                (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                )
            }
        };
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            // Normed per head before the transpose, as in mlx-lm's qwen3.
            (Some(qn), Some(kn)) => {
                let s = x.shape();
                let q = qn
                    .forward(&q.reshape(&[s[0], s[1], n_heads, -1])?)?
                    .transpose(&[0, 2, 1, 3])?;
                let k = kn
                    .forward(&k.reshape(&[s[0], s[1], n_kv_heads, -1])?)?
                    .transpose(&[0, 2, 1, 3])?;
                (q, k)
            }
            _ => (Heads::split(&q, n_heads)?, Heads::split(&k, n_kv_heads)?),
        };
        let v = Heads::split(&v, n_kv_heads)?;
        Ok((q, k, v))
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => [q_proj, k_proj, v_proj]
                .iter()
                .flat_map(|l| l.arrays())
                .collect(),
            Qkv::Fused(l) => l.arrays(),
        };
        v.extend(self.o_proj.arrays());
        v.extend(
            self.q_norm
                .iter()
                .chain(self.k_norm.iter())
                .map(|n| &n.weight),
        );
        v
    }
}

/// How the MLP's gate and up projections are stored.
pub enum GateUp {
    Separate {
        gate_proj: Linear,
        up_proj: Linear,
    },
    /// One `gate_up_proj` whose output is split in half (phi3).
    Fused(Linear),
}

/// The SwiGLU feed-forward network.
pub struct Mlp {
    pub gate_up: GateUp,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => (gate_proj.forward(x)?, up_proj.forward(x)?),
            GateUp::Fused(l) => {
                let y = l.forward(x)?;
                let half = y.dim(-1) / 2;
                let mut parts = y.split(&[half], -1)?.into_iter();
                (parts.next().unwrap(), parts.next().unwrap())
            }
        };
        self.down_proj.forward(&swiglu(&gate, &up)?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => [gate_proj, up_proj]
                .iter()
                .flat_map(|l| l.arrays())
                .collect(),
            GateUp::Fused(l) => l.arrays(),
        };
        v.extend(self.down_proj.arrays());
        v
    }
}

/// A pre-norm decoder block: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
pub struct DecoderBlock {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderBlock {
    /// Loads the two norms of block `prefix` around the given sub-layers.
    pub fn load(
        w: &Weights,
        prefix: &str,
        eps: f32,
        self_attn: Attention,
        mlp: Mlp,
    ) -> Result<DecoderBlock> {
        Ok(DecoderBlock {
            self_attn,
            mlp,
            input_layernorm: RmsNorm::load(w, &format!("{prefix}.input_layernorm"), eps)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{prefix}.post_attention_layernorm"),
                eps,
            )?,
        })
    }
}

impl super::Block for DecoderBlock {
    fn forward(&self, x: &Array, mask: &AttnMask, cache: Option<CacheRef<'_>>) -> Result<Array> {
        let h = x.add(&self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            mask,
            cache,
        )?)?;
        h.add(
            &self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?)?,
        )
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.self_attn.arrays();
        v.extend(self.mlp.arrays());
        v.push(&self.input_layernorm.weight);
        v.push(&self.post_attention_layernorm.weight);
        v
    }
}

/// How a standard attention layer (separate q/k/v/o) is laid out.
pub struct AttentionLayout {
    pub head_dim: i32,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// RMS norms on each query and key head (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    pub rope_traditional: bool,
}

impl Attention {
    /// Separate q/k/v/o projections of `args`' sizes under `prefix`, with
    /// the rope of the config.
    pub fn load_standard(
        args: &super::ModelArgs,
        w: &Weights,
        prefix: &str,
        layout: AttentionLayout,
    ) -> Result<Attention> {
        let (h, hd) = (args.hidden_size, layout.head_dim);
        let heads = Heads {
            n_heads: args.num_attention_heads,
            n_kv_heads: args.n_kv_heads(),
            head_dim: hd,
        };
        let proj = |name: &str, inputs: i32, bias: bool| {
            Linear::load(w, &format!("{prefix}.{name}"), inputs, bias)
        };
        let norm = |name: &str| {
            layout
                .qk_norm
                .then(|| RmsNorm::load(w, &format!("{prefix}.{name}"), args.rms_norm_eps))
                .transpose()
        };
        Ok(Attention {
            qkv: Qkv::Separate {
                q_proj: proj("q_proj", h, layout.qkv_bias)?,
                k_proj: proj("k_proj", h, layout.qkv_bias)?,
                v_proj: proj("v_proj", h, layout.qkv_bias)?,
            },
            o_proj: proj("o_proj", heads.n_heads * hd, layout.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads,
            scale: (hd as f32).powf(-0.5),
            rope: Rope::from_config(
                hd,
                args.rope_theta,
                layout.rope_traditional,
                args.rope_scaling.as_ref(),
                args.max_position_embeddings,
            )?,
        })
    }
}

/// A SwiGLU MLP with separate gate/up/down projections under `prefix`.
pub fn load_separate_mlp(
    args: &super::ModelArgs,
    w: &Weights,
    prefix: &str,
    bias: bool,
) -> Result<Mlp> {
    let (h, i) = (args.hidden_size, args.intermediate_size);
    Ok(Mlp {
        gate_up: GateUp::Separate {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), h, bias)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), h, bias)?,
        },
        down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, bias)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tests::assert_within;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// A batch of single rows goes through as one matrix and comes back as
    /// `[B, 1, N]`, each row what it is alone.
    #[test]
    fn a_batch_of_rows_multiplies_as_one_matrix_with_each_rows_result() {
        let (k, n, b) = (128, 96, 3);
        let w = Array::from_slice(&values((n * k) as usize, 7), &[n, k]).unwrap();
        let (weight, scales, biases) = ops::quantize(&w, 64, 8).unwrap();
        let bias = Array::from_slice(&values(n as usize, 3), &[n]).unwrap();
        let quantized = Linear {
            weight: Matrix::Quantized {
                weight,
                scales,
                biases: Some(biases),
                quant: Quant {
                    group_size: 64,
                    bits: 8,
                },
            },
            bias: None,
        };
        let dense = Linear {
            weight: Matrix::Dense(w),
            bias: Some(bias),
        };
        let x = Array::from_slice(&values((b * k) as usize, 11), &[b, 1, k]).unwrap();
        for layer in [&quantized, &dense] {
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.shape(), vec![b, 1, n]);
            for r in 0..b {
                let alone = layer.forward(&x.slice_axis(0, r, r + 1).unwrap()).unwrap();
                let row = got.slice_axis(0, r, r + 1).unwrap();
                assert_within(
                    &row.to_vec::<f32>().unwrap(),
                    &alone.to_vec::<f32>().unwrap(),
                    1e-5,
                    &format!("row {r}"),
                );
            }
        }
    }
}
