//! Model architectures and the registry mapping `model_type` to them.
//!
//! Every supported architecture is a decoder stack of the same shape
//! (embedding -> blocks -> norm -> head); an architecture file supplies its
//! block. A `Model` may hold only a range of the blocks (one pipeline stage),
//! with or without the embedding and head.
pub mod base;
pub mod llama;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use std::ops::Range;

use serde::Deserialize;
use serde_json::Value;

use crate::cache::{CacheRef, Caches, KvCache, Rows, SlotCache};
use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};
use crate::weights::Weights;
use base::{AttnMask, Embedding, Linear, RmsNorm};

/// One transformer block of some architecture.
pub trait Block: Send + Sync {
    fn forward(&self, x: &Array, mask: &AttnMask, cache: Option<CacheRef<'_>>) -> Result<Array>;
    /// The arrays it holds (to evaluate, or to weigh).
    fn arrays(&self) -> Vec<&Array>;
}

/// The config.json fields shared by the supported architectures.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelArgs {
    pub model_type: String,
    pub hidden_size: i32,
    pub num_hidden_layers: usize,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    #[serde(default)]
    pub num_key_value_heads: Option<i32>,
    #[serde(default)]
    pub head_dim: Option<i32>,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_traditional: bool,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub max_position_embeddings: Option<i64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub partial_rotary_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<i64>,
}

fn default_rope_theta() -> f32 {
    10000.0
}

impl ModelArgs {
    pub fn n_kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> i32 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// What an architecture file provides.
pub struct Architecture {
    /// `tie_word_embeddings` when config.json does not say.
    pub tie_default: bool,
    /// Builds block `i` from the weights under `model.layers.{i}`.
    pub load_block: fn(&ModelArgs, &Weights, usize) -> Result<Box<dyn Block>>,
}

/// The registry: `model_type` -> architecture.
const ARCHITECTURES: &[(&str, &Architecture)] = &[
    ("llama", &llama::ARCH),
    ("mistral", &llama::ARCH),
    ("qwen2", &qwen2::ARCH),
    ("qwen3", &qwen3::ARCH),
    ("phi3", &phi3::ARCH),
];

pub fn supported_model_types() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|(n, _)| *n).collect()
}

fn architecture(model_type: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|(n, _)| *n == model_type)
        .map(|(_, a)| *a)
        .ok_or_else(|| Error::UnsupportedArchitecture {
            model_type: model_type.into(),
            supported: supported_model_types().join(", "),
        })
}

/// Whether a model's output head is its embedding matrix.
pub fn is_tied(config: &Value, args: &ModelArgs) -> Result<bool> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok(args
        .tie_word_embeddings
        .unwrap_or(architecture(model_type)?.tie_default))
}

/// Which part of the model a process holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub layers: Range<usize>,
    /// Holds the token embedding (the first stage).
    pub embed: bool,
    /// Holds the final norm and the output head (the last stage).
    pub head: bool,
}

impl Shard {
    pub fn full(n_layers: usize) -> Shard {
        Shard {
            layers: 0..n_layers,
            embed: true,
            head: true,
        }
    }
}

enum Head {
    Tied(Embedding),
    Linear(Linear),
}

pub struct Model {
    pub args: ModelArgs,
    pub config: Value,
    pub shard: Shard,
    embed: Option<Embedding>,
    blocks: Vec<Box<dyn Block>>,
    norm: Option<RmsNorm>,
    head: Option<Head>,
    tied: bool,
}

