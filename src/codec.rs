//! The tensor codec: activations on the wire between pipeline stages.
//!
//! Exact mode (`COMPRESSION_NONE`) keeps shape, dtype (bfloat16 included)
//! and bytes. Encoding shares MLX's buffer instead of copying it; decoding
//! hands the received bytes to MLX, which adopts them in place where its
//! allocator can wrap host memory and copies them once otherwise.
//!
//! Int8 mode (`COMPRESSION_INT8`) sends one int8 per element and one float32
//! absmax scale per row of the last axis (per token), computed with MLX ops
//! on the device; decoding restores the original float dtype.
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::mlx::{self, Array, Dtype};
use crate::proto::Compression;

/// The most axes a tensor on the wire may have.
const MAX_AXES: usize = 8;

static ADOPTED: AtomicU64 = AtomicU64::new(0);
static COPIED: AtomicU64 = AtomicU64::new(0);
static UNALIGNED: AtomicU64 = AtomicU64::new(0);

/// How `decode` has brought received buffers (data, scales) into MLX since
/// the process started, one count per buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    /// Used in place: MLX's allocator wrapped the bytes (Metal).
    pub adopted: u64,
    /// Copied once, by MLX, whose allocator could not wrap them (the CPU
    /// and CUDA allocators wrap no foreign memory).
    pub copied: u64,
    /// Copied because the bytes were not aligned for their dtype (rare).
    pub unaligned: u64,
}

/// The counts of `decode`'s buffers so far.
pub fn decode_counts() -> DecodeCounts {
    DecodeCounts {
        adopted: ADOPTED.load(Ordering::Relaxed),
        copied: COPIED.load(Ordering::Relaxed),
        unaligned: UNALIGNED.load(Ordering::Relaxed),
    }
}

/// A tensor as it travels: shape, dtype and little-endian row-major bytes,
/// exact or int8 with one float32 scale per row of the last axis. Made
/// checked (`new`): its bytes fit its shape, so decoding cannot misread
/// them.
#[derive(Clone, Debug)]
pub struct Encoded {
    shape: Vec<i32>,
    dtype: Dtype,
    data: Bytes,
    /// Int8 mode: the per-row scales (`data` holds int8 values).
    scales: Option<Bytes>,
}

impl Encoded {
    /// A received tensor of `shape` and `dtype` (the decoded dtype), int8
    /// when `scales` are given, refused with `Error::InvalidArgument`
    /// naming what is wrong unless its bytes fit.
    pub fn new(shape: &[i64], dtype: Dtype, data: Bytes, scales: Option<Bytes>) -> Result<Encoded> {
        let checked = checked_shape(shape)?;
        let too_large = || {
            Error::InvalidArgument(format!(
                "tensor shape {shape:?} of {} is too large",
                dtype.name()
            ))
        };
        let n = count(&checked).ok_or_else(too_large)?;
        match &scales {
            None => {
                let need = n.checked_mul(dtype.size() as u64).ok_or_else(too_large)?;
                if data.len() as u64 != need {
                    return Err(Error::InvalidArgument(format!(
                        "tensor data has {} bytes, shape {shape:?} of {} needs {need}",
                        data.len(),
                        dtype.name()
                    )));
                }
            }
            Some(s) => {
                if !dtype.is_float() {
                    return Err(Error::InvalidArgument(format!(
                        "an int8-compressed tensor must decode to a float dtype, not {}",
                        dtype.name()
                    )));
                }
                let Some((_, rows_shape)) = checked.split_last() else {
                    return Err(Error::InvalidArgument(
                        "an int8-compressed tensor needs at least one axis".into(),
                    ));
                };
                if data.len() as u64 != n {
                    return Err(Error::InvalidArgument(format!(
                        "int8 tensor data has {} bytes, shape {shape:?} needs {n}",
                        data.len(),
                    )));
                }
                let rows = count(rows_shape).ok_or_else(too_large)?;
                let need = rows.checked_mul(4).ok_or_else(too_large)?;
                if s.len() as u64 != need {
                    return Err(Error::InvalidArgument(format!(
                        "int8 tensor has {} bytes of scales, the {rows} rows of shape {shape:?} need {need}",
                        s.len(),
                    )));
                }
            }
        }
        Ok(Encoded {
            shape: checked,
            dtype,
            data,
            scales,
        })
    }

