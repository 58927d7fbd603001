//! The Python bindings (`mlx_dist._core`), one file per Python-facing
//! concept. Errors map to Python exceptions here, in one place.
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::types::{PyAnyMethods, PyModule};
use pyo3::{Bound, PyErr, PyResult, Python};

use crate::error::Error;

// Each kind of failure is its own class, so that callers tell them apart
// by type, never by reading the message.
pyo3::create_exception!(
    mlx_dist._core,
    WorkerError,
    pyo3::exceptions::PyConnectionError,
    "A worker failed, could not be reached, or lost its stream. `stage` (its name) and `address` name the stage of the chain that failed, where known (`None` otherwise)."
);
pyo3::create_exception!(
    mlx_dist._core,
    TlsError,
    WorkerError,
    "The connection to the worker at `address` failed over TLS: its certificate was refused, or one side speaks TLS and the other not. Retrying cannot help."
);
pyo3::create_exception!(
    mlx_dist._core,
    NotReadyError,
    WorkerError,
    "A worker holds no shard (it restarted) or not the sequence (a re-plan dropped it): loading the model again resolves it."
);
pyo3::create_exception!(
    mlx_dist._core,
    CapacityError,
    pyo3::exceptions::PyMemoryError,
    "A request or model that does not fit in the memory there is, even with nothing else running: waiting cannot help."
);
pyo3::create_exception!(
    mlx_dist._core,
    KvBudgetExceeded,
    CapacityError,
    "A sequence needs more KV cache than a stage's whole budget (`need_bytes`, `budget_bytes`): waiting for memory cannot help."
);
pyo3::create_exception!(
    mlx_dist._core,
    KvBudgetFull,
    pyo3::exceptions::PyMemoryError,
    "A stage has no room for one more sequence right now (its KV budget is held by running sequences, or it holds its most): one of them ending makes room."
);

/// Gives the exception classes their attributes' defaults: `None` on an
/// exception raised without them (from Python, or of an unknown stage).
pub fn init_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let worker = py.get_type::<WorkerError>();
    worker.setattr("stage", py.None())?;
    worker.setattr("address", py.None())?;
    Ok(())
}

/// `err` with these attributes set on its value.
fn with_attrs(err: PyErr, attrs: &[(&str, Option<String>)]) -> PyErr {
    Python::attach(|py| {
        let value = err.value(py);
        for (name, v) in attrs {
            let _ = value.setattr(*name, v.clone());
        }
    });
    err
}

/// The one mapping of this crate's errors to Python exceptions.
impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        let known = |s: String| Some(s).filter(|s| !s.is_empty());
        match e {
            Error::NotFound(_) => PyFileNotFoundError::new_err(msg),
            Error::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(msg)
            }
            Error::Mlx(_) | Error::Io(_) => PyRuntimeError::new_err(msg),
            Error::StageFailed { stage, address, .. } => with_attrs(
                WorkerError::new_err(msg),
                &[("stage", known(stage)), ("address", known(address))],
            ),
            Error::Tls { address, .. } => {
                with_attrs(TlsError::new_err(msg), &[("address", known(address))])
            }
            Error::NotReady(_) => NotReadyError::new_err(msg),
            Error::Worker(_) | Error::PrefixMissing(_) | Error::Stalled(_) => {
                WorkerError::new_err(msg)
            }
            Error::ResourceExhausted(_) => CapacityError::new_err(msg),
            Error::KvBudgetFull(_) => KvBudgetFull::new_err(msg),
            Error::KvBudgetExceeded { need, budget, .. } => Python::attach(|py| {
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
