//! Wire types and domain types: the one place where proto messages become
//! the types the engine and the coordinator work with, and back.
//!
//! A message from the wire is checked once, here, as it becomes a domain
//! value: what needs no state (sizes, ids, dtypes, byte counts) is refused
//! before the engine sees it, so the engine checks only what depends on the
//! stage it holds (the vocabulary, the hidden size, its caches).
use crate::codec::Encoded;
use crate::description::{ModelDescription, MAX_TOKENIZER_BYTES};
use crate::device::Capabilities;
use crate::error::{Error, Result};
use crate::mlx::Dtype;
use crate::proto;
use crate::sample::{ProcessorConfig, SamplerConfig, Sampling};
use crate::worker::{Step, MAX_POSITIONS};

/// The longest sequence or prefix id taken.
pub const MAX_ID: usize = 256;

/// Prefix ids one step may ask a stage to forget at most (the coordinator
/// queues 1024 at most).
pub const MAX_FORGET: usize = 4096;

/// The wire dtype of an MLX dtype; the ones the wire lacks are refused.
pub fn dtype_to_proto(d: Dtype) -> Result<proto::DType> {
    Ok(match d {
        Dtype::Float32 => proto::DType::DtypeFloat32,
        Dtype::Float16 => proto::DType::DtypeFloat16,
        Dtype::Bfloat16 => proto::DType::DtypeBfloat16,
        Dtype::Int32 => proto::DType::DtypeInt32,
        Dtype::Uint32 => proto::DType::DtypeUint32,
        Dtype::Int8 => proto::DType::DtypeInt8,
        other => {
            return Err(Error::InvalidArgument(format!(
                "{} tensors cannot be sent: the wire carries float32, float16, \
                 bfloat16, int32, uint32 and int8",
                other.name()
            )))
        }
    })
}

/// The MLX dtype of a wire dtype, as it arrives (`Tensor.dtype`, an `i32`):
/// unspecified and unknown values are refused.
pub fn dtype_from_proto(d: i32) -> Result<Dtype> {
    Ok(match proto::DType::try_from(d) {
        Ok(proto::DType::DtypeFloat32) => Dtype::Float32,
        Ok(proto::DType::DtypeFloat16) => Dtype::Float16,
        Ok(proto::DType::DtypeBfloat16) => Dtype::Bfloat16,
        Ok(proto::DType::DtypeInt32) => Dtype::Int32,
        Ok(proto::DType::DtypeUint32) => Dtype::Uint32,
        Ok(proto::DType::DtypeInt8) => Dtype::Int8,
        Ok(proto::DType::DtypeUnspecified) => {
            return Err(Error::InvalidArgument("tensor dtype is unspecified".into()))
        }
        Err(_) => return Err(Error::InvalidArgument(format!("unknown tensor dtype {d}"))),
    })
}

/// Decodes a tensor from the wire, refusing (never panicking on) a
/// malformed one with `Error::InvalidArgument` naming what is wrong.
pub fn decode(t: &proto::Tensor) -> Result<crate::mlx::Array> {
    Encoded::try_from(t)?.decode()
}

/// A tensor from the wire, its dtype, encoding and byte counts checked.
impl TryFrom<&proto::Tensor> for Encoded {
    type Error = Error;

    fn try_from(t: &proto::Tensor) -> Result<Encoded> {
        let dtype = dtype_from_proto(t.dtype)?;
        let scales = match proto::Compression::try_from(t.compression) {
            Ok(proto::Compression::None) => {
                if !t.scales.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "an uncompressed tensor carries no scales, got {} bytes",
                        t.scales.len()
                    )));
                }
                None
            }
            Ok(proto::Compression::Int8) => Some(t.scales.clone()),
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown tensor compression {}",
                    t.compression
                )))
            }
        };
        Encoded::new(&t.shape, dtype, t.data.clone(), scales)
    }
}

impl From<&Encoded> for proto::Tensor {
    fn from(e: &Encoded) -> proto::Tensor {
        proto::Tensor {
            shape: e.shape().iter().map(|&d| d as i64).collect(),
            // Every dtype an `Encoded` holds has a wire dtype.
            dtype: dtype_to_proto(e.dtype()).map_or(0, |d| d as i32),
            data: e.data().clone(),
            compression: match e.scales() {
                None => proto::Compression::None,
                Some(_) => proto::Compression::Int8,
            } as i32,
            scales: e.scales().cloned().unwrap_or_default(),
        }
    }
}

