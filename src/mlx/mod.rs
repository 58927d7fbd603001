//! The MLX binding: a C++ shim over MLX's C++ API (`shim.cpp`) and safe
//! Rust wrappers around it. Errors thrown by MLX come back as `Error::Mlx`.
mod array;
mod ffi;
pub mod io;
mod mailbox;
pub mod ops;

pub use array::{async_eval, eval, eval_polling, Array, Dtype, Element};
pub use mailbox::{Mailbox, MailboxStream};
pub use ops::{random, Mask};

/// The version string of the MLX library in use.
pub fn version() -> String {
    unsafe { std::ffi::CStr::from_ptr(ffi::mlxd_version()) }
        .to_string_lossy()
        .into_owned()
}

/// Bytes MLX holds in live arrays.
pub fn active_memory() -> usize {
    unsafe { ffi::mlxd_active_memory() }
}

/// The high-water mark of `active_memory` since the last reset.
pub fn peak_memory() -> usize {
    unsafe { ffi::mlxd_peak_memory() }
}

/// Bytes MLX keeps in its buffer cache for reuse.
pub fn cache_memory() -> usize {
    unsafe { ffi::mlxd_cache_memory() }
}

pub fn reset_peak_memory() {
    unsafe { ffi::mlxd_reset_peak_memory() }
}

/// Returns cached buffers to the system.
pub fn clear_cache() {
    unsafe { ffi::mlxd_clear_cache() }
}

/// Whether MLX computes on a GPU (Metal or CUDA) by default.
pub fn default_device_is_gpu() -> bool {
    unsafe { ffi::mlxd_default_device_is_gpu() != 0 }
}

/// A value of `device_info`: a name or a number (bytes, counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceInfoValue {
    String(String),
    Size(u64),
}

type DeviceInfoMap = std::collections::HashMap<String, DeviceInfoValue>;

unsafe extern "C" fn on_info_string(
    ctx: *mut std::ffi::c_void,
    key: *const std::os::raw::c_char,
    value: *const std::os::raw::c_char,
) {
    let m = &mut *(ctx as *mut DeviceInfoMap);
    let s = |p| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
    m.insert(s(key), DeviceInfoValue::String(s(value)));
}

unsafe extern "C" fn on_info_size(
    ctx: *mut std::ffi::c_void,
    key: *const std::os::raw::c_char,
    value: usize,
) {
    let m = &mut *(ctx as *mut DeviceInfoMap);
    let key = std::ffi::CStr::from_ptr(key).to_string_lossy().into_owned();
    m.insert(key, DeviceInfoValue::Size(value as u64));
}

/// MLX's description of the default device (`mx.device_info()`): keys such
/// as `device_name`, `architecture`, `memory_size` or `total_memory`, and
/// `free_memory` (CUDA only); which keys exist depends on the backend.
pub fn device_info() -> crate::Result<std::collections::HashMap<String, DeviceInfoValue>> {
    let mut m = DeviceInfoMap::new();
    array::check(unsafe {
        ffi::mlxd_device_info(
            (&mut m as *mut DeviceInfoMap).cast(),
            on_info_string,
            on_info_size,
        )
    })?;
    Ok(m)
}

/// Serialises tests that measure MLX's (process-wide) memory figures.
#[cfg(test)]
pub(crate) static MEMORY_TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trip_and_ops() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        assert_eq!(a.shape(), vec![2, 2]);
        assert_eq!(a.dtype(), Dtype::Float32);
        let b = a.matmul(&a.t().unwrap()).unwrap();
        assert_eq!(b.to_vec::<f32>().unwrap(), vec![5.0, 11.0, 11.0, 25.0]);
        let s = a.sum(ops::ALL_AXES, false).unwrap();
        assert_eq!(s.item::<f32>().unwrap(), 10.0);
        let bf = a.astype(Dtype::Bfloat16).unwrap();
        assert_eq!(bf.to_bytes().unwrap().len(), 8);
        let parts = a.split(&[1], 1).unwrap();
        assert_eq!(parts[1].to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
    }

    #[test]
    fn errors_propagate_instead_of_aborting() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]).unwrap();
        let b = Array::from_slice(&[1.0f32, 2.0], &[2]).unwrap();
        let err = a.matmul(&b.reshape(&[2, 1]).unwrap()).unwrap_err();
        assert!(matches!(err, crate::Error::Mlx(_)), "{err}");
        let err = a.reshape(&[2, 2]).unwrap_err();
        assert!(
            err.to_string().contains("reshape") || err.to_string().contains("Cannot"),
            "{err}"
        );
        assert!(Array::from_slice(&[1.0f32; 3], &[2, 2]).is_err());
        // The binding still works after an error.
        assert_eq!(
            a.add(&a).unwrap().to_vec::<f32>().unwrap(),
            vec![2.0, 4.0, 6.0]
        );
    }

    #[test]
    fn eval_polling_computes_what_eval_does() {
        let a = Array::arange(0.0, 4096.0, 1.0, Dtype::Float32).unwrap();
        let want = a
            .mul(&a)
            .unwrap()
            .sum(0, false)
            .unwrap()
            .item::<f32>()
            .unwrap();
        for spin in [Duration::ZERO, Duration::from_millis(50)] {
            let (x, y) = (a.mul(&a).unwrap(), a.add(&a).unwrap());
            let s = x.sum(0, false).unwrap();
            assert!(!s.is_available());
            eval_polling(&[&s, &y], spin).unwrap();
            assert!(s.is_available() && y.is_available(), "{spin:?}");
            assert_eq!(s.item::<f32>().unwrap(), want);
            assert_eq!(y.to_vec::<f32>().unwrap()[4095], 8190.0);
        }
        // A spin too short for the work falls back to a sleeping wait.
        let big = Array::arange(0.0, (1 << 22) as f64, 1.0, Dtype::Float32).unwrap();
        let s = big.mul(&big).unwrap().sum(0, false).unwrap();
        eval_polling(&[&s], Duration::from_nanos(1)).unwrap();
        assert!(s.is_available());
    }

    #[test]
    fn memory_is_released_on_drop() {
        // 64 MiB, far above what the other tests allocate concurrently.
        const BYTES: usize = 64 << 20;
        let _serial = MEMORY_TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = active_memory();
        let big = Array::arange(0.0, (BYTES / 4) as f64, 1.0, Dtype::Float32).unwrap();
        big.eval().unwrap();
        let copy = big.clone();
        assert!(active_memory() >= before + BYTES - (1 << 20));
        drop(big);
        // A clone shares the buffer: it stays alive until the last handle goes.
        assert!(active_memory() >= before + BYTES - (1 << 20));
        drop(copy);
        assert!(active_memory() < before + BYTES / 2);
    }
}
