//! `Array`: an owned handle on an `mlx::core::array`. Cloning shares the
//! underlying buffer (as in MLX); dropping releases this handle.
use std::ffi::CStr;
use std::os::raw::c_int;
use std::ptr::{self, NonNull};

use super::ffi::{self, Arr};
use crate::error::{Error, Result};

/// MLX element types, numbered as `mlx::core::Dtype::Val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Dtype {
    Bool = 0,
    Uint8 = 1,
    Uint16 = 2,
    Uint32 = 3,
    Uint64 = 4,
    Int8 = 5,
    Int16 = 6,
    Int32 = 7,
    Int64 = 8,
    Float16 = 9,
    Float32 = 10,
    Float64 = 11,
    Bfloat16 = 12,
    Complex64 = 13,
}

impl Dtype {
    pub fn from_code(code: i32) -> Result<Dtype> {
        use Dtype::*;
        const ALL: [Dtype; 14] = [
            Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Float16, Float32,
            Float64, Bfloat16, Complex64,
        ];
        ALL.get(code as usize)
            .copied()
            .ok_or_else(|| Error::Mlx(format!("unknown dtype code {code}")))
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            Bool | Uint8 | Int8 => 1,
            Uint16 | Int16 | Float16 | Bfloat16 => 2,
            Uint32 | Int32 | Float32 => 4,
            Uint64 | Int64 | Float64 | Complex64 => 8,
        }
    }

    /// The name used by safetensors, numpy and MLX's Python API.
    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            Bool => "bool",
            Uint8 => "uint8",
            Uint16 => "uint16",
            Uint32 => "uint32",
            Uint64 => "uint64",
            Int8 => "int8",
            Int16 => "int16",
            Int32 => "int32",
            Int64 => "int64",
            Float16 => "float16",
            Float32 => "float32",
            Float64 => "float64",
            Bfloat16 => "bfloat16",
            Complex64 => "complex64",
        }
    }

    pub fn from_name(name: &str) -> Result<Dtype> {
        (0..14)
            .map(|c| Dtype::from_code(c).unwrap())
            .find(|d| d.name() == name)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown dtype {name:?}")))
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::Float16 | Dtype::Float32 | Dtype::Float64 | Dtype::Bfloat16
        )
    }
}

/// Host element types that arrays can be built from and copied into.
pub trait Element: Copy + Default {
    const DTYPE: Dtype;
}
macro_rules! element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: Dtype = Dtype::$d;
        }
    };
}
element!(bool, Bool);
element!(u8, Uint8);
element!(u32, Uint32);
element!(i32, Int32);
element!(i64, Int64);
element!(f32, Float32);

pub struct Array(NonNull<ffi::mlxd_array>);

// MLX arrays are reference-counted graph nodes; a handle may move between
// threads (the GIL is released around compute), and MLX's own scheduler
// already evaluates them off the creating thread.
unsafe impl Send for Array {}
unsafe impl Sync for Array {}

pub(crate) fn last_error() -> Error {
    let msg = unsafe { CStr::from_ptr(ffi::mlxd_last_error()) };
    Error::Mlx(msg.to_string_lossy().into_owned())
}