impl Model {
    /// Builds the part of the model named by `shard` (the whole model when
    /// `None`). Only the weights of that part are ever read.
    pub fn load(weights: &Weights, shard: Option<Shard>) -> Result<Model> {
        let config = weights.config.clone();
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| weights.invalid("config.json has no model_type"))?;
        let arch = architecture(model_type)?;
        let args: ModelArgs = serde_json::from_value(config.clone())
            .map_err(|e| weights.invalid(format!("config.json: {e}")))?;
        if args.num_attention_heads <= 0 || args.hidden_size <= 0 || args.n_kv_heads() <= 0 {
            return Err(weights.invalid("config.json: sizes must be positive"));
        }
        let shard = shard.unwrap_or_else(|| Shard::full(args.num_hidden_layers));
        if shard.layers.end > args.num_hidden_layers || shard.layers.start > shard.layers.end {
            return Err(Error::InvalidArgument(format!(
                "layers {:?} are outside the model's {} layers",
                shard.layers, args.num_hidden_layers
            )));
        }
        let tied = args.tie_word_embeddings.unwrap_or(arch.tie_default);
        let h = args.hidden_size;
        let embed = if shard.embed {
            Some(Embedding::load(weights, "model.embed_tokens", h)?)
        } else {
            None
        };
        let blocks = shard
            .layers
            .clone()
            .map(|i| (arch.load_block)(&args, weights, i))
            .collect::<Result<Vec<_>>>()?;
        let (norm, head) = if shard.head {
            let norm = RmsNorm::load(weights, "model.norm", args.rms_norm_eps)?;
            let head = if tied {
                Head::Tied(Embedding::load(weights, "model.embed_tokens", h)?)
            } else {
                Head::Linear(Linear::load(weights, "lm_head", h, false)?)
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        Ok(Model {
            args,
            config,
            shard,
            embed,
            blocks,
            norm,
            head,
            tied,
        })
    }

    /// Whether the output head is the embedding matrix.
    pub fn tied(&self) -> bool {
        self.tied
    }

    /// A fresh cache for each held layer.
    pub fn make_cache(&self) -> Vec<KvCache> {
        (0..self.blocks.len()).map(|_| KvCache::new()).collect()
    }

    /// `[B, L]` token ids -> `[B, L, hidden]`.
    pub fn embed(&self, ids: &Array) -> Result<Array> {
        self.embed
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("this shard has no embedding".into()))?
            .forward(ids)
    }

    /// Runs the held blocks over `[B, L, hidden]` activations.
    pub fn forward_layers(&self, h: Array, caches: Option<&mut [KvCache]>) -> Result<Array> {
        let caches = match caches {
            Some(c) => Caches::Seq(c),
            None => Caches::None,
        };
        self.forward_layers_eager(h, caches, 0)
    }

    /// `forward_layers` on any of the cache stores, scheduling the work
    /// built so far every `every` blocks (0: never), so the device runs the
    /// first layers while the graph of the next ones is built. A pipeline
    /// stage, which must wait for its result before sending it on, uses this
    /// to hide graph-building time. The results are the same.
    pub fn forward_layers_eager(
        &self,
        mut h: Array,
        mut caches: Caches<'_>,
        every: usize,
    ) -> Result<Array> {
        if let Some(n) = caches.layers() {
            if n != self.blocks.len() {
                return Err(Error::InvalidArgument(format!(
                    "{n} caches for {} layers",
                    self.blocks.len()
                )));
            }
        }
        let mask = AttnMask::for_length(h.dim(1));
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, &mask, caches.layer(i))?;
            if every > 0 && (i + 1) % every == 0 && i + 1 < self.blocks.len() {
                crate::mlx::async_eval(&[&h])?;
            }
        }
        Ok(h)
    }

    /// One decode step of several sequences through this shard's layers:
    /// `h` is `[B, 1, hidden]`, row `b` for the sequence in slot
    /// `slots[b]` of `caches` (one `SlotCache` per layer). Scheduled every
    /// `every` blocks as in `forward_layers_eager`.
    pub fn forward_layers_rows(
        &self,
        h: Array,
        caches: &mut [SlotCache],
        slots: &[usize],
        every: usize,
    ) -> Result<Array> {
        if slots.len() != h.dim(0) as usize || h.dim(1) != 1 {
            return Err(Error::InvalidArgument(format!(
                "a batched step takes one token per sequence: {:?} for {} sequences",
                h.shape(),
                slots.len()
            )));
        }
        let first = caches.first().ok_or_else(|| {
            Error::InvalidArgument("a batched step needs this shard's caches".into())
        })?;
        let rows = Rows::new(first, slots)?;
        self.forward_layers_eager(h, Caches::Rows(caches, &rows), every)
    }

    /// Final norm and output head: `[B, L, hidden]` -> `[B, L, vocab]`.
    pub fn logits(&self, h: &Array) -> Result<Array> {
        let (Some(norm), Some(head)) = (&self.norm, &self.head) else {
            return Err(Error::InvalidArgument(
                "this shard has no output head".into(),
            ));
        };
        let h = norm.forward(h)?;
        match head {
            Head::Tied(e) => e.as_linear(&h),
            Head::Linear(l) => l.forward(&h),
        }
    }

    /// The whole model on `[B, L]` token ids: logits `[B, L, vocab]`.
    pub fn forward(&self, ids: &Array, caches: Option<&mut [KvCache]>) -> Result<Array> {
        let h = self.embed(ids)?;
        let h = self.forward_layers(h, caches)?;
        self.logits(&h)
    }

    /// Every array held.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v: Vec<&Array> = Vec::new();
        if let Some(e) = &self.embed {
            v.extend(e.weight.arrays());
        }
        for b in &self.blocks {
            v.extend(b.arrays());
        }
        if let Some(n) = &self.norm {
            v.push(&n.weight);
        }
        match &self.head {
            Some(Head::Tied(e)) if self.embed.is_none() => v.extend(e.weight.arrays()),
            Some(Head::Linear(l)) => v.extend(l.arrays()),
            _ => {}
        }
        v
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.arrays().iter().map(|a| a.nbytes()).sum()
    }

    /// Reads the held weights into memory now rather than on first use.
    pub fn materialize(&self) -> Result<()> {
        crate::mlx::eval(&self.arrays())
    }

    /// The dtype of the activations the embedding produces.
    pub fn activation_dtype(&self) -> Dtype {
        self.norm
            .as_ref()
            .map_or(Dtype::Float32, |n| n.weight.dtype())
    }
}

