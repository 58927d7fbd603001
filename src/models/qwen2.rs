//! Qwen2 / Qwen2.5: the llama block with biases on the q/k/v projections
//! (none on the output projection), head size fixed by the hidden size.
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
        head_dim: args.hidden_size / args.num_attention_heads,
        qkv_bias: true,
        o_bias: false,
        qk_norm: false,
        rope_traditional: args.rope_traditional,
    };
    let self_attn = Attention::load_standard(args, w, &format!("{p}.self_attn"), layout)?;
    let mlp = load_separate_mlp(args, w, &format!("{p}.mlp"), false)?;
    let block = DecoderBlock::load(w, &p, args.rms_norm_eps, self_attn, mlp)?;
    Ok(Box::new(block))
}
