//! Declarations of the C ABI in `shim.cpp`. Only `mlx::array` and the
//! loaders use these; everything else goes through the safe wrappers.
#![allow(non_camel_case_types)]
use std::os::raw::{c_char, c_int, c_void};

#[repr(C)]
pub struct mlxd_array {
    _private: [u8; 0],
}
pub type Arr = *mut mlxd_array;
pub type CArr = *const mlxd_array;

pub type ArrayCb = unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char, a: Arr);
pub type StringCb =
    unsafe extern "C" fn(ctx: *mut c_void, key: *const c_char, value: *const c_char);
pub type SizeCb = unsafe extern "C" fn(ctx: *mut c_void, key: *const c_char, value: usize);

extern "C" {
    pub fn mlxd_last_error() -> *const c_char;
    pub fn mlxd_version() -> *const c_char;
    pub fn mlxd_free(a: Arr);
    pub fn mlxd_clone(a: CArr) -> Arr;

    pub fn mlxd_from_data(
        out: *mut Arr,
        data: *const c_void,
        shape: *const c_int,
        ndim: c_int,
        dtype: c_int,
    ) -> c_int;
    pub fn mlxd_scalar(out: *mut Arr, v: f64, dtype: c_int) -> c_int;
    pub fn mlxd_zeros(out: *mut Arr, shape: *const c_int, ndim: c_int, dtype: c_int) -> c_int;
    pub fn mlxd_full(
        out: *mut Arr,
        shape: *const c_int,
        ndim: c_int,
        v: f64,
        dtype: c_int,
    ) -> c_int;
    pub fn mlxd_arange(out: *mut Arr, start: f64, stop: f64, step: f64, dtype: c_int) -> c_int;

    pub fn mlxd_ndim(a: CArr) -> c_int;
    pub fn mlxd_shape(a: CArr, out: *mut c_int);
    pub fn mlxd_dtype(a: CArr) -> c_int;
    pub fn mlxd_size(a: CArr) -> usize;
    pub fn mlxd_nbytes(a: CArr) -> usize;

    pub fn mlxd_eval(a: *const Arr, n: usize) -> c_int;
    pub fn mlxd_async_eval(a: *const Arr, n: usize) -> c_int;
    pub fn mlxd_is_available(a: CArr) -> c_int;
    pub fn mlxd_to_host(a: CArr, out: *mut c_void, nbytes: usize) -> c_int;

    pub fn mlxd_binary(out: *mut Arr, op: c_int, a: CArr, b: CArr) -> c_int;
    pub fn mlxd_unary(out: *mut Arr, op: c_int, a: CArr) -> c_int;
    pub fn mlxd_reduce(out: *mut Arr, op: c_int, a: CArr, axis: c_int, keepdims: bool) -> c_int;
    pub fn mlxd_swiglu(out: *mut Arr, gate: CArr, x: CArr) -> c_int;
    pub fn mlxd_astype(out: *mut Arr, a: CArr, dtype: c_int) -> c_int;
    pub fn mlxd_reshape(out: *mut Arr, a: CArr, shape: *const c_int, n: c_int) -> c_int;
    pub fn mlxd_transpose(out: *mut Arr, a: CArr, axes: *const c_int, n: c_int) -> c_int;
    pub fn mlxd_swapaxes(out: *mut Arr, a: CArr, a1: c_int, a2: c_int) -> c_int;
    pub fn mlxd_expand_dims(out: *mut Arr, a: CArr, axis: c_int) -> c_int;
    pub fn mlxd_squeeze(out: *mut Arr, a: CArr, axis: c_int) -> c_int;
    pub fn mlxd_concatenate(out: *mut Arr, a: *const Arr, n: usize, axis: c_int) -> c_int;
    pub fn mlxd_split(
        outs: *mut Arr,
        a: CArr,
        indices: *const c_int,
        n: c_int,
        axis: c_int,
    ) -> c_int;
    pub fn mlxd_slice(
        out: *mut Arr,
        a: CArr,
        start: *const c_int,
        stop: *const c_int,
        strides: *const c_int,
        n: c_int,
    ) -> c_int;
    pub fn mlxd_slice_update(
        out: *mut Arr,
        src: CArr,
        upd: CArr,
        start: *const c_int,
        stop: *const c_int,
        n: c_int,
    ) -> c_int;
    pub fn mlxd_take(out: *mut Arr, a: CArr, idx: CArr, axis: c_int) -> c_int;
    pub fn mlxd_take_along_axis(out: *mut Arr, a: CArr, idx: CArr, axis: c_int) -> c_int;
    pub fn mlxd_put_along_axis(out: *mut Arr, a: CArr, idx: CArr, vals: CArr, axis: c_int)
        -> c_int;
    pub fn mlxd_scatter(
        out: *mut Arr,
        a: CArr,
        idx: *const CArr,
        n: c_int,
        upd: CArr,
        axes: *const c_int,
    ) -> c_int;
    pub fn mlxd_where(out: *mut Arr, c: CArr, x: CArr, y: CArr) -> c_int;
    pub fn mlxd_softmax(out: *mut Arr, a: CArr, axis: c_int, precise: bool) -> c_int;
    pub fn mlxd_argpartition(out: *mut Arr, a: CArr, kth: c_int, axis: c_int) -> c_int;
    pub fn mlxd_sort(out: *mut Arr, a: CArr, axis: c_int) -> c_int;
    pub fn mlxd_cumsum(
        out: *mut Arr,
        a: CArr,
        axis: c_int,
        reverse: bool,
        inclusive: bool,
    ) -> c_int;
    pub fn mlxd_addmm(out: *mut Arr, c: CArr, a: CArr, b: CArr) -> c_int;

    pub fn mlxd_quantized_matmul(
        out: *mut Arr,
        x: CArr,
        w: CArr,
        scales: CArr,
        biases: CArr,
        transpose: bool,
        group_size: c_int,
        bits: c_int,
    ) -> c_int;
    pub fn mlxd_dequantize(
        out: *mut Arr,
        w: CArr,
        scales: CArr,
        biases: CArr,
        group_size: c_int,
        bits: c_int,
    ) -> c_int;
    pub fn mlxd_quantize(
        w: *mut Arr,
        s: *mut Arr,
        b: *mut Arr,
        a: CArr,
        group_size: c_int,
        bits: c_int,
    ) -> c_int;

    pub fn mlxd_rms_norm(out: *mut Arr, x: CArr, w: CArr, eps: f32) -> c_int;
    pub fn mlxd_rope(
        out: *mut Arr,
        x: CArr,
        dims: c_int,
        traditional: bool,
        has_base: bool,
        base: f32,
        scale: f32,
        offset: c_int,
        offsets: CArr,
        freqs: CArr,
    ) -> c_int;
    pub fn mlxd_sdpa(
        out: *mut Arr,
        q: CArr,
        k: CArr,
        v: CArr,
        scale: f32,
        mask_mode: *const c_char,
        mask: CArr,
    ) -> c_int;

    pub fn mlxd_random_key(out: *mut Arr, seed: u64) -> c_int;
    pub fn mlxd_random_split(a: *mut Arr, b: *mut Arr, key: CArr) -> c_int;
    pub fn mlxd_categorical(out: *mut Arr, logits: CArr, axis: c_int, key: CArr) -> c_int;

    pub fn mlxd_active_memory() -> usize;
    pub fn mlxd_peak_memory() -> usize;
    pub fn mlxd_cache_memory() -> usize;
    pub fn mlxd_reset_peak_memory();
    pub fn mlxd_clear_cache();
    pub fn mlxd_default_device_is_gpu() -> c_int;

    pub fn mlxd_load_safetensors(
        path: *const c_char,
        ctx: *mut c_void,
        on_array: ArrayCb,
        on_meta: StringCb,
    ) -> c_int;
    pub fn mlxd_save_safetensors(
        path: *const c_char,
        names: *const *const c_char,
        arrays: *const Arr,
        n: usize,
    ) -> c_int;
    pub fn mlxd_device_info(ctx: *mut c_void, on_string: StringCb, on_size: SizeCb) -> c_int;

    pub fn mlxd_host_data(
        out: *mut Arr,
        a: CArr,
        data: *mut *const c_void,
        nbytes: *mut usize,
    ) -> c_int;
    pub fn mlxd_from_external(
        out: *mut Arr,
        data: *mut c_void,
        nbytes: usize,
        shape: *const c_int,
        ndim: c_int,
        dtype: c_int,
        adopt: c_int,
        release: unsafe extern "C" fn(ctx: *mut c_void),
        ctx: *mut c_void,
        adopted: *mut c_int,
    ) -> c_int;

    pub fn mlxd_new_cpu_stream(index: *mut c_int) -> c_int;
    pub fn mlxd_mailbox_on_device() -> c_int;
    pub fn mlxd_mailbox_pinned_boxes() -> usize;
    pub fn mlxd_mailbox_new(
        mbox: *mut *mut c_void,
        out: *mut Arr,
        stream: c_int,
        shape: *const c_int,
        ndim: c_int,
        dtype: c_int,
    ) -> c_int;
    pub fn mlxd_mailbox_deliver(mbox: *mut c_void, data: *const c_void, n: usize);
    pub fn mlxd_mailbox_free(mbox: *mut c_void);
}
