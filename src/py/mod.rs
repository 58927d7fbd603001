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

/// MLX's memory in this process, in bytes.
#[pyo3::pyclass(name = "Memory", frozen, get_all, module = "mlx_dist._core")]
pub struct PyMemory {
    /// Held in live arrays (weights, caches).
    active: usize,
    /// The high-water mark of `active`.
    peak: usize,
    /// Freed, kept by MLX's allocator for reuse.
    cache: usize,
}

/// MLX's memory figures now.
#[pyo3::pyfunction]
pub fn memory() -> PyMemory {
    PyMemory {
        active: crate::mlx::active_memory(),
        peak: crate::mlx::peak_memory(),
        cache: crate::mlx::cache_memory(),
    }
}

/// This process's device (`Capabilities`) as a dict, without the benchmark
/// unless asked: the benchmark runs MLX work, which a serving process keeps
/// to its engine thread.
#[pyo3::pyfunction]
#[pyo3(signature = (name, benchmark = false))]
pub fn device_info(
    py: pyo3::Python<'_>,
    name: &str,
    benchmark: bool,
) -> pyo3::PyResult<pyo3::Py<pyo3::PyAny>> {
    let caps = py.detach(|| {
        if benchmark {
            crate::device::capabilities(name)
        } else {
            crate::device::probe(name)
        }
    })?;
    let record = serde_json::to_value(&caps).map_err(Error::from)?;
    Ok(json_to_py(py, &record)?.unbind())
}

/// A JSON value as the Python object `json.loads` would make of it: how
/// records of the core (a worker's `DeviceInfo`) reach Python as dicts.
pub(crate) fn json_to_py<'py>(
    py: Python<'py>,
    v: &serde_json::Value,
) -> PyResult<pyo3::Bound<'py, pyo3::PyAny>> {
    use pyo3::types::{PyDict, PyDictMethods, PyList, PyListMethods};
    use pyo3::IntoPyObjectExt;
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_bound_py_any(py)?,
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_bound_py_any(py)?,
            (None, Some(i)) => i.into_bound_py_any(py)?,
            _ => n.as_f64().unwrap_or(f64::NAN).into_bound_py_any(py)?,
        },
        Value::String(s) => s.into_bound_py_any(py)?,
        Value::Array(items) => {
            let list = PyList::empty(py);
            for x in items {
                list.append(json_to_py(py, x)?)?;
            }
            list.into_any()
        }
        Value::Object(m) => {
            let dict = PyDict::new(py);
            for (k, x) in m {
                dict.set_item(k, json_to_py(py, x)?)?;
            }
            dict.into_any()
        }
    })
}