pub(crate) fn check(rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// Runs one shim call that produces an array.
pub(crate) fn make(f: impl FnOnce(*mut Arr) -> c_int) -> Result<Array> {
    let mut out: Arr = ptr::null_mut();
    check(f(&mut out))?;
    Ok(unsafe { Array::from_raw(out) })
}

impl Array {
    /// Takes ownership of a handle returned by the shim.
    ///
    /// # Safety
    /// `raw` must be a live handle that nothing else frees.
    pub(crate) unsafe fn from_raw(raw: Arr) -> Array {
        Array(NonNull::new(raw).expect("MLX returned a null array"))
    }

    pub(crate) fn raw(&self) -> ffi::CArr {
        self.0.as_ptr()
    }

    pub(crate) fn opt_raw(a: Option<&Array>) -> ffi::CArr {
        a.map_or(ptr::null(), |a| a.raw())
    }

    /// An array holding a copy of `data`, of the given shape.
    pub fn from_slice<T: Element>(data: &[T], shape: &[i32]) -> Result<Array> {
        let n: i64 = shape.iter().map(|&d| d as i64).product();
        if shape.iter().any(|&d| d < 0) || n as usize != data.len() {
            return Err(Error::InvalidArgument(format!(
                "{} elements cannot have shape {shape:?}",
                data.len()
            )));
        }
        unsafe { Self::from_bytes_unchecked(data.as_ptr().cast(), shape, T::DTYPE) }
    }

    /// An array of `dtype` from raw little-endian bytes (bfloat16 included).
    pub fn from_bytes(bytes: &[u8], shape: &[i32], dtype: Dtype) -> Result<Array> {
        let n: i64 = shape.iter().map(|&d| d as i64).product();
        if shape.iter().any(|&d| d < 0) || n as usize * dtype.size() != bytes.len() {
            return Err(Error::InvalidArgument(format!(
                "{} bytes cannot hold {} of shape {shape:?}",
                bytes.len(),
                dtype.name()
            )));
        }
        unsafe { Self::from_bytes_unchecked(bytes.as_ptr().cast(), shape, dtype) }
    }

    unsafe fn from_bytes_unchecked(
        data: *const std::ffi::c_void,
        shape: &[i32],
        dtype: Dtype,
    ) -> Result<Array> {
        make(|o| {
            ffi::mlxd_from_data(
                o,
                data,
                shape.as_ptr(),
                shape.len() as c_int,
                dtype as c_int,
            )
        })
    }

    pub fn scalar(v: f64, dtype: Dtype) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_scalar(o, v, dtype as c_int) })
    }

    pub fn zeros(shape: &[i32], dtype: Dtype) -> Result<Array> {
        make(|o| unsafe {
            ffi::mlxd_zeros(o, shape.as_ptr(), shape.len() as c_int, dtype as c_int)
        })
    }

    pub fn full(shape: &[i32], v: f64, dtype: Dtype) -> Result<Array> {
        make(|o| unsafe {
            ffi::mlxd_full(o, shape.as_ptr(), shape.len() as c_int, v, dtype as c_int)
        })
    }

    pub fn arange(start: f64, stop: f64, step: f64, dtype: Dtype) -> Result<Array> {
        make(|o| unsafe { ffi::mlxd_arange(o, start, stop, step, dtype as c_int) })
    }

    pub fn ndim(&self) -> usize {
        unsafe { ffi::mlxd_ndim(self.raw()) as usize }
    }

    pub fn shape(&self) -> Vec<i32> {
        let mut s = vec![0; self.ndim()];
        unsafe { ffi::mlxd_shape(self.raw(), s.as_mut_ptr()) };
        s
    }

    /// The size of axis `axis` (negative counts from the end).
    pub fn dim(&self, axis: i32) -> i32 {
        let s = self.shape();
        let i = if axis < 0 {
            s.len() as i32 + axis
        } else {
            axis
        };
        s[i as usize]
    }

    pub fn dtype(&self) -> Dtype {
        Dtype::from_code(unsafe { ffi::mlxd_dtype(self.raw()) }).expect("MLX dtype")
    }

    pub fn size(&self) -> usize {
        unsafe { ffi::mlxd_size(self.raw()) }
    }

    pub fn nbytes(&self) -> usize {
        unsafe { ffi::mlxd_nbytes(self.raw()) }
    }

    pub fn eval(&self) -> Result<()> {
        eval(&[self])
    }

    /// Whether the value is computed (evaluation scheduled and finished);
    /// never waits.
    pub fn is_available(&self) -> bool {
        unsafe { ffi::mlxd_is_available(self.raw()) != 0 }
    }

    /// Evaluates and copies the elements out, converting to `T`'s dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let a = if self.dtype() == T::DTYPE {
            self.clone()
        } else {
            self.astype(T::DTYPE)?
        };
        let mut v = vec![T::default(); a.size()];
        check(unsafe {
            ffi::mlxd_to_host(
                a.raw(),
                v.as_mut_ptr().cast(),
                v.len() * std::mem::size_of::<T>(),
            )
        })?;
        Ok(v)
    }

    /// Evaluates and copies the raw bytes out, in the array's own dtype.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.nbytes()];
        check(unsafe { ffi::mlxd_to_host(self.raw(), v.as_mut_ptr().cast(), v.len()) })?;
        Ok(v)
    }

    /// The single element of a one-element array.
    pub fn item<T: Element>(&self) -> Result<T> {
        if self.size() != 1 {
            return Err(Error::InvalidArgument(format!(
                "item() of an array of shape {:?}",
                self.shape()
            )));
        }
        Ok(self.to_vec::<T>()?[0])
    }
}

impl Clone for Array {
    fn clone(&self) -> Array {
        unsafe { Array::from_raw(ffi::mlxd_clone(self.raw())) }
    }
}

