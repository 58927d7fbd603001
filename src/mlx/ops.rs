//! Operations on `Array`, each one MLX op. Names and defaults follow MLX's
//! Python API so model code reads like mlx-lm's.
use std::ffi::CString;
use std::os::raw::c_int;

use super::array::{make, Array, Dtype};
use super::ffi::{self, Arr, CArr};
use crate::error::Result;

#[repr(i32)]
enum Binary {
    Add = 0,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    Power,
    Less,
    LessEqual,
    Greater,
    GreaterEqual,
    Equal,
    LogicalAnd,
    LogicalOr,
    Matmul,
}

#[repr(i32)]
enum Unary {
    Neg = 0,
    Exp,
    Log,
    Sigmoid,
    Sqrt,
    Rsqrt,
    Abs,
    LogicalNot,
    Cos,
    Sin,
    Contiguous,
    Square,
    Round,
}

#[repr(i32)]
enum Reduce {
    Sum = 0,
    Max,
    Min,
    Logsumexp,
    Argmax,
    Mean,
}

/// Reduce over every axis.
pub const ALL_AXES: i32 = i32::MIN;

fn binary(op: Binary, a: &Array, b: &Array) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_binary(o, op as c_int, a.raw(), b.raw()) })
}

fn unary(op: Unary, a: &Array) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_unary(o, op as c_int, a.raw()) })
}

fn reduce(op: Reduce, a: &Array, axis: i32, keepdims: bool) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_reduce(o, op as c_int, a.raw(), axis, keepdims) })
}

fn raws(arrays: &[&Array]) -> Vec<Arr> {
    arrays.iter().map(|a| a.raw() as Arr).collect()
}

impl Array {
    pub fn add(&self, b: &Array) -> Result<Array> {
        binary(Binary::Add, self, b)
    }
    pub fn sub(&self, b: &Array) -> Result<Array> {
        binary(Binary::Sub, self, b)
    }
    pub fn mul(&self, b: &Array) -> Result<Array> {
        binary(Binary::Mul, self, b)
    }
    pub fn div(&self, b: &Array) -> Result<Array> {
        binary(Binary::Div, self, b)
    }
    pub fn maximum(&self, b: &Array) -> Result<Array> {
        binary(Binary::Maximum, self, b)
    }
    pub fn minimum(&self, b: &Array) -> Result<Array> {
        binary(Binary::Minimum, self, b)
    }
    pub fn power(&self, b: &Array) -> Result<Array> {
        binary(Binary::Power, self, b)
    }
    pub fn less(&self, b: &Array) -> Result<Array> {
        binary(Binary::Less, self, b)
    }
    pub fn less_equal(&self, b: &Array) -> Result<Array> {
        binary(Binary::LessEqual, self, b)
    }
    pub fn greater(&self, b: &Array) -> Result<Array> {
        binary(Binary::Greater, self, b)
    }
    pub fn greater_equal(&self, b: &Array) -> Result<Array> {
        binary(Binary::GreaterEqual, self, b)
    }
    pub fn equal(&self, b: &Array) -> Result<Array> {
        binary(Binary::Equal, self, b)
    }
    pub fn logical_and(&self, b: &Array) -> Result<Array> {
        binary(Binary::LogicalAnd, self, b)
    }
    pub fn logical_or(&self, b: &Array) -> Result<Array> {
        binary(Binary::LogicalOr, self, b)
    }
    pub fn matmul(&self, b: &Array) -> Result<Array> {
        binary(Binary::Matmul, self, b)
    }

    /// Multiplies by a scalar of this array's dtype (a Python `x * 0.5`).
    pub fn mul_scalar(&self, v: f64) -> Result<Array> {
        self.mul(&Array::scalar(v, self.dtype())?)
    }
    pub fn add_scalar(&self, v: f64) -> Result<Array> {
        self.add(&Array::scalar(v, self.dtype())?)
    }

    pub fn neg(&self) -> Result<Array> {
        unary(Unary::Neg, self)
    }
    pub fn exp(&self) -> Result<Array> {
        unary(Unary::Exp, self)
    }
    pub fn log(&self) -> Result<Array> {
        unary(Unary::Log, self)
    }
    pub fn sigmoid(&self) -> Result<Array> {
        unary(Unary::Sigmoid, self)
    }
    pub fn sqrt(&self) -> Result<Array> {
        unary(Unary::Sqrt, self)
    }
    pub fn rsqrt(&self) -> Result<Array> {
        unary(Unary::Rsqrt, self)
    }
    pub fn abs(&self) -> Result<Array> {
        unary(Unary::Abs, self)
    }
    pub fn logical_not(&self) -> Result<Array> {
        unary(Unary::LogicalNot, self)
    }
    pub fn cos(&self) -> Result<Array> {
        unary(Unary::Cos, self)
    }
    pub fn sin(&self) -> Result<Array> {
        unary(Unary::Sin, self)
    }
    pub fn square(&self) -> Result<Array> {
        unary(Unary::Square, self)
    }
    /// Rounds half to even.
    pub fn round(&self) -> Result<Array> {
        unary(Unary::Round, self)
    }
    pub fn contiguous(&self) -> Result<Array> {
        unary(Unary::Contiguous, self)
    }