/// The weight-name prefix of block `i`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mlx::io::save_safetensors;
    use crate::weights::{resolve, Weights};

    /// A small llama in a safetensors file; every tensor has distinct values.
    pub(crate) fn write_llama(dir: &std::path::Path, layers: usize) {
        let (h, i, v) = (256, 512, 1024);
        let mut tensors: Vec<(String, Array)> = Vec::new();
        let mut add = |name: String, shape: &[i32]| {
            let n: i32 = shape.iter().product();
            let a = Array::arange(0.0, n as f64, 1.0, Dtype::Float32)
                .unwrap()
                .reshape(shape)
                .unwrap();
            let a = a.mul_scalar(1e-6 * (tensors.len() + 1) as f64).unwrap();
            tensors.push((name, a));
        };
        add("model.embed_tokens.weight".into(), &[v, h]);
        add("model.norm.weight".into(), &[h]);
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                add(format!("{p}.self_attn.{proj}.weight"), &[h, h]);
            }
            add(format!("{p}.mlp.gate_proj.weight"), &[i, h]);
            add(format!("{p}.mlp.up_proj.weight"), &[i, h]);
            add(format!("{p}.mlp.down_proj.weight"), &[h, i]);
            add(format!("{p}.input_layernorm.weight"), &[h]);
            add(format!("{p}.post_attention_layernorm.weight"), &[h]);
        }
        let refs: Vec<(&str, &Array)> = tensors.iter().map(|(n, a)| (n.as_str(), a)).collect();
        save_safetensors(&dir.join("model.safetensors"), &refs).unwrap();
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": h, "num_hidden_layers": layers,
            "intermediate_size": i, "num_attention_heads": 4, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5, "vocab_size": v, "tie_word_embeddings": true
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }

    #[test]
    fn a_shard_reads_only_its_own_layers() {
        let tmp = tempfile::tempdir().unwrap();
        write_llama(tmp.path(), 4);
        let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
        let _serial = crate::mlx::MEMORY_TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = crate::mlx::active_memory();
        let shard = Shard {
            layers: 1..2,
            embed: false,
            head: false,
        };
        let model = Model::load(&weights, Some(shard)).unwrap();
        model.materialize().unwrap();
        let layer_bytes = (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) * 4;
        assert_eq!(model.nbytes(), layer_bytes);
        let grew = crate::mlx::active_memory() - before;
        // One layer is about a fifth of the file; reading it all would be 5x.
        assert!(
            grew >= layer_bytes && grew < layer_bytes * 3 / 2,
            "grew {grew} for a {layer_bytes}-byte layer"
        );

        let err = Model::load(
            &weights,
            Some(Shard {
                layers: 3..5,
                embed: false,
                head: false,
            }),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("outside"), "{err}");
    }

    /// A 2-layer llama for the slot-cache tests, and the lock that keeps
    /// their buffers out of the memory tests' readings.
    fn slot_test_model() -> (std::sync::MutexGuard<'static, ()>, tempfile::TempDir, Model) {
        let serial = crate::mlx::MEMORY_TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        write_llama(tmp.path(), 2);
        let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
        let model = Model::load(&weights, None).unwrap();
        (serial, tmp, model)
    }

    /// `got` equals `want` within 1e-4 everywhere.
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_within(got, want, 1e-4, what);
    }

    /// `got` equals `want` within `tolerance` everywhere.
    pub(crate) fn assert_within(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            got.len() == want.len() && diff < tolerance,
            "{what} differs by {diff}"
        );
    }

    #[test]
    fn rows_at_the_same_position_batch_without_a_mask() {
        let (_serial, _tmp, model) = slot_test_model();
        let ids = |t: &[i32]| Array::from_slice(t, &[1, t.len() as i32]).unwrap();
        let values = |a: &Array| a.to_vec::<f32>().unwrap();
        let prompts: [&[i32]; 2] = [&[1, 2, 3], &[4, 5, 6]];
        let steps = [[7, 9], [8, 10]];
        let want: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|b| {
                let mut c = model.make_cache();
                model
                    .forward_layers(model.embed(&ids(prompts[b])).unwrap(), Some(&mut c))
                    .unwrap();
                steps[b]
                    .iter()
                    .map(|&t| {
                        let h = model.embed(&ids(&[t])).unwrap();
                        values(&model.forward_layers(h, Some(&mut c)).unwrap())
                    })
                    .collect()
            })
            .collect();
        let mut pool: Vec<SlotCache> = (0..2).map(|_| SlotCache::new()).collect();
        for (b, p) in prompts.iter().enumerate() {
            let h = model.embed(&ids(p)).unwrap();
            model
                .forward_layers_eager(h, Caches::Slot(&mut pool, b), 0)
                .unwrap();
        }
        // In slot order (a view of the buffer), then out of order (gathered).
        for (step, slots) in [[0usize, 1], [1, 0]].iter().enumerate() {
            assert!(!Rows::new(&pool[0], slots).unwrap().masked());
            let t: Vec<i32> = slots.iter().map(|&s| steps[s][step]).collect();
            let h = model
                .embed(&Array::from_slice(&t, &[2, 1]).unwrap())
                .unwrap();
            let got = model.forward_layers_rows(h, &mut pool, slots, 1).unwrap();
            for (b, &s) in slots.iter().enumerate() {
                let b = b as i32;
                let row = values(&got.slice_axis(0, b, b + 1).unwrap());
                assert_close(&row, &want[s][step], &format!("slot {s}, step {step}"));
            }
        }
    }

    #[test]
    fn slot_caches_give_what_own_caches_give_one_by_one_or_batched() {
        let (_serial, _tmp, model) = slot_test_model();
        let ids = |t: &[i32]| Array::from_slice(t, &[1, t.len() as i32]).unwrap();
        let rows = |t: &[i32]| Array::from_slice(t, &[t.len() as i32, 1]).unwrap();
        let values = |a: &Array| a.to_vec::<f32>().unwrap();
        let row = |a: &Array, b: i32| values(&a.slice_axis(0, b, b + 1).unwrap());
        // Three sequences of different lengths, then two decode steps each.
        let prompts: [&[i32]; 3] = [&[1, 2, 3, 4, 5], &[7], &[9, 8, 7]];
        let steps = [[11, 21, 31], [12, 22, 32], [13, 23, 33]];
        let want: Vec<Vec<Vec<f32>>> = (0..3)
            .map(|b| {
                let mut c = model.make_cache();
                let h = model.embed(&ids(prompts[b])).unwrap();
                let mut out = vec![values(&model.forward_layers(h, Some(&mut c)).unwrap())];
                for t in steps[b] {
                    let h = model.embed(&ids(&[t])).unwrap();
                    out.push(values(&model.forward_layers(h, Some(&mut c)).unwrap()));
                }
                out
            })
            .collect();
        let mut pool: Vec<SlotCache> = (0..2).map(|_| SlotCache::new()).collect();
        for (b, p) in prompts.iter().enumerate() {
            let h = model.embed(&ids(p)).unwrap();
            let got = model
                .forward_layers_eager(h, Caches::Slot(&mut pool, b), 0)
                .unwrap();
            assert_eq!(values(&got), want[b][0], "prefill of slot {b}");
        }
        // Some slots, out of order; one alone; then every slot.
        assert!(Rows::new(&pool[0], &[2, 0]).unwrap().masked());
        let h = model.embed(&rows(&[13, 11])).unwrap();
        let got = model.forward_layers_rows(h, &mut pool, &[2, 0], 1).unwrap();
        assert_eq!(got.shape(), vec![2, 1, 256]);
        assert_close(&row(&got, 0), &want[2][1], "slot 2, step 1");
        assert_close(&row(&got, 1), &want[0][1], "slot 0, step 1");
        let h = model.embed(&ids(&[12])).unwrap();
        let got = model
            .forward_layers_eager(h, Caches::Slot(&mut pool, 1), 0)
            .unwrap();
        assert_close(&values(&got), &want[1][1], "slot 1, step 1");
        let h = model.embed(&rows(&[21, 22, 23])).unwrap();
        let got = model
            .forward_layers_rows(h, &mut pool, &[0, 1, 2], 0)
            .unwrap();
        for b in 0..3 {
            assert_close(
                &row(&got, b),
                &want[b as usize][2],
                &format!("slot {b}, step 2"),
            );
        }
        // A run of slots not starting at the first (attended as a view).
        let h = model.embed(&rows(&[32, 33])).unwrap();
        let got = model.forward_layers_rows(h, &mut pool, &[1, 2], 2).unwrap();
        assert_close(&row(&got, 0), &want[1][3], "slot 1, step 3");
        assert_close(&row(&got, 1), &want[2][3], "slot 2, step 3");
        assert_eq!(
            (pool[0].length(0), pool[1].length(1), pool[1].length(2)),
            (7, 4, 6)
        );
        // A slot copied out and into another continues the same.
        let mut own: Vec<KvCache> = pool.iter().map(|c| c.copy_out(0).unwrap()).collect();
        for (c, o) in pool.iter_mut().zip(&own) {
            c.clear_slot(1);
            c.copy_in(1, o).unwrap();
        }
        let h = model.embed(&ids(&[5])).unwrap();
        let a = model.forward_layers(h.clone(), Some(&mut own)).unwrap();
        let b = model
            .forward_layers_eager(h, Caches::Slot(&mut pool, 1), 0)
            .unwrap();
        assert_eq!(values(&a), values(&b));
        // Refused: not one token per sequence, a slot twice, an unknown slot.
        let h = model.embed(&ids(&[1, 2])).unwrap();
        assert!(model.forward_layers_rows(h, &mut pool, &[0], 0).is_err());
        let h = model.embed(&rows(&[1, 2])).unwrap();
        assert!(model
            .forward_layers_rows(h.clone(), &mut pool, &[0, 0], 0)
            .is_err());
        assert!(model.forward_layers_rows(h, &mut pool, &[0, 7], 0).is_err());
    }

    #[test]
    fn stages_chain_to_the_whole_model() {
        let tmp = tempfile::tempdir().unwrap();
        write_llama(tmp.path(), 3);
        let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
        let full = Model::load(&weights, None).unwrap();
        let first = Model::load(
            &weights,
            Some(Shard {
                layers: 0..1,
                embed: true,
                head: false,
            }),
        )
        .unwrap();
        let last = Model::load(
            &weights,
            Some(Shard {
                layers: 1..3,
                embed: false,
                head: true,
            }),
        )
        .unwrap();
        let ids = Array::from_slice(&[1i32, 5, 9, 2], &[1, 4]).unwrap();
        let want = full.forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
        let h = first
            .forward_layers(first.embed(&ids).unwrap(), None)
            .unwrap();
        let got = last
            .logits(&last.forward_layers(h, None).unwrap())
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(want, got);
        assert!(first
            .logits(&Array::zeros(&[1, 1, 256], Dtype::Float32).unwrap())
            .is_err());
    }

    #[test]
    fn unknown_architectures_name_the_supported_ones() {
        let tmp = tempfile::tempdir().unwrap();
        write_llama(tmp.path(), 1);
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
                .unwrap();
        config["model_type"] = "gpt_neox".into();
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
        let err = Model::load(&weights, None).err().unwrap().to_string();
        assert!(
            err.contains("gpt_neox") && err.contains("llama") && err.contains("phi3"),
            "{err}"
        );
    }
}