impl From<Encoded> for proto::Tensor {
    fn from(e: Encoded) -> proto::Tensor {
        proto::Tensor::from(&e)
    }
}

/// What a device can do, as `DeviceInfo` reports it.
impl From<Capabilities> for proto::Capabilities {
    fn from(c: Capabilities) -> proto::Capabilities {
        proto::Capabilities {
            name: c.name,
            device_type: c.device_type,
            chip: c.chip,
            gpu_cores: c.gpu_cores,
            memory_total: c.memory_total,
            memory_available: c.memory_available,
            matmul_gflops: c.matmul_gflops,
            bandwidth_gbs: c.bandwidth_gbs,
        }
    }
}

impl From<proto::Capabilities> for Capabilities {
    fn from(c: proto::Capabilities) -> Capabilities {
        Capabilities {
            name: c.name,
            device_type: c.device_type,
            chip: c.chip,
            gpu_cores: c.gpu_cores,
            memory_total: c.memory_total,
            memory_available: c.memory_available,
            matmul_gflops: c.matmul_gflops,
            bandwidth_gbs: c.bandwidth_gbs,
        }
    }
}

/// How a sequence samples, as its first step carries it.
impl From<&Sampling> for proto::SamplingParams {
    fn from(s: &Sampling) -> proto::SamplingParams {
        let (sampler, procs) = (&s.sampler, &s.processors);
        proto::SamplingParams {
            temp: sampler.temp,
            top_p: sampler.top_p,
            min_p: sampler.min_p,
            min_tokens_to_keep: sampler.min_tokens_to_keep,
            top_k: sampler.top_k,
            seed: sampler.seed,
            repetition_penalty: procs.repetition_penalty,
            repetition_context_size: procs.repetition_context_size as u32,
            presence_penalty: procs.presence_penalty,
            presence_context_size: procs.presence_context_size as u32,
            frequency_penalty: procs.frequency_penalty,
            frequency_context_size: procs.frequency_context_size as u32,
            logit_bias: procs.logit_bias.iter().copied().collect(),
        }
    }
}

impl From<&proto::SamplingParams> for Sampling {
    fn from(p: &proto::SamplingParams) -> Sampling {
        // Unset context sizes take mlx-lm's default of 20.
        let ctx = |n: u32| if n == 0 { 20 } else { n as usize };
        let mut bias: Vec<(u32, f32)> = p.logit_bias.iter().map(|(k, v)| (*k, *v)).collect();
        bias.sort_by_key(|(k, _)| *k);
        Sampling {
            sampler: SamplerConfig {
                temp: p.temp,
                top_p: p.top_p,
                min_p: p.min_p,
                min_tokens_to_keep: p.min_tokens_to_keep.max(1),
                top_k: p.top_k,
                seed: p.seed,
            },
            processors: ProcessorConfig {
                logit_bias: bias,
                repetition_penalty: p.repetition_penalty,
                repetition_context_size: ctx(p.repetition_context_size),
                presence_penalty: p.presence_penalty,
                presence_context_size: ctx(p.presence_context_size),
                frequency_penalty: p.frequency_penalty,
                frequency_context_size: ctx(p.frequency_context_size),
            },
        }
    }
}

/// A non-empty id of at most `MAX_ID` characters, or `None` when empty.
fn id(s: String, what: &str) -> Result<Option<String>> {
    if s.len() > MAX_ID {
        return Err(Error::InvalidArgument(format!(
            "{what} ids are at most {MAX_ID} characters"
        )));
    }
    Ok(Some(s).filter(|s| !s.is_empty()))
}

/// A step from the wire, checked for everything that needs no stage.
impl TryFrom<proto::ForwardRequest> for Step {
    type Error = Error;