    pub fn sum(&self, axis: i32, keepdims: bool) -> Result<Array> {
        reduce(Reduce::Sum, self, axis, keepdims)
    }
    pub fn max(&self, axis: i32, keepdims: bool) -> Result<Array> {
        reduce(Reduce::Max, self, axis, keepdims)
    }
    pub fn min(&self, axis: i32, keepdims: bool) -> Result<Array> {
        reduce(Reduce::Min, self, axis, keepdims)
    }
    pub fn mean(&self, axis: i32, keepdims: bool) -> Result<Array> {
        reduce(Reduce::Mean, self, axis, keepdims)
    }
    pub fn logsumexp(&self, axis: i32, keepdims: bool) -> Result<Array> {
        reduce(Reduce::Logsumexp, self, axis, keepdims)
    }
    pub fn argmax(&self, axis: i32, keepdims: bool) -> Result<Array> {
        reduce(Reduce::Argmax, self, axis, keepdims)
    }

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_astype(o, self.raw(), dtype as c_int) })
    }
    pub fn reshape(&self, shape: &[i32]) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_reshape(o, self.raw(), shape.as_ptr(), shape.len() as c_int) })
    }
    pub fn transpose(&self, axes: &[i32]) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_transpose(o, self.raw(), axes.as_ptr(), axes.len() as c_int) })
    }
    /// The transpose of a matrix (reverses all axes, as `x.T`).
    pub fn t(&self) -> Result<Array> {
        let axes: Vec<i32> = (0..self.ndim() as i32).rev().collect();
        self.transpose(&axes)
    }
    pub fn swapaxes(&self, a: i32, b: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_swapaxes(o, self.raw(), a, b) })
    }
    pub fn expand_dims(&self, axis: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_expand_dims(o, self.raw(), axis) })
    }
    pub fn squeeze(&self, axis: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_squeeze(o, self.raw(), axis) })
    }

    /// `a[start:stop:strides]` over every axis.
    pub fn slice(&self, start: &[i32], stop: &[i32], strides: &[i32]) -> Result<Array> {
        let n = start.len() as c_int;
        make(|o| unsafe {
            ffi::mlxd_slice(
                o,
                self.raw(),
                start.as_ptr(),
                stop.as_ptr(),
                strides.as_ptr(),
                n,
            )
        })
    }

    /// `a[..., start:stop, ...]` along one axis.
    pub fn slice_axis(&self, axis: i32, start: i32, stop: i32) -> Result<Array> {
        let shape = self.shape();
        let ax = if axis < 0 {
            shape.len() as i32 + axis
        } else {
            axis
        } as usize;
        let mut lo = vec![0; shape.len()];
        let mut hi = shape.clone();
        lo[ax] = start;
        hi[ax] = stop;
        self.slice(&lo, &hi, &vec![1; shape.len()])
    }

    /// A copy of `self` with `update` written over `[start, stop)`.
    pub fn slice_update(&self, update: &Array, start: &[i32], stop: &[i32]) -> Result<Array> {
        let n = start.len() as c_int;
        make(|o| unsafe {
            ffi::mlxd_slice_update(
                o,
                self.raw(),
                update.raw(),
                start.as_ptr(),
                stop.as_ptr(),
                n,
            )
        })
    }

    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_take(o, self.raw(), indices.raw(), axis) })
    }
    pub fn take_along_axis(&self, indices: &Array, axis: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_take_along_axis(o, self.raw(), indices.raw(), axis) })
    }
    pub fn put_along_axis(&self, indices: &Array, values: &Array, axis: i32) -> Result<Array> {
        make(|o| unsafe {
            ffi::mlxd_put_along_axis(o, self.raw(), indices.raw(), values.raw(), axis)
        })
    }
    /// Writes `updates` at the positions `indices` give along `axes`
    /// (`updates`: the indices' shape, then this array's with the indexed
    /// axes of size 1). Done in place when this array has no other user.
    pub fn scatter(&self, indices: &[&Array], updates: &Array, axes: &[i32]) -> Result<Array> {
        let idx = raws(indices);
        make(|o| unsafe {
            ffi::mlxd_scatter(
                o,
                self.raw(),
                idx.as_ptr() as *const CArr,
                idx.len() as i32,
                updates.raw(),
                axes.as_ptr(),
            )
        })
    }
    pub fn softmax(&self, axis: i32, precise: bool) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_softmax(o, self.raw(), axis, precise) })
    }
    pub fn argpartition(&self, kth: i32, axis: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_argpartition(o, self.raw(), kth, axis) })
    }
    pub fn sort(&self, axis: i32) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_sort(o, self.raw(), axis) })
    }
    pub fn cumsum(&self, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_cumsum(o, self.raw(), axis, reverse, inclusive) })
    }

    /// Splits along `axis` before each of `indices`.
    pub fn split(&self, indices: &[i32], axis: i32) -> Result<Vec<Array>> {
        let mut outs: Vec<Arr> = vec![std::ptr::null_mut(); indices.len() + 1];
        super::array::check(unsafe {
            ffi::mlxd_split(
                outs.as_mut_ptr(),
                self.raw(),
                indices.as_ptr(),
                indices.len() as c_int,
                axis,
            )
        })?;
        Ok(outs
            .into_iter()
            .map(|p| unsafe { Array::from_raw(p) })
            .collect())
    }
}

pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    let r = raws(arrays);
    make(|o| unsafe { ffi::mlxd_concatenate(o, r.as_ptr(), r.len(), axis) })
}

pub fn where_(cond: &Array, x: &Array, y: &Array) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_where(o, cond.raw(), x.raw(), y.raw()) })
}

/// `silu(gate) * x`, compiled into one fused kernel (as mlx-lm's `swiglu`).
pub fn swiglu(gate: &Array, x: &Array) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_swiglu(o, gate.raw(), x.raw()) })
}

/// `c + a @ b`, fused.
pub fn addmm(c: &Array, a: &Array, b: &Array) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_addmm(o, c.raw(), a.raw(), b.raw()) })
}

pub fn quantized_matmul(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    transpose: bool,
    group_size: i32,
    bits: i32,
) -> Result<Array> {
    make(|o| unsafe {
        ffi::mlxd_quantized_matmul(
            o,
            x.raw(),
            w.raw(),
            scales.raw(),
            Array::opt_raw(biases),
            transpose,
            group_size,
            bits,
        )
    })
}

pub fn dequantize(
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    group_size: i32,
    bits: i32,
) -> Result<Array> {
    make(|o| unsafe {
        ffi::mlxd_dequantize(
            o,
            w.raw(),
            scales.raw(),
            Array::opt_raw(biases),
            group_size,
            bits,
        )
    })
}

/// Affine quantization: `(weight, scales, biases)`.
pub fn quantize(w: &Array, group_size: i32, bits: i32) -> Result<(Array, Array, Array)> {
    let (mut q, mut s, mut b): (Arr, Arr, Arr) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    super::array::check(unsafe {
        ffi::mlxd_quantize(&mut q, &mut s, &mut b, w.raw(), group_size, bits)
    })?;
    unsafe { Ok((Array::from_raw(q), Array::from_raw(s), Array::from_raw(b))) }
}

/// `mx.fast.rms_norm`.
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    make(|o| unsafe { ffi::mlxd_rms_norm(o, x.raw(), Array::opt_raw(weight), eps) })
}

/// Where rotary embeddings start: one offset for every row, or one per
/// batch row (int32 `[B]`).
pub enum Offset<'a> {
    From(i32),
    PerRow(&'a Array),
}

/// `mx.fast.rope`: either `base` or explicit `freqs`.
pub fn rope(
    x: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: &Offset,
    freqs: Option<&Array>,
) -> Result<Array> {
    let (from, rows) = match offset {
        Offset::From(o) => (*o, None),
        Offset::PerRow(a) => (0, Some(*a)),
    };
    make(|o| unsafe {
        ffi::mlxd_rope(
            o,
            x.raw(),
            dims,
            traditional,
            base.is_some(),
            base.unwrap_or(0.0),
            scale,
            from,
            Array::opt_raw(rows),
            Array::opt_raw(freqs),
        )
    })
}

/// The attention mask handed to `scaled_dot_product_attention`.
pub enum Mask<'a> {
    None,
    Causal,
    Array(&'a Array),
}

/// `mx.fast.scaled_dot_product_attention`.
pub fn scaled_dot_product_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask,
) -> Result<Array> {
    let (mode, arr) = match mask {
        Mask::None => ("", None),
        Mask::Causal => ("causal", None),
        Mask::Array(a) => ("array", Some(a)),
    };
    let mode = CString::new(mode).unwrap();
    make(|o| unsafe {
        ffi::mlxd_sdpa(
            o,
            q.raw(),
            k.raw(),
            v.raw(),
            scale,
            mode.as_ptr(),
            Array::opt_raw(arr),
        )
    })
}

pub mod random {
    use super::*;

    /// A PRNG key for `seed`.
    pub fn key(seed: u64) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_random_key(o, seed) })
    }

    pub fn split(key: &Array) -> Result<(Array, Array)> {
        let (mut a, mut b): (Arr, Arr) = (std::ptr::null_mut(), std::ptr::null_mut());
        super::super::array::check(unsafe { ffi::mlxd_random_split(&mut a, &mut b, key.raw()) })?;
        unsafe { Ok((Array::from_raw(a), Array::from_raw(b))) }
    }

    /// Samples indices from unnormalised log-probabilities along `axis`.
    pub fn categorical(logits: &Array, axis: i32, key: Option<&Array>) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_categorical(o, logits.raw(), axis, Array::opt_raw(key)) })
    }
}
