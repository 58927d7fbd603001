//! What each part of a model weighs, from its tensors' shapes and dtypes,
//! read without loading a weight: what a plan places on the devices.
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::mlx::Dtype;
use crate::models::ModelArgs;
use crate::weights::Weights;

/// What the parts of a model weigh, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Footprint {
    /// Weights of each block (`model.layers.{i}.*`).
    pub layer_bytes: Vec<u64>,
    /// The token embedding (`model.embed_tokens.*`), held by the first stage.
    pub embed_bytes: u64,
    /// The output head held by the last stage: `lm_head.*`, or for a tied
    /// model the embedding again.
    pub head_bytes: u64,
    /// The final norm (`model.norm.*`), held by the last stage.
    pub norm_bytes: u64,
    /// Whether the head is the embedding matrix: a stage holding both holds
    /// it once; a last stage without the embedding holds its own copy.
    pub tied: bool,
    /// KV cache bytes per token of each block: 2 * kv heads * head dim *
    /// activation dtype size.
    pub kv_bytes_per_token: Vec<u64>,
}

impl Footprint {
    /// Weighs a model from its tensors' shapes and dtypes, without reading
    /// them (the tensor table knows their size).
    pub fn from_weights(w: &Weights, args: &ModelArgs, tied: bool) -> Footprint {
        let n = args.num_hidden_layers;
        let mut fp = Footprint {
            layer_bytes: vec![0; n],
            tied,
            ..Footprint::default()
        };
        let mut lm_head = 0;
        for (name, info) in w.infos() {
            let b = info.nbytes();
            if let Some(rest) = name.strip_prefix("model.layers.") {
                let i = rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
                if let Some(slot) = i.and_then(|i| fp.layer_bytes.get_mut(i)) {
                    *slot += b;
                }
            } else if name.starts_with("model.embed_tokens.") {
                fp.embed_bytes += b;
            } else if name.starts_with("lm_head.") {
                lm_head += b;
            } else if name.starts_with("model.norm.") {
                fp.norm_bytes += b;
            }
        }
        fp.head_bytes = if tied { fp.embed_bytes } else { lm_head };
        // Activations (and so the cache) take the dtype the embedding
        // produces: its scales' for a quantized embedding.
        let act = w
            .info("model.embed_tokens.scales")
            .or_else(|| w.info("model.embed_tokens.weight"))
            .or_else(|| w.info("model.norm.weight"))
            .map(|a| a.dtype)
            .filter(|d| d.is_float())
            .unwrap_or(Dtype::Float16);
        let per_token = 2 * args.n_kv_heads().max(0) as u64 * args.head_dim().max(0) as u64;
        fp.kv_bytes_per_token = vec![per_token * act.size() as u64; n];
        fp
    }

    pub fn n_layers(&self) -> usize {
        self.layer_bytes.len()
    }

    /// Weight bytes of a stage holding `layers`, the embedding if `embed`
    /// and the final norm and head if `head`.
    pub fn weight_bytes(&self, layers: Range<usize>, embed: bool, head: bool) -> u64 {
        let mut b: u64 = self.layer_bytes[layers].iter().sum();
        if embed {
            b += self.embed_bytes;
        }
        if head {
            b += self.norm_bytes;
            if !(self.tied && embed) {
                b += self.head_bytes;
            }
        }
        b
    }

    /// KV cache bytes of `layers` for `tokens` tokens.
    pub fn kv_bytes(&self, layers: Range<usize>, tokens: u64) -> u64 {
        self.kv_bytes_per_token[layers].iter().sum::<u64>() * tokens
    }

    /// Weights of the whole model in one process.
    pub fn total_weight_bytes(&self) -> u64 {
        self.weight_bytes(0..self.n_layers(), true, true)
    }

    /// Bytes a stage reads per decoded token: its layers and the head (the
    /// embedding lookup reads one row, which does not count).
    pub(super) fn read_bytes(&self, layers: Range<usize>, head: bool) -> u64 {
        let mut b: u64 = self.layer_bytes[layers].iter().sum();
        if head {
            b += self.norm_bytes + self.head_bytes;
        }
        b
    }
}
