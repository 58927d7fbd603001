//! Phi-3: fused `qkv_proj` and `gate_up_proj`, optional partial rotary
//! embeddings, and "su"/"longrope" rope scaling.
use serde_json::Value;

use super::base::{Attention, DecoderBlock, GateUp, Heads, Linear, Mlp, Qkv, Rope};
use super::{layer_prefix, Architecture, Block, ModelArgs};
use crate::error::{Error, Result};
use crate::weights::Weights;

pub const ARCH: Architecture = Architecture {
    tie_default: false,
    load_block,
};

fn rope(args: &ModelArgs, head_dim: i32) -> Result<Rope> {
    let dims = (head_dim as f32 * args.partial_rotary_factor.unwrap_or(1.0)) as i32;
    let scaling = args.rope_scaling.as_ref().filter(|v| !v.is_null());
    let kind = scaling.and_then(|s| s.get("type")).and_then(Value::as_str);
    match kind {
        None => Rope::from_config(dims, args.rope_theta, args.rope_traditional, None, None),
        Some("su") | Some("longrope") => {
            let mut sc = scaling.unwrap().clone();
            let orig = args.original_max_position_embeddings.unwrap_or(4096);
            sc["original_max_position_embeddings"] = orig.into();
            Rope::from_config(
                dims,
                args.rope_theta,
                false,
                Some(&sc),
                Some(args.max_position_embeddings.unwrap_or(131072)),
            )
        }
        Some("linear") => {
            Rope::from_config(dims, args.rope_theta, args.rope_traditional, scaling, None)
        }
        Some(other) => Err(Error::InvalidArgument(format!(
            "phi3 rope_scaling type {other:?} is not supported"
        ))),
    }
}

fn load_block(args: &ModelArgs, w: &Weights, i: usize) -> Result<Box<dyn Block>> {
    let p = layer_prefix(i);
    let h = args.hidden_size;
    let hd = h / args.num_attention_heads;
    let heads = Heads {
        n_heads: args.num_attention_heads,
        n_kv_heads: args.n_kv_heads(),
        head_dim: hd,
    };
    let self_attn = Attention {
        qkv: Qkv::Fused(Linear::load(
            w,
            &format!("{p}.self_attn.qkv_proj"),
            h,
            false,
        )?),
        o_proj: Linear::load(
            w,
            &format!("{p}.self_attn.o_proj"),
            heads.n_heads * hd,
            false,
        )?,
        q_norm: None,
        k_norm: None,
        heads,
        scale: (hd as f32).powf(-0.5),
        rope: rope(args, hd)?,
    };
    let mlp = Mlp {
        gate_up: GateUp::Fused(Linear::load(w, &format!("{p}.mlp.gate_up_proj"), h, false)?),
        down_proj: Linear::load(
            w,
            &format!("{p}.mlp.down_proj"),
            args.intermediate_size,
            false,
        )?,
    };
    Ok(Box::new(DecoderBlock::load(
        w,
        &p,
        args.rms_norm_eps,
        self_attn,
        mlp,
    )?))
}