    pub fn shape(&self) -> &[i32] {
        &self.shape
    }

    /// The dtype it decodes to.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The bytes: the elements, or with `scales` their int8 values.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The per-row float32 scales of an int8 tensor; `None`: exact.
    pub fn scales(&self) -> Option<&Bytes> {
        self.scales.as_ref()
    }

    /// The tensor in MLX. Exact data goes to MLX without a copy of ours:
    /// MLX adopts it where it can and copies it once otherwise; bytes
    /// misaligned for the dtype are copied.
    pub fn decode(&self) -> Result<Array> {
        if self.shape.contains(&0) {
            return Array::zeros(&self.shape, self.dtype);
        }
        match &self.scales {
            None => import(&self.data, &self.shape, self.dtype),
            Some(s) => {
                let q = import(&self.data, &self.shape, Dtype::Int8)?;
                let mut scales_shape = self.shape.clone();
                *scales_shape.last_mut().unwrap() = 1;
                let scales = import(s, &scales_shape, Dtype::Float32)?;
                dequantize(&q, &scales, self.dtype)
            }
        }
    }

    /// Exact rows of one dtype joined along the first axis, as bytes (no
    /// MLX work); `None` when any is compressed, or dtypes or row shapes
    /// differ.
    pub fn join(parts: &[&Encoded]) -> Option<Encoded> {
        let first = parts.first()?;
        let fits = |e: &&Encoded| {
            e.scales.is_none()
                && e.dtype == first.dtype
                && e.shape.len() == first.shape.len()
                && e.shape[1..] == first.shape[1..]
        };
        if first.shape.is_empty() || !parts.iter().all(fits) {
            return None;
        }
        let mut data = Vec::with_capacity(first.data.len() * parts.len());
        let mut shape = first.shape.clone();
        shape[0] = 0;
        for p in parts {
            data.extend_from_slice(&p.data);
            shape[0] += p.shape[0];
        }
        Some(Encoded {
            shape,
            dtype: first.dtype,
            data: data.into(),
            scales: None,
        })
    }
}

/// Activations on their way to the wire, built with the step that makes
/// them and evaluated with it (`arrays`), so that int8 quantization is no
/// separate launch; `encode` then reads them.
pub enum Outgoing {
    /// Sent as they are.
    Exact(Array),
    /// Int8 values and their per-row float32 scales (`[..., 1]`), for a
    /// tensor of `shape` and `dtype`.
    Int8 {
        shape: Vec<i32>,
        dtype: Dtype,
        q: Array,
        scales: Array,
    },
}

/// Refuses a dtype the wire does not carry.
fn sendable(d: Dtype) -> Result<()> {
    use Dtype::*;
    match d {
        Float32 | Float16 | Bfloat16 | Int32 | Uint32 | Int8 => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "{} tensors cannot be sent: the wire carries float32, float16, \
             bfloat16, int32, uint32 and int8",
            other.name()
        ))),
    }
}

impl Outgoing {
    /// `a` to send with `compression`. Int8 mode needs a float tensor with
    /// at least one axis; an empty one is sent exact, there being nothing
    /// to compress. Non-finite values do not survive int8.
    pub fn new(a: &Array, compression: Compression) -> Result<Outgoing> {
        sendable(a.dtype())?;
        if compression == Compression::None || a.size() == 0 {
            return Ok(Outgoing::Exact(a.clone()));
        }
        if !a.dtype().is_float() {
            return Err(Error::InvalidArgument(format!(
                "int8 compression needs a float tensor, not {}",
                a.dtype().name()
            )));
        }
        if a.ndim() == 0 {
            return Err(Error::InvalidArgument(
                "int8 compression needs a tensor with at least one axis".into(),
            ));
        }
        let (q, scales) = quantize(a)?;
        Ok(Outgoing::Int8 {
            shape: a.shape().to_vec(),
            dtype: a.dtype(),
            q,
            scales,
        })
    }

