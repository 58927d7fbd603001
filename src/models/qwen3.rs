//! Qwen3: the llama block with RMS norms on each query and key head, an
//! explicit `head_dim`, no biases, and (for small sizes) tied embeddings.
use super::base::{load_separate_mlp, Attention, AttentionLayout, DecoderBlock};
use super::{layer_prefix, Architecture, Block, ModelArgs};
use crate::error::Result;
use crate::weights::Weights;

pub const ARCH: Architecture = Architecture {
    tie_default: true,
    load_block,
};

fn load_block(args: &ModelArgs, w: &Weights, i: usize) -> Result<Box<dyn Block>> {
    let p = layer_prefix(i);
    let layout = AttentionLayout {
        head_dim: args.head_dim(),
        qkv_bias: false,
        o_bias: false,
        qk_norm: true,
        rope_traditional: false,
    };
    let self_attn = Attention::load_standard(args, w, &format!("{p}.self_attn"), layout)?;
    let mlp = load_separate_mlp(args, w, &format!("{p}.mlp"), false)?;
    let block = DecoderBlock::load(w, &p, args.rms_norm_eps, self_attn, mlp)?;
    Ok(Box::new(block))
}