    fn try_from(r: proto::ForwardRequest) -> Result<Step> {
        let sequence = id(r.sequence_id, "sequence")?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a sequence id of 1 to {MAX_ID} characters is required"
            ))
        })?;
        if r.forget_prefixes.len() > MAX_FORGET {
            return Err(Error::InvalidArgument(format!(
                "{} prefixes to forget in one step: at most {MAX_FORGET} are taken",
                r.forget_prefixes.len()
            )));
        }
        let forget_prefixes = r
            .forget_prefixes
            .into_iter()
            .filter_map(|p| id(p, "prefix").transpose())
            .collect::<Result<Vec<_>>>()?;
        if r.tokens.len() > MAX_POSITIONS {
            return Err(Error::InvalidArgument(format!(
                "a step of {} token positions: at most {MAX_POSITIONS} are taken",
                r.tokens.len()
            )));
        }
        let hidden = r.hidden.as_ref().map(Encoded::try_from).transpose()?;
        if let Some(h) = &hidden {
            let s = h.shape();
            if s.len() != 3 || s[0] != 1 || !(1..=MAX_POSITIONS as i32).contains(&s[1]) {
                return Err(Error::InvalidArgument(format!(
                    "activations of shape {s:?} do not fit: [1, L, hidden] expected, L from 1 to {MAX_POSITIONS}"
                )));
            }
            if !h.dtype().is_float() {
                return Err(Error::InvalidArgument(format!(
                    "activations must be float32, float16 or bfloat16, not {}",
                    h.dtype().name()
                )));
            }
        }
        Ok(Step {
            sequence,
            offset: r.offset,
            tokens: r.tokens,
            hidden,
            sample: r.sample,
            logprobs: r.logprobs,
            sampling: r.sampling.as_ref().map(Sampling::from),
            max_length: r.max_length,
            prefix: id(r.prefix_id, "prefix")?,
            keep_as: id(r.keep_as, "prefix")?,
            forget_prefixes,
            decode_ahead: r.decode_ahead,
            stage_micros: r.stage_micros,
            ring_credit: r.ring_credit,
        })
    }
}

/// A step as it goes on to the next stage.
impl From<Step> for proto::ForwardRequest {
    fn from(s: Step) -> proto::ForwardRequest {
        proto::ForwardRequest {
            sequence_id: s.sequence,
            offset: s.offset,
            tokens: s.tokens,
            hidden: s.hidden.map(proto::Tensor::from),
            sample: s.sample,
            sampling: s.sampling.as_ref().map(proto::SamplingParams::from),
            logprobs: s.logprobs,
            max_length: s.max_length,
            prefix_id: s.prefix.unwrap_or_default(),
            keep_as: s.keep_as.unwrap_or_default(),
            decode_ahead: s.decode_ahead,
            stage_micros: s.stage_micros,
            ring_credit: s.ring_credit,
            forget_prefixes: s.forget_prefixes,
        }
    }
}