    /// What to evaluate before `encode`.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Outgoing::Exact(a) => vec![a],
            Outgoing::Int8 { q, scales, .. } => vec![q, scales],
        }
    }

    /// Row `b` of the first axis (one sequence of a batch), which stays.
    pub fn row(&self, b: i32) -> Result<Outgoing> {
        Ok(match self {
            Outgoing::Exact(a) => Outgoing::Exact(a.slice_axis(0, b, b + 1)?),
            Outgoing::Int8 {
                shape,
                dtype,
                q,
                scales,
            } => {
                let mut shape = shape.clone();
                shape[0] = 1;
                Outgoing::Int8 {
                    shape,
                    dtype: *dtype,
                    q: q.slice_axis(0, b, b + 1)?,
                    scales: scales.slice_axis(0, b, b + 1)?,
                }
            }
        })
    }

    /// The evaluated tensor to send. Exact mode shares MLX's buffer (a
    /// non-contiguous view is made contiguous first).
    pub fn encode(&self) -> Result<Encoded> {
        Ok(match self {
            Outgoing::Exact(a) => Encoded {
                shape: a.shape().to_vec(),
                dtype: a.dtype(),
                data: a.host_bytes()?,
                scales: None,
            },
            Outgoing::Int8 {
                shape,
                dtype,
                q,
                scales,
            } => Encoded {
                shape: shape.clone(),
                dtype: *dtype,
                data: q.host_bytes()?,
                scales: Some(scales.host_bytes()?),
            },
        })
    }
}

/// Encodes `a` to send (see `Outgoing`).
pub fn encode(a: &Array, compression: Compression) -> Result<Encoded> {
    let out = Outgoing::new(a, compression)?;
    mlx::eval(&out.arrays())?;
    out.encode()
}

/// Per-row absmax int8: `q = round(x / s)` with `s = max|x| / 127` over the
/// last axis. Returns `q` (int8) and `s` (float32, `[..., 1]`), unevaluated.
fn quantize(a: &Array) -> Result<(Array, Array)> {
    let f32_scalar = |v: f32| Array::scalar(v as f64, Dtype::Float32);
    let x = a.astype(Dtype::Float32)?;
    let scales = x.abs()?.max(-1, true)?.div(&f32_scalar(127.0)?)?;
    // A zero row has scale 0; dividing it by the smallest normal float
    // instead keeps it 0 rather than NaN.
    let divisor = scales.maximum(&f32_scalar(f32::MIN_POSITIVE)?)?;
    let q = x
        .div(&divisor)?
        .round()?
        .minimum(&f32_scalar(127.0)?)?
        .maximum(&f32_scalar(-127.0)?)?
        .astype(Dtype::Int8)?;
    Ok((q, scales))
}

/// Int8 values `q` times their per-row `scales` (float32), as `dtype`.
pub fn dequantize(q: &Array, scales: &Array, dtype: Dtype) -> Result<Array> {
    q.astype(Dtype::Float32)?.mul(scales)?.astype(dtype)
}

/// The shape as MLX takes it: at most `MAX_AXES` axes of 0 to `i32::MAX`.
fn checked_shape(shape: &[i64]) -> Result<Vec<i32>> {
    if shape.len() > MAX_AXES {
        return Err(Error::InvalidArgument(format!(
            "tensor has {} axes, at most {MAX_AXES} are allowed",
            shape.len()
        )));
    }
    shape
        .iter()
        .map(|&d| {
            i32::try_from(d).ok().filter(|&d| d >= 0).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "tensor shape {shape:?} has an axis of {d}, outside 0 to {}",
                    i32::MAX
                ))
            })
        })
        .collect()
}

/// The number of elements of `shape`, `None` on overflow.
fn count(shape: &[i32]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
}

