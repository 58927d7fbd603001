//! Qwen2 / Qwen2.5: the llama block with biases on the q/k/v projections
//! (none on the output projection), head size fixed by the hidden size.
use super::base::{load_separate_attention, load_separate_mlp, Attention, DecoderBlock, Rope};
use super::{layer_prefix, Architecture, Block, ModelArgs};
use crate::error::Result;
use crate::weights::Weights;

pub const ARCH: Architecture = Architecture {
    tie_default: true,
    load_block,
};

fn load_block(args: &ModelArgs, w: &Weights, i: usize) -> Result<Box<dyn Block>> {
    let p = layer_prefix(i);
    let hd = args.hidden_size / args.num_attention_heads;
    let (qkv, o_proj, heads) =
        load_separate_attention(args, w, &format!("{p}.self_attn"), hd, true, false)?;
    let rope = Rope::from_config(
        hd,
        args.rope_theta,
        args.rope_traditional,
        args.rope_scaling.as_ref(),
        args.max_position_embeddings,
    )?;
    let self_attn = Attention {
        qkv,
        o_proj,
        q_norm: None,
        k_norm: None,
        heads,
        scale: (hd as f32).powf(-0.5),
        rope,
    };
    let mlp = load_separate_mlp(args, w, &format!("{p}.mlp"), false)?;
    Ok(Box::new(DecoderBlock::load(
        w,
        &p,
        args.rms_norm_eps,
        self_attn,
        mlp,
    )?))
}
