//! mlx-dist: run one language model across several machines with MLX.
//!
//! The table of contents:
pub mod error;
/// The binding to MLX's C++ API.
pub mod mlx;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};

#[cfg(feature = "python")]
#[pyo3::pymodule]
mod _core {
    use pyo3::prelude::*;

    /// The version of the MLX library mlx-dist runs on.
    #[pyfunction]
    fn mlx_version() -> String {
        crate::mlx::version()
    }
}