/// The step the first stage runs on a token come round the ring.
impl From<&proto::RingToken> for Step {
    fn from(t: &proto::RingToken) -> Step {
        Step {
            sequence: t.sequence_id.clone(),
            offset: t.offset,
            tokens: vec![t.token],
            sample: true,
            logprobs: t.logprobs.is_some(),
            decode_ahead: t.decode_ahead.saturating_sub(1),
            ..Step::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(seq: &str) -> proto::ForwardRequest {
        proto::ForwardRequest {
            sequence_id: seq.into(),
            tokens: vec![1, 2],
            ..Default::default()
        }
    }

    fn refusal(r: proto::ForwardRequest) -> String {
        match Step::try_from(r) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("not refused as invalid: {:?}", other.map(|s| s.sequence)),
        }
    }

    #[test]
    fn a_step_goes_to_the_domain_and_back_unchanged() {
        let mut sampling = proto::SamplingParams {
            temp: 0.7,
            top_k: 5,
            min_tokens_to_keep: 2,
            seed: Some(9),
            repetition_penalty: Some(1.1),
            repetition_context_size: 12,
            presence_context_size: 20,
            frequency_context_size: 20,
            ..Default::default()
        };
        sampling.logit_bias.insert(3, -1.0);
        let r = proto::ForwardRequest {
            offset: 4,
            sample: true,
            logprobs: true,
            sampling: Some(sampling),
            max_length: 64,
            prefix_id: "p".into(),
            keep_as: "k".into(),
            decode_ahead: 3,
            stage_micros: vec![10, 20],
            ring_credit: 2,
            forget_prefixes: vec!["old".into()],
            ..request("s")
        };
        let back = proto::ForwardRequest::from(Step::try_from(r.clone()).unwrap());
        assert_eq!(back, r);
    }

    #[test]
    fn unset_context_sizes_and_keep_counts_take_their_defaults() {
        let s = Sampling::from(&proto::SamplingParams::default());
        assert_eq!(s.processors.repetition_context_size, 20);
        assert_eq!(s.sampler.min_tokens_to_keep, 1);
    }

    #[test]
    fn steps_out_of_bounds_are_refused_with_the_reason() {
        assert!(refusal(request("")).contains("sequence id"));
        assert!(refusal(request(&"x".repeat(MAX_ID + 1))).contains("sequence"));
        let long = proto::ForwardRequest {
            keep_as: "k".repeat(MAX_ID + 1),
            ..request("s")
        };
        assert!(refusal(long).contains("at most 256"));
        let forget = proto::ForwardRequest {
            forget_prefixes: vec!["p".into(); MAX_FORGET + 1],
            ..request("s")
        };
        assert!(refusal(forget).contains("prefixes to forget"));
        let tokens = proto::ForwardRequest {
            tokens: vec![0; MAX_POSITIONS + 1],
            ..request("s")
        };
        assert!(refusal(tokens).contains("token positions"));
    }

    #[test]
    fn activations_must_be_one_float_sequence() {
        let tensor = |shape: Vec<i64>, dtype: proto::DType| proto::Tensor {
            data: vec![0u8; shape.iter().product::<i64>() as usize * 4].into(),
            shape,
            dtype: dtype as i32,
            ..Default::default()
        };
        let with = |t: proto::Tensor| proto::ForwardRequest {
            hidden: Some(t),
            ..request("s")
        };
        let f32s = proto::DType::DtypeFloat32;
        assert!(Step::try_from(with(tensor(vec![1, 2, 8], f32s))).is_ok());
        assert!(refusal(with(tensor(vec![2, 1, 8], f32s))).contains("[1, L, hidden]"));
        assert!(refusal(with(tensor(vec![1, 0, 8], f32s))).contains("[1, L, hidden]"));
        assert!(refusal(with(tensor(vec![1, 8], f32s))).contains("[1, L, hidden]"));
        let ints = with(tensor(vec![1, 2, 8], proto::DType::DtypeInt32));
        assert!(refusal(ints).contains("float32"));
        // Bytes that do not fit the shape never reach the engine.
        let mut short = tensor(vec![1, 2, 8], f32s);
        short.data = short.data.slice(..60);
        assert!(refusal(with(short)).contains("bytes"));
    }
}

impl TryFrom<&ModelDescription> for proto::ModelDescription {
    type Error = Error;
    fn try_from(d: &ModelDescription) -> Result<Self> {
        Ok(proto::ModelDescription {
            config_json: serde_json::to_string(&d.config)?,
            footprint_json: serde_json::to_string(&d.footprint)?,
            tokenizer_files: d
                .tokenizer_files
                .iter()
                .map(|(k, v)| (k.clone(), bytes::Bytes::from(v.clone())))
                .collect(),
        })
    }
}

impl TryFrom<proto::ModelDescription> for ModelDescription {
    type Error = Error;
    fn try_from(d: proto::ModelDescription) -> Result<Self> {
        let bad = |what: &str, e: serde_json::Error| {
            Error::InvalidArgument(format!("a worker's model description: {what}: {e}"))
        };
        let tokenizer_bytes: usize = d.tokenizer_files.values().map(|b| b.len()).sum();
        if tokenizer_bytes > MAX_TOKENIZER_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a worker's model description has {tokenizer_bytes} bytes of tokenizer files"
            )));
        }
        Ok(ModelDescription {
            config: serde_json::from_str(&d.config_json).map_err(|e| bad("config", e))?,
            footprint: serde_json::from_str(&d.footprint_json).map_err(|e| bad("footprint", e))?,
            tokenizer_files: d
                .tokenizer_files
                .into_iter()
                .map(|(k, v)| (k, v.to_vec()))
                .collect(),
        })
    }
}
