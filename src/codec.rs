//! The tensor codec: activations on the wire between pipeline stages.
//! Exact mode keeps shape, dtype (bfloat16 included) and bytes; int8 mode
//! sends one int8 per element and one float32 scale per token.
use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};
use crate::proto::{self, Compression};

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
                "{} tensors cannot be sent",
                other.name()
            )))
        }
    })
}

pub fn dtype_from_proto(d: i32) -> Result<Dtype> {
    Ok(match proto::DType::try_from(d) {
        Ok(proto::DType::DtypeFloat32) => Dtype::Float32,
        Ok(proto::DType::DtypeFloat16) => Dtype::Float16,
        Ok(proto::DType::DtypeBfloat16) => Dtype::Bfloat16,
        Ok(proto::DType::DtypeInt32) => Dtype::Int32,
        Ok(proto::DType::DtypeUint32) => Dtype::Uint32,
        Ok(proto::DType::DtypeInt8) => Dtype::Int8,
        _ => return Err(Error::InvalidArgument(format!("unknown tensor dtype {d}"))),
    })
}

pub fn encode(a: &Array, compression: Compression) -> Result<proto::Tensor> {
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    let dtype = dtype_to_proto(a.dtype())? as i32;
    match compression {
        Compression::None => Ok(proto::Tensor {
            shape,
            dtype,
            data: a.to_bytes()?.into(),
            compression: 0,
            scales: Default::default(),
        }),
        Compression::Int8 => {
            if !a.dtype().is_float() {
                return Err(Error::InvalidArgument(
                    "int8 compression needs a float tensor".into(),
                ));
            }
            let x = a.astype(Dtype::Float32)?;
            let scale = x
                .abs()?
                .max(-1, true)?
                .div(&Array::scalar(127.0, Dtype::Float32)?)?;
            let safe = scale.maximum(&Array::scalar(f32::MIN_POSITIVE as f64, Dtype::Float32)?)?;
            let q = x.div(&safe)?.round()?.astype(Dtype::Int8)?;
            Ok(proto::Tensor {
                shape,
                dtype,
                data: q.to_bytes()?.into(),
                compression: Compression::Int8 as i32,
                scales: scale.to_bytes()?.into(),
            })
        }
    }
}

