//! Llama 2/3 (and SmolLM, Mistral): grouped-query attention with rotary
//! embeddings (llama3 frequency scaling included), SwiGLU MLP, optional
//! biases (`attention_bias`, `mlp_bias`).
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
        qkv_bias: args.attention_bias,
        o_bias: args.attention_bias,
        qk_norm: false,
        rope_traditional: args.rope_traditional,
    };
    let self_attn = Attention::load_standard(args, w, &format!("{p}.self_attn"), layout)?;
    let mlp = load_separate_mlp(args, w, &format!("{p}.mlp"), args.mlp_bias)?;
    let block = DecoderBlock::load(w, &p, args.rms_norm_eps, self_attn, mlp)?;
    Ok(Box::new(block))
}
