//! Mailboxes: arrays whose data arrive after the graph that reads them was
//! launched.
//!
//! A pipeline stage knows its next decode step long before that step's
//! input arrives (the input is the rest of the pipeline's result). With a
//! mailbox it builds and launches the step at once; the device waits for the
//! input (on CUDA a kernel polling a flag in pinned host memory that the
//! delivery sets; elsewhere an MLX event on a task of a CPU stream), so MLX's
//! CPU work of encoding the step's kernels is done while the other stages
//! compute, not after.
use std::os::raw::c_void;
use std::ptr;

use super::array::{check, Array, Dtype};
use super::ffi;
use crate::Result;

/// A CPU stream of its own (a thread in MLX's scheduler) for mailboxes to
/// wait on, so that a waiting mailbox holds up no other work.
pub struct MailboxStream(i32);

impl MailboxStream {
    pub fn new() -> Result<MailboxStream> {
        let mut index = 0;
        check(unsafe { ffi::mlxd_new_cpu_stream(&mut index) })?;
        Ok(MailboxStream(index))
    }
}

/// The sending end of an array made by `Mailbox::new`. Dropping it
/// undelivered delivers zeros, so that no work waits on it forever.
pub struct Mailbox {
    raw: *mut c_void,
    nbytes: usize,
}

// The shim's mailbox is a mutex-guarded buffer, safe to fill from any thread.
unsafe impl Send for Mailbox {}

impl Mailbox {
    /// A mailbox and the `shape`, `dtype` array it fills (read on `stream`
    /// when not on CUDA): graphs built on the array can be launched at once.
    /// Launch the array only inside the graph that reads it: on an H200,
    /// launching it alone (its own `async_eval`) and then that graph hung
    /// (seen in these tests, not explained).
    pub fn new(stream: &MailboxStream, shape: &[i32], dtype: Dtype) -> Result<(Mailbox, Array)> {
        let mut raw = ptr::null_mut();
        let array = super::array::make(|out| unsafe {
            ffi::mlxd_mailbox_new(
                &mut raw,
                out,
                stream.0,
                shape.as_ptr(),
                shape.len() as i32,
                dtype as i32,
            )
        })?;
        let nbytes = array.nbytes();
        Ok((Mailbox { raw, nbytes }, array))
    }

    /// Whether a mailbox's array waits on the device (a CUDA GPU, where a
    /// kernel polls for the delivery) rather than on a CPU stream's task.
    pub fn waits_on_device() -> bool {
        unsafe { ffi::mlxd_mailbox_on_device() != 0 }
    }

    /// How many pinned boxes (CUDA) this process has made, 64 at most:
    /// each is reused once the kernel that read it has run.
    pub fn pinned_boxes() -> usize {
        unsafe { ffi::mlxd_mailbox_pinned_boxes() }
    }

    /// Bytes the array holds: what `deliver` takes.
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// Fills the array with `bytes` (its row-major data, `nbytes` long;
    /// missing bytes read as zeros, extra ones are ignored).
    pub fn deliver(self, bytes: &[u8]) {
        unsafe { ffi::mlxd_mailbox_deliver(self.raw, bytes.as_ptr().cast(), bytes.len()) };
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // A no-op after `deliver`.
        unsafe {
            ffi::mlxd_mailbox_deliver(self.raw, ptr::null(), 0);
            ffi::mlxd_mailbox_free(self.raw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_graph_launched_on_a_mailbox_computes_once_it_is_delivered() {
        let stream = MailboxStream::new().unwrap();
        let (mbox, x) = Mailbox::new(&stream, &[2, 3], Dtype::Float32).unwrap();
        assert_eq!(mbox.nbytes(), 24);
        let w = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3, 1]).unwrap();
        let y = x.matmul(&w).unwrap().add(&x.sum(1, true).unwrap()).unwrap();
        // Launching returns while the input is missing.
        crate::mlx::async_eval(&[&y]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!y.is_available());
        let data: Vec<u8> = [1.0f32, 0.0, 1.0, 2.0, 2.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        // Delivered from another thread, as a worker's network task would.
        std::thread::spawn(move || mbox.deliver(&data))
            .join()
            .unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![4.0 + 2.0, 12.0 + 6.0]);
    }

    #[test]
    fn an_undelivered_mailbox_reads_zeros_when_dropped() {
        let stream = MailboxStream::new().unwrap();
        let (mbox, x) = Mailbox::new(&stream, &[4], Dtype::Int32).unwrap();
        let y = x
            .add(&Array::from_slice(&[1i32, 2, 3, 4], &[4]).unwrap())
            .unwrap();
        crate::mlx::async_eval(&[&y]).unwrap();
        drop(mbox);
        assert_eq!(y.to_vec::<i32>().unwrap(), vec![1, 2, 3, 4]);
        // A short delivery is padded with zeros.
        let (mbox, x) = Mailbox::new(&stream, &[3], Dtype::Int32).unwrap();
        mbox.deliver(&7i32.to_le_bytes());
        assert_eq!(x.to_vec::<i32>().unwrap(), vec![7, 0, 0]);
    }

    #[test]
    fn mailboxes_made_one_after_another_read_their_own_input() {
        // On CUDA they reuse pinned boxes: a box goes back only once the
        // kernel that read it has run.
        let stream = MailboxStream::new().unwrap();
        let one = Array::from_slice(&[1i32, 1], &[2]).unwrap();
        for i in 0..24i32 {
            let (mbox, x) = Mailbox::new(&stream, &[2], Dtype::Int32).unwrap();
            if i % 4 == 3 {
                // Dropped before any graph read it.
                drop(x);
                drop(mbox);
                continue;
            }
            let y = x.add(&one).unwrap();
            crate::mlx::async_eval(&[&y]).unwrap();
            let data: Vec<u8> = [i, -i].iter().flat_map(|v| v.to_le_bytes()).collect();
            mbox.deliver(&data);
            assert_eq!(y.to_vec::<i32>().unwrap(), vec![i + 1, 1 - i]);
        }
        // A box is reused once its kernel ran, not made anew each time; the
        // boxes of the six dropped unlaunched are not.
        assert!(
            Mailbox::pinned_boxes() <= 6 + 2,
            "{}",
            Mailbox::pinned_boxes()
        );
    }
}
