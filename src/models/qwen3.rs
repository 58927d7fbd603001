//! Qwen3: the llama block with RMS norms on each query and key head, an
//! explicit `head_dim`, no biases, and (for small sizes) tied embeddings.
use super::base::{
    load_separate_attention, load_separate_mlp, Attention, DecoderBlock, RmsNorm, Rope,
};
use super::{layer_prefix, Architecture, Block, ModelArgs};
use crate::error::Result;
use crate::weights::Weights;

pub const ARCH: Architecture = Architecture {
    tie_default: true,
    load_block,
};

fn load_block(args: &ModelArgs, w: &Weights, i: usize) -> Result<Box<dyn Block>> {
    let p = layer_prefix(i);
    let a = format!("{p}.self_attn");
    let hd = args.head_dim();
    let (qkv, o_proj, heads) = load_separate_attention(args, w, &a, hd, false, false)?;
    let rope = Rope::from_config(
        hd,
        args.rope_theta,
        false,
        args.rope_scaling.as_ref(),
        args.max_position_embeddings,
    )?;
    let self_attn = Attention {
        qkv,
        o_proj,
        q_norm: Some(RmsNorm::load(w, &format!("{a}.q_norm"), args.rms_norm_eps)?),
        k_norm: Some(RmsNorm::load(w, &format!("{a}.k_norm"), args.rms_norm_eps)?),
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