pub fn decode(t: &proto::Tensor) -> Result<Array> {
    let dtype = dtype_from_proto(t.dtype)?;
    if t.shape.is_empty() || t.shape.len() > 8 {
        return Err(Error::InvalidArgument(format!(
            "a tensor needs 1 to 8 axes, got {}",
            t.shape.len()
        )));
    }
    let mut n: u64 = 1;
    let mut shape = Vec::with_capacity(t.shape.len());
    for &d in &t.shape {
        if !(0..=i32::MAX as i64).contains(&d) {
            return Err(Error::InvalidArgument(format!(
                "bad tensor shape {:?}",
                t.shape
            )));
        }
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= 1 << 34)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("tensor shape {:?} is too large", t.shape))
            })?;
        shape.push(d as i32);
    }
    match Compression::try_from(t.compression) {
        Ok(Compression::None) => {
            let need = n * dtype.size() as u64;
            if t.data.len() as u64 != need {
                return Err(Error::InvalidArgument(format!(
                    "tensor data has {} bytes, shape {:?} of {} needs {need}",
                    t.data.len(),
                    t.shape,
                    dtype.name()
                )));
            }
            Array::from_bytes(&t.data, &shape, dtype)
        }
        Ok(Compression::Int8) => {
            if !dtype.is_float() {
                return Err(Error::InvalidArgument(
                    "int8 compression applies to float tensors only".into(),
                ));
            }
            if t.data.len() as u64 != n {
                return Err(Error::InvalidArgument(format!(
                    "int8 tensor data has {} bytes, shape {:?} needs {n}",
                    t.data.len(),
                    t.shape
                )));
            }
            let rows = n / (*shape.last().unwrap()).max(1) as u64;
            if t.scales.len() as u64 != rows * 4 {
                return Err(Error::InvalidArgument(format!(
                    "int8 tensor has {} bytes of scales, {rows} rows need {}",
                    t.scales.len(),
                    rows * 4
                )));
            }
            let q = Array::from_bytes(&t.data, &shape, Dtype::Int8)?;
            let mut sshape = shape.clone();
            *sshape.last_mut().unwrap() = 1;
            let scales = Array::from_bytes(&t.scales, &sshape, Dtype::Float32)?;
            q.astype(Dtype::Float32)?.mul(&scales)?.astype(dtype)
        }
        Err(_) => Err(Error::InvalidArgument(format!(
            "unknown tensor compression {}",
            t.compression
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(shape: &[i32], dtype: Dtype) -> Array {
        let n: i32 = shape.iter().product();
        Array::arange(0.0, n as f64, 1.0, Dtype::Float32)
            .unwrap()
            .mul_scalar(0.37)
            .unwrap()
            .sin()
            .unwrap()
            .mul_scalar(50.0)
            .unwrap()
            .reshape(shape)
            .unwrap()
            .astype(dtype)
            .unwrap()
    }

    #[test]
    fn exact_round_trips_keep_shape_dtype_and_bytes() {
        for dtype in [
            Dtype::Float32,
            Dtype::Float16,
            Dtype::Bfloat16,
            Dtype::Int32,
            Dtype::Uint32,
            Dtype::Int8,
        ] {
            for shape in [&[1][..], &[3, 5, 7], &[2, 1, 4097], &[1, 1, 0]] {
                let a = sample(shape, dtype);
                let t = encode(&a, Compression::None).unwrap();
                assert_eq!(t.data.len(), a.nbytes());
                let b = decode(&t).unwrap();
                assert_eq!(b.shape(), a.shape());
                assert_eq!(b.dtype(), dtype);
                assert_eq!(
                    b.to_bytes().unwrap(),
                    a.to_bytes().unwrap(),
                    "{dtype:?} {shape:?}"
                );
            }
        }
        // A non-contiguous view is sent in row-major order.
        let a = sample(&[4, 6], Dtype::Bfloat16).t().unwrap();
        let b = decode(&encode(&a, Compression::None).unwrap()).unwrap();
        assert_eq!(
            b.to_bytes().unwrap(),
            a.contiguous().unwrap().to_bytes().unwrap()
        );
    }

    #[test]
    fn malformed_tensors_are_refused_with_the_reason() {
        let t = encode(&sample(&[2, 3], Dtype::Bfloat16), Compression::None).unwrap();
        let mut short = t.clone();
        short.data = short.data.slice(..10);
        let err = decode(&short).unwrap_err().to_string();
        assert!(
            err.contains("10 bytes") && err.contains("bfloat16") && err.contains("12"),
            "{err}"
        );
        let mut bad = t.clone();
        bad.dtype = 42;
        assert!(decode(&bad).unwrap_err().to_string().contains("dtype"));
        let mut neg = t.clone();
        neg.shape = vec![2, -3];
        assert!(decode(&neg).is_err());
        let mut huge = t.clone();
        huge.shape = vec![1 << 30, 1 << 30];
        assert!(decode(&huge).is_err());
        let mut none = t.clone();
        none.shape = vec![];
        assert!(decode(&none).is_err());
        let mut comp = t.clone();
        comp.compression = 7;
        assert!(decode(&comp).is_err());
        let mut q = encode(&sample(&[2, 3], Dtype::Float32), Compression::Int8).unwrap();
        q.scales = q.scales.slice(..4);
        assert!(decode(&q).unwrap_err().to_string().contains("scales"));
    }

    #[test]
    fn int8_error_is_within_half_a_step_per_token() {
        let mut a = sample(&[1, 5, 4096], Dtype::Float32);
        // One all-zero token must not turn into NaN.
        let zero = Array::zeros(&[1, 1, 4096], Dtype::Float32).unwrap();
        a = a.slice_update(&zero, &[0, 2, 0], &[1, 3, 4096]).unwrap();
        let t = encode(&a, Compression::Int8).unwrap();
        assert_eq!(t.data.len(), 5 * 4096);
        assert_eq!(t.scales.len(), 5 * 4);
        let b = decode(&t).unwrap();
        assert_eq!(b.shape(), vec![1, 5, 4096]);
        assert_eq!(b.dtype(), Dtype::Float32);
        let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        for row in 0..5 {
            let r = &x[row * 4096..(row + 1) * 4096];
            let step = r.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (u, v) in r.iter().zip(&y[row * 4096..(row + 1) * 4096]) {
                assert!(v.is_finite());
                assert!((u - v).abs() <= step / 2.0 + 1e-6, "{u} vs {v}");
            }
        }
        let bf =
            decode(&encode(&sample(&[2, 8], Dtype::Bfloat16), Compression::Int8).unwrap()).unwrap();
        assert_eq!(bf.dtype(), Dtype::Bfloat16);
    }
}