/// Hands received bytes to MLX (validated: their length fits the shape).
fn import(bytes: &Bytes, shape: &[i32], dtype: Dtype) -> Result<Array> {
    let (a, adopted) = Array::from_shared_bytes(bytes.clone(), shape, dtype)?;
    let counter = if adopted {
        &ADOPTED
    } else if !(bytes.as_ptr() as usize).is_multiple_of(dtype.size()) {
        &UNALIGNED
    } else {
        &COPIED
    };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use crate::wire::{decode, dtype_from_proto, dtype_to_proto};

    /// `a` encoded as the wire carries it.
    fn encode(a: &Array, compression: Compression) -> Result<proto::Tensor> {
        super::encode(a, compression).map(proto::Tensor::from)
    }

    const WIRE_DTYPES: [Dtype; 6] = [
        Dtype::Float32,
        Dtype::Float16,
        Dtype::Bfloat16,
        Dtype::Int32,
        Dtype::Uint32,
        Dtype::Int8,
    ];

    /// Random-looking values in [-50, 50], evaluated.
    fn sample(shape: &[i32], dtype: Dtype) -> Array {
        let n: i32 = shape.iter().product();
        let x = Array::arange(0.0, n as f64, 1.0, Dtype::Float32)
            .unwrap()
            .mul_scalar(0.37)
            .unwrap()
            .sin()
            .unwrap()
            .mul_scalar(50.0)
            .unwrap()
            .reshape(shape)
            .unwrap();
        // Integers go through int32, so uint32 wraps instead of casting
        // negative floats.
        let x = if dtype.is_float() {
            x.astype(dtype)
        } else {
            x.astype(Dtype::Int32).unwrap().astype(dtype)
        }
        .unwrap();
        x.eval().unwrap();
        x
    }

    fn tensor(shape: &[i64], dtype: proto::DType, data: Bytes) -> proto::Tensor {
        proto::Tensor {
            shape: shape.to_vec(),
            dtype: dtype as i32,
            data,
            compression: Compression::None as i32,
            scales: Bytes::new(),
        }
    }

    fn refusal(t: &proto::Tensor) -> String {
        let err = decode(t).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn dtypes_map_both_ways() {
        for d in WIRE_DTYPES {
            assert_eq!(
                dtype_from_proto(dtype_to_proto(d).unwrap() as i32).unwrap(),
                d
            );
        }
        for d in [Dtype::Float64, Dtype::Bool, Dtype::Int64, Dtype::Uint8] {
            let err = dtype_to_proto(d).unwrap_err().to_string();
            assert!(err.contains(d.name()), "{err}");
        }
        assert!(dtype_from_proto(0)
            .unwrap_err()
            .to_string()
            .contains("unspecified"));
        assert!(dtype_from_proto(42).unwrap_err().to_string().contains("42"));
    }

    #[test]
    fn exact_round_trips_keep_shape_dtype_and_bytes() {
        for dtype in WIRE_DTYPES {
            for shape in [
                &[][..],
                &[1],
                &[3, 5, 7],
                &[2, 1, 4097],
                &[1, 1, 0],
                &[0, 4],
            ] {
                let a = sample(shape, dtype);
                let bytes = a.to_bytes().unwrap();
                let t = encode(&a, Compression::None).unwrap();
                assert_eq!(t.compression, Compression::None as i32);
                assert_eq!(t.shape, shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
                assert_eq!(t.data[..], bytes[..], "{dtype:?} {shape:?}");
                let b = decode(&t).unwrap();
                assert_eq!(b.shape(), shape);
                assert_eq!(b.dtype(), dtype);
                assert_eq!(b.to_bytes().unwrap(), bytes, "{dtype:?} {shape:?}");
            }
        }
    }

    #[test]
    fn bfloat16_travels_as_its_own_bytes() {
        // -0, a subnormal, -inf, a NaN with a payload, 1.0078125 (needs all
        // 7 mantissa bits), the largest finite value.
        let bits: [u16; 6] = [0x8000, 0x0001, 0xff80, 0x7fc1, 0x3f81, 0x7f7f];
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let a = Array::from_bytes(&raw, &[2, 3], Dtype::Bfloat16).unwrap();
        let t = encode(&a, Compression::None).unwrap();
        assert_eq!(t.dtype, proto::DType::DtypeBfloat16 as i32);
        assert_eq!(t.data[..], raw[..]);
        let b = decode(&t).unwrap();
        assert_eq!(b.dtype(), Dtype::Bfloat16);
        assert_eq!(b.to_bytes().unwrap(), raw);
    }

    #[test]
    fn encode_shares_the_evaluated_buffer() {
        let a = sample(&[4, 5, 7], Dtype::Float16);
        let expected = a.to_bytes().unwrap();
        let t = encode(&a, Compression::None).unwrap();
        assert_eq!(t.data.as_ptr(), a.host_bytes().unwrap().as_ptr());
        // A row-contiguous slice shares it too, at its offset.
        let rows = a.slice_axis(0, 1, 3).unwrap();
        let s = encode(&rows, Compression::None).unwrap();
        assert_eq!(s.data.as_ptr(), t.data[5 * 7 * 2..].as_ptr());
        assert_eq!(s.data[..], expected[5 * 7 * 2..3 * 5 * 7 * 2]);
        // The bytes keep the buffer alive after the array goes, on any thread.
        drop((a, rows));
        let back = std::thread::spawn(move || decode(&t).unwrap().to_bytes().unwrap())
            .join()
            .unwrap();
        assert_eq!(back, expected);
    }

    #[test]
    fn non_contiguous_arrays_are_sent_row_major() {
        let a = sample(&[4, 6], Dtype::Bfloat16);
        let at = a.t().unwrap();
        let t = encode(&at, Compression::None).unwrap();
        assert_eq!(t.shape, vec![6, 4]);
        assert_ne!(t.data.as_ptr(), a.host_bytes().unwrap().as_ptr());
        assert_eq!(t.data[..], at.contiguous().unwrap().to_bytes().unwrap()[..]);
        let b = decode(&t).unwrap();
        assert_eq!(b.to_bytes().unwrap(), at.to_bytes().unwrap());
        // A broadcast array as well.
        let row = sample(&[1, 5], Dtype::Float32);
        let wide = row
            .add(&Array::zeros(&[3, 5], Dtype::Float32).unwrap())
            .unwrap();
        let rows = decode(&encode(&wide, Compression::None).unwrap()).unwrap();
        assert_eq!(rows.to_bytes().unwrap(), wide.to_bytes().unwrap());
    }

    #[test]
    fn decode_lends_the_bytes_to_mlx_without_a_copy_of_its_own() {
        // Page-aligned, whole pages of float32: the most any MLX allocator
        // adopts in place.
        const PAGE: usize = 16384;
        let values: Vec<f32> = (0..PAGE / 4).map(|i| (i as f32 * 0.1).sin()).collect();
        let mut backing = vec![0u8; 3 * PAGE];
        let off = backing.as_ptr().align_offset(PAGE);
        for (dst, v) in backing[off..off + PAGE].chunks_mut(4).zip(&values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        let data = Bytes::from(backing).slice(off..off + PAGE);
        let t = tensor(
            &[1, (PAGE / 4) as i64],
            proto::DType::DtypeFloat32,
            data.clone(),
        );
        let before = decode_counts();
        let b = decode(&t).unwrap();
        let after = decode_counts();
        drop(t);
        assert_eq!(b.to_vec::<f32>().unwrap(), values);
        if b.host_bytes().unwrap().as_ptr() == data.as_ptr() {
            // Adopted: MLX holds the bytes until it frees the buffer.
            assert!(after.adopted > before.adopted);
            assert!(!data.is_unique());
            drop(b);
            assert!(data.is_unique());
        } else {
            // Copied by MLX (its CPU and CUDA allocators wrap no foreign
            // memory), which let go of the bytes at once.
            assert!(after.copied > before.copied);
            assert!(data.is_unique());
        }
    }

    #[test]
    fn misaligned_bytes_are_copied_and_counted() {
        let a = sample(&[3, 5], Dtype::Float32);
        let raw = a.to_bytes().unwrap();
        let mut v = vec![0u8; raw.len() + 8];
        // An address one past a multiple of 4 is misaligned for float32.
        let off = v.as_ptr().align_offset(4) + 1;
        v[off..off + raw.len()].copy_from_slice(&raw);
        let data = Bytes::from(v).slice(off..off + raw.len());
        assert_eq!(data.as_ptr() as usize % 4, 1);
        let before = decode_counts().unaligned;
        let b = decode(&tensor(&[3, 5], proto::DType::DtypeFloat32, data)).unwrap();
        assert_eq!(b.to_bytes().unwrap(), raw);
        assert!(decode_counts().unaligned > before);
    }

    #[test]
    fn malformed_tensors_are_refused_with_the_reason() {
        let t = encode(&sample(&[2, 3], Dtype::Bfloat16), Compression::None).unwrap();
        let with = |f: &dyn Fn(&mut proto::Tensor)| {
            let mut bad = t.clone();
            f(&mut bad);
            refusal(&bad)
        };
        let err = with(&|t| t.data = t.data.slice(..10));
        assert_eq!(
            err,
            "tensor data has 10 bytes, shape [2, 3] of bfloat16 needs 12"
        );
        let err = with(&|t| t.shape = vec![3, 3]);
        assert_eq!(
            err,
            "tensor data has 12 bytes, shape [3, 3] of bfloat16 needs 18"
        );
        let err = with(&|t| t.shape = vec![]);
        assert_eq!(
            err,
            "tensor data has 12 bytes, shape [] of bfloat16 needs 2"
        );
        assert_eq!(with(&|t| t.dtype = 42), "unknown tensor dtype 42");
        assert_eq!(with(&|t| t.dtype = 0), "tensor dtype is unspecified");
        assert_eq!(with(&|t| t.compression = 7), "unknown tensor compression 7");
        let err = with(&|t| t.shape = vec![2, -3]);
        assert!(err.contains("axis of -3"), "{err}");
        let err = with(&|t| t.shape = vec![1 << 40]);
        assert!(err.contains("axis of 1099511627776"), "{err}");
        let err = with(&|t| t.shape = vec![i32::MAX as i64; 3]);
        assert!(err.contains("too large"), "{err}");
        let err = with(&|t| t.shape = vec![1; 9]);
        assert!(err.contains("9 axes"), "{err}");
        let err = with(&|t| t.scales = Bytes::from_static(&[0; 4]));
        assert!(err.contains("no scales"), "{err}");

        let q = encode(&sample(&[2, 3], Dtype::Float32), Compression::Int8).unwrap();
        let with = |f: &dyn Fn(&mut proto::Tensor)| {
            let mut bad = q.clone();
            f(&mut bad);
            refusal(&bad)
        };
        let err = with(&|t| t.scales = t.scales.slice(..4));
        assert_eq!(
            err,
            "int8 tensor has 4 bytes of scales, the 2 rows of shape [2, 3] need 8"
        );
        let err = with(&|t| t.data = t.data.slice(..5));
        assert_eq!(err, "int8 tensor data has 5 bytes, shape [2, 3] needs 6");
        let err = with(&|t| t.dtype = proto::DType::DtypeInt32 as i32);
        assert!(err.contains("float dtype, not int32"), "{err}");
        let err = with(&|t| t.shape = vec![]);
        assert!(err.contains("at least one axis"), "{err}");
        // Refusals leave the binding in working order.
        assert_eq!(decode(&q).unwrap().shape(), vec![2, 3]);
    }

    #[test]
    fn encode_refuses_what_the_wire_cannot_carry() {
        let f64s = Array::zeros(&[2], Dtype::Float64).unwrap();
        assert!(encode(&f64s, Compression::None).is_err());
        let ints = sample(&[2, 3], Dtype::Int32);
        let err = encode(&ints, Compression::Int8).unwrap_err().to_string();
        assert!(err.contains("float tensor, not int32"), "{err}");
        let scalar = Array::scalar(1.5, Dtype::Float32).unwrap();
        assert!(encode(&scalar, Compression::Int8).is_err());
    }

    #[test]
    fn int8_error_is_within_half_a_step_per_token() {
        const D: usize = 4096;
        let mut a = sample(&[1, 5, D as i32], Dtype::Float32);
        // One all-zero token must not turn into NaN.
        let zero = Array::zeros(&[1, 1, D as i32], Dtype::Float32).unwrap();
        a = a
            .slice_update(&zero, &[0, 2, 0], &[1, 3, D as i32])
            .unwrap();
        let t = encode(&a, Compression::Int8).unwrap();
        assert_eq!(t.compression, Compression::Int8 as i32);
        assert_eq!(t.dtype, proto::DType::DtypeFloat32 as i32);
        assert_eq!(t.data.len(), 5 * D);
        assert_eq!(t.scales.len(), 5 * 4);
        let b = decode(&t).unwrap();
        assert_eq!(b.shape(), vec![1, 5, D as i32]);
        assert_eq!(b.dtype(), Dtype::Float32);
        let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let scales: Vec<f32> = t
            .scales
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (mut err2, mut norm2) = (0f64, 0f64);
        for (row, &s) in scales.iter().enumerate() {
            let r = row * D..(row + 1) * D;
            let absmax = x[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((s - absmax / 127.0).abs() <= s * 1e-6, "{s} vs {absmax}");
            for (u, v) in x[r.clone()].iter().zip(&y[r]) {
                assert!(v.is_finite());
                assert!((u - v).abs() <= s * (0.5 + 1e-5), "{u} vs {v}, scale {s}");
                err2 += ((u - v) as f64).powi(2);
                norm2 += (*u as f64).powi(2);
            }
        }
        assert_eq!(scales[2], 0.0);
        assert!(y[2 * D..3 * D].iter().all(|&v| v == 0.0));
        let rel = (err2 / norm2).sqrt();
        assert!(rel < 0.01, "relative error {rel}");
    }

    #[test]
    fn int8_keeps_shape_and_float_dtype() {
        for dtype in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
            for shape in [&[7][..], &[3, 5, 7], &[2, 1, 4097]] {
                let a = sample(shape, dtype);
                let t = encode(&a, Compression::Int8).unwrap();
                let rows: i32 = shape[..shape.len() - 1].iter().product();
                assert_eq!(t.scales.len(), rows as usize * 4);
                let b = decode(&t).unwrap();
                assert_eq!(b.shape(), shape);
                assert_eq!(b.dtype(), dtype);
                let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
                let err = x.iter().zip(&y).map(|(u, v)| (u - v).abs());
                // Half a step of at most 50 / 127, plus half a bfloat16 ulp
                // at 50 for rounding the result back.
                let bound = 50.0 / 127.0 / 2.0 + 0.125 + 1e-4;
                assert!(err.fold(0f32, f32::max) <= bound, "{dtype:?} {shape:?}");
            }
        }
        // An all-zero tensor, and an empty one (sent exact).
        let zeros = Array::zeros(&[2, 3, 8], Dtype::Bfloat16).unwrap();
        let b = decode(&encode(&zeros, Compression::Int8).unwrap()).unwrap();
        assert_eq!(b.to_bytes().unwrap(), zeros.to_bytes().unwrap());
        let empty = Array::zeros(&[1, 0, 8], Dtype::Float16).unwrap();
        let t = encode(&empty, Compression::Int8).unwrap();
        assert_eq!(t.compression, Compression::None as i32);
        let b = decode(&t).unwrap();
        assert_eq!((b.shape(), b.dtype()), (vec![1, 0, 8], Dtype::Float16));
    }
}
