//! Reading and writing safetensors files through MLX (lazy: a tensor is
//! read from disk only when evaluated).
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::os::raw::c_char;
use std::path::Path;

use super::array::{check, Array};
use super::ffi::{self, Arr};
use crate::error::{Error, Result};

#[derive(Default)]
struct Collected {
    arrays: HashMap<String, Array>,
    strings: HashMap<String, String>,
}

fn cstr(p: *const c_char) -> String {
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

unsafe extern "C" fn on_array(ctx: *mut c_void, name: *const c_char, a: Arr) {
    let c = &mut *(ctx as *mut Collected);
    c.arrays.insert(cstr(name), Array::from_raw(a));
}
unsafe extern "C" fn on_string(ctx: *mut c_void, key: *const c_char, value: *const c_char) {
    let c = &mut *(ctx as *mut Collected);
    c.strings.insert(cstr(key), cstr(value));
}
fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("path with a NUL byte: {}", path.display())))
}

/// Lazily loads every tensor of a safetensors file, with its metadata.
pub fn load_safetensors(path: &Path) -> Result<(HashMap<String, Array>, HashMap<String, String>)> {
    let p = c_path(path)?;
    let mut c = Collected::default();
    check(unsafe {
        ffi::mlxd_load_safetensors(
            p.as_ptr(),
            (&mut c as *mut Collected).cast(),
            on_array,
            on_string,
        )
    })?;
    Ok((c.arrays, c.strings))
}

pub fn save_safetensors(path: &Path, arrays: &[(&str, &Array)]) -> Result<()> {
    let p = c_path(path)?;
    let names: Vec<CString> = arrays
        .iter()
        .map(|(n, _)| CString::new(*n).unwrap())
        .collect();
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let raws: Vec<Arr> = arrays.iter().map(|(_, a)| a.raw() as Arr).collect();
    check(unsafe {
        ffi::mlxd_save_safetensors(p.as_ptr(), name_ptrs.as_ptr(), raws.as_ptr(), raws.len())
    })
}