impl Drop for Array {
    fn drop(&mut self) {
        unsafe { ffi::mlxd_free(self.0.as_ptr()) }
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Array({:?}, {})", self.shape(), self.dtype().name())
    }
}

/// Evaluates several arrays together.
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let raws: Vec<Arr> = arrays.iter().map(|a| a.raw() as Arr).collect();
    check(unsafe { ffi::mlxd_eval(raws.as_ptr(), raws.len()) })
}

/// `eval`, waiting for the device by polling for up to `spin` before
/// sleeping. MLX's wait sleeps until the device signals, and wakes tens of
/// microseconds after it finishes; a pipeline stage, whose next stage waits
/// for its result, would pay that on every step. A zero `spin` is `eval`.
pub fn eval_polling(arrays: &[&Array], spin: std::time::Duration) -> Result<()> {
    if !spin.is_zero() {
        async_eval(arrays)?;
        let until = std::time::Instant::now() + spin;
        for a in arrays {
            while !a.is_available() && std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }
    eval(arrays)
}

/// Schedules evaluation and returns at once (MLX's `async_eval`).
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let raws: Vec<Arr> = arrays.iter().map(|a| a.raw() as Arr).collect();
    check(unsafe { ffi::mlxd_async_eval(raws.as_ptr(), raws.len()) })
}

/// The owner behind `Array::host_bytes`: a handle that keeps MLX's buffer
/// alive, and the address and length of the elements in it.
struct HostBuffer {
    _array: Array,
    ptr: NonNull<u8>,
    len: usize,
}

// The buffer stays put and unwritten while `_array` holds it: MLX donates a
// buffer to an op's output only when nothing else references it.
unsafe impl Send for HostBuffer {}

impl AsRef<[u8]> for HostBuffer {
    fn as_ref(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

/// Frees the `Bytes` lent to MLX by `Array::from_shared_bytes`.
unsafe extern "C" fn release_bytes(ctx: *mut std::ffi::c_void) {
    drop(Box::from_raw(ctx.cast::<bytes::Bytes>()));
}

impl Array {
    /// Evaluates the array and returns its elements, row-major, as `Bytes`
    /// that share MLX's buffer: no copy for a row-contiguous array (a view
    /// such as a transpose is made contiguous first, one copy by MLX). The
    /// bytes keep the buffer alive, unchanged, until the last clone drops. On
    /// CUDA, MLX moves the buffer to unified memory to expose it to the host.
    pub fn host_bytes(&self) -> Result<bytes::Bytes> {
        let mut data: *const std::ffi::c_void = ptr::null();
        let mut len = 0usize;
        let held = make(|o| unsafe { ffi::mlxd_host_data(o, self.raw(), &mut data, &mut len) })?;
        match NonNull::new(data as *mut u8) {
            Some(ptr) if len > 0 => Ok(bytes::Bytes::from_owner(HostBuffer {
                _array: held,
                ptr,
                len,
            })),
            _ => Ok(bytes::Bytes::new()),
        }
    }

    /// An array of `dtype` and `shape` over raw little-endian, row-major
    /// `bytes`, adopting them without a copy where MLX's allocator can wrap
    /// host memory (Metal; page-aligned memory only); MLX copies them
    /// otherwise (its CPU and CUDA allocators wrap none), and so does this
    /// when they are not aligned for `dtype`. Also returns whether MLX
    /// adopted them; adopted bytes are held, never written, until MLX frees
    /// the buffer, possibly on another thread.
    pub fn from_shared_bytes(
        bytes: bytes::Bytes,
        shape: &[i32],
        dtype: Dtype,
    ) -> Result<(Array, bool)> {
        let need = shape.iter().try_fold(dtype.size() as u64, |n, &d| {
            u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
        });
        if need != Some(bytes.len() as u64) {
            return Err(Error::InvalidArgument(format!(
                "{} bytes cannot hold {} of shape {shape:?}",
                bytes.len(),
                dtype.name()
            )));
        }
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size());
        let data = bytes.as_ptr() as *mut std::ffi::c_void;
        let len = bytes.len();
        // Boxing moves the handle, not the bytes it points at.
        let ctx = Box::into_raw(Box::new(bytes)).cast::<std::ffi::c_void>();
        let mut adopted: c_int = 0;
        let a = make(|o| unsafe {
            ffi::mlxd_from_external(
                o,
                data,
                len,
                shape.as_ptr(),
                shape.len() as c_int,
                dtype as c_int,
                aligned as c_int,
                release_bytes,
                ctx,
                &mut adopted,
            )
        })?;
        Ok((a, adopted != 0))
    }
}
