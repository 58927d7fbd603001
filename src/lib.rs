//! mlx-dist: run one language model across several machines with MLX.
//!
//! The table of contents:
/// The per-layer KV cache of a sequence.
pub mod cache;
/// Tensors on the wire: activations between pipeline stages.
pub mod codec;
/// Settings from the environment: the one reader of `MLX_DIST_*`.
pub mod config;
/// The coordinator: planning over workers, running sequences through the
/// chain, re-planning around dead workers.
pub mod coordinator;
/// A model without its weights (config, footprint, tokenizer files), as a
/// worker describes it to a coordinator that holds no copy.
pub mod description;
/// What a device can do: memory, chip, measured throughput.
pub mod device;
pub mod error;
/// Token generation: the step loop, stop rules and response records.
pub mod generate;
/// The binding to MLX's C++ API.
pub mod mlx;
/// Architectures and the `model_type` registry.
pub mod models;
/// KV caches of ended sequences kept for later ones with the same start.
pub mod prefix;
/// The gRPC API (generated from `proto/`).
pub mod proto;
/// Logits processors and samplers.
pub mod sample;
/// Placing a model's layers on devices: footprints, strategies, plans.
pub mod sharding;
/// Tokenization, chat templates and streaming detokenization.
pub mod tokenizer;
/// Reaching workers: the connector, TLS, the cluster token, HTTP/2 settings.
pub mod transport;
/// Helpers many modules share: the poisoned-lock guard, the network runtime.
pub mod util;
/// Finding models and reading their weights.
pub mod weights;
/// Wire types and domain types: proto messages checked and converted, both
/// ways, in one place.
pub mod wire;
/// The worker: a gRPC server holding one pipeline stage.
pub mod worker;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};

/// The Python extension module `mlx_dist._core`.
#[cfg(feature = "python")]
#[pyo3::pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::py::cluster::{
        load_cluster, make_certificate, run_worker, set_cluster_token, set_tls_ca,
        start_local_worker, stop_local_worker, worker_info, PyCluster,
    };
    #[pymodule_export]
    use crate::py::generate::{PyGeneration, PyLogprobs, PyRecord};
    #[pymodule_export]
    use crate::py::model::{convert, load, PyModel};
    #[pymodule_export]
    use crate::py::tokenizer::PyTokenizer;
    #[pymodule_export]
    use crate::py::{device_info, memory, PyMemory};
    #[pymodule_export]
    use crate::py::{
        CapacityError, KvBudgetExceeded, KvBudgetFull, NotReadyError, TlsError, WorkerError,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        crate::py::init_exceptions(m)
    }

    /// The version of the MLX library mlx-dist runs on.
    #[pyfunction]
    fn mlx_version() -> String {
        crate::mlx::version()
    }

    /// The `model_type`s mlx-dist can run.
    #[pyfunction]
    fn supported_model_types() -> Vec<&'static str> {
        crate::models::supported_model_types()
    }
}
