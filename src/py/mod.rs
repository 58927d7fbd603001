//! The Python bindings (`mlx_dist._core`), one file per Python-facing
//! concept. Errors map to Python exceptions here, in one place.
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::types::PyAnyMethods;
use pyo3::PyErr;

use crate::error::Error;

pyo3::create_exception!(
    mlx_dist._core,
    KvBudgetExceeded,
    pyo3::exceptions::PyMemoryError,
    "A sequence needs more KV cache than a stage's whole budget (`need_bytes`, `budget_bytes`): waiting for memory cannot help."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => PyFileNotFoundError::new_err(msg),
            Error::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(msg)
            }
            Error::Mlx(_) | Error::Io(_) => PyRuntimeError::new_err(msg),
            Error::Worker(_) | Error::NotReady(_) | Error::PrefixMissing(_) | Error::Stalled(_) => {
                pyo3::exceptions::PyConnectionError::new_err(msg)
            }
            Error::ResourceExhausted(_) => pyo3::exceptions::PyMemoryError::new_err(msg),
            Error::KvBudgetExceeded { need, budget, .. } => pyo3::Python::attach(|py| {
                let err = KvBudgetExceeded::new_err(msg);
                let value = err.value(py);
                // Named figures, so that callers never read them from the text.
                let _ = value.setattr("need_bytes", need);
                let _ = value.setattr("budget_bytes", budget);
                err
            }),
            _ => PyValueError::new_err(msg),
        }
    }
}

pub mod cluster;
pub mod generate;
pub mod model;
pub mod tokenizer;

/// Memory figures of MLX, in bytes: (active, peak, cache).
#[pyo3::pyfunction]
pub fn memory() -> (usize, usize, usize) {
    (
        crate::mlx::active_memory(),
        crate::mlx::peak_memory(),
        crate::mlx::cache_memory(),
    )
}

/// This process's device (`Capabilities`) as JSON, without the benchmark
/// unless asked: the benchmark runs MLX work, which a serving process keeps
/// to its engine thread.
#[pyo3::pyfunction]
#[pyo3(signature = (name, benchmark = false))]
pub fn device_info(py: pyo3::Python<'_>, name: &str, benchmark: bool) -> pyo3::PyResult<String> {
    let caps = py.detach(|| {
        if benchmark {
            crate::device::capabilities(name)
        } else {
            crate::device::probe(name)
        }
    })?;
    serde_json::to_string(&caps).map_err(|e| Error::from(e).into())
}
