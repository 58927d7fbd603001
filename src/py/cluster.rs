//! `Cluster`: a model loaded over a chain of workers, and `run_worker`,
//! which serves one.
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use super::tokenizer::PyTokenizer;
use crate::coordinator::{ClusterHandle, RecoveryOptions};
use crate::coordinator::{ClusterOptions, WorkerSpec};
use crate::device::Capabilities;
use crate::error::Error;
use crate::proto::Compression;
use crate::sharding::Strategy;
use crate::tokenizer::Tokenizer;
use crate::transport::TlsIdentity;
use crate::util::runtime;
use crate::weights::{resolve, Weights};
use crate::worker::{serve, WorkerConfig};

#[pyclass(name = "Cluster", module = "mlx_dist._core", frozen)]
pub struct PyCluster {
    pub inner: Arc<ClusterHandle>,
}

fn compression(name: &str) -> Result<Compression, Error> {
    match name {
        "" | "none" => Ok(Compression::None),
        "int8" => Ok(Compression::Int8),
        other => Err(Error::InvalidArgument(format!(
            "unknown compression {other:?}; use \"none\" or \"int8\""
        ))),
    }
}

/// Loads `path_or_repo` over `workers` ("host:port" each), planned with
/// `strategy`. `declared_json` optionally gives a JSON list (one entry per
/// worker, or null) of declared capabilities. `progress(stage, done,
/// total, message)` is called while shards load. When a stage fails, the
/// cluster re-plans over the workers left (unless `recover` is false),
/// waiting up to `recovery_wait` seconds for room for the model.
#[pyfunction]
#[pyo3(signature = (path_or_repo, workers, strategy = "balanced", compression_name = "none", kv_tokens = 4096, connect_timeout = 10.0, declared_json = None, progress = None, recover = true, recovery_wait = 30.0, prefill_chunk = 1024, ring = true))]
#[allow(clippy::too_many_arguments)]
pub fn load_cluster(
    py: Python<'_>,
    path_or_repo: String,
    workers: Vec<String>,
    strategy: &str,
    compression_name: &str,
    kv_tokens: u64,
    connect_timeout: f64,
    declared_json: Option<String>,
    progress: Option<Py<PyAny>>,
    recover: bool,
    recovery_wait: f64,
    prefill_chunk: usize,
    ring: bool,
) -> PyResult<(PyCluster, PyTokenizer)> {
    let strategy: Strategy = strategy.parse()?;
    let declared: Vec<Option<Capabilities>> = match declared_json {
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| Error::InvalidArgument(format!("declared capabilities: {e}")))?,
        None => vec![None; workers.len()],
    };
    if declared.len() != workers.len() {
        return Err(Error::InvalidArgument(
            "declared capabilities must have one entry per worker".into(),
        )
        .into());
    }
    let specs: Vec<WorkerSpec> = workers
        .into_iter()
        .zip(declared)
        .map(|(address, declared)| WorkerSpec { address, declared })
        .collect();
    let opts = ClusterOptions {
        strategy,
        kv_tokens,
        compression: compression(compression_name)?,
        connect_timeout: Duration::from_secs_f64(connect_timeout.max(0.1)),
        prefill_chunk: prefill_chunk.max(1),
        ring,
    };
    let report = move |stage: usize, done: u64, total: u64, msg: &str| {
        if let Some(cb) = &progress {
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (stage, done, total, msg)) {
                    e.print(py);
                }
            });
        }
    };
    let recovery = RecoveryOptions {
        enabled: recover,
        wait: Duration::from_secs_f64(recovery_wait.max(0.0)),
        ..RecoveryOptions::default()
    };
    // Recoveries are worth a line in the coordinator's log.
    init_logging();
    let (cluster, tokenizer) = py.detach(|| -> crate::Result<(ClusterHandle, Tokenizer)> {
        let weights = Weights::open(&resolve(&path_or_repo)?)?;
        let tokenizer = Tokenizer::for_model(&weights)?;
        let cluster = runtime().block_on(ClusterHandle::load(
            &path_or_repo,
            &specs,
            &opts,
            recovery,
            &report,
        ))?;
        Ok((cluster, tokenizer))
    })?;
    Ok((
        PyCluster {
            inner: Arc::new(cluster),
        },
        PyTokenizer { inner: tokenizer },
    ))
}

#[pymethods]
impl PyCluster {
    /// Which device holds which layers, and why (a table).
    #[getter]
    fn plan_text(&self) -> String {
        self.inner.current().plan.to_string()
    }

    /// The plan as JSON.
    #[getter]
    fn plan_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.current().plan).map_err(|e| Error::from(e).into())
    }

    /// Layers of the model.
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.current().args.num_hidden_layers
    }

    #[getter]
    fn vocab_size(&self) -> i32 {
        self.inner.current().args.vocab_size
    }

    /// The longest sequence the model was trained for, when its config says.
    #[getter]
    fn context_length(&self) -> Option<i64> {
        self.inner.current().args.max_position_embeddings
    }

    #[getter]
    fn model_type(&self) -> String {
        self.inner.current().args.model_type.clone()
    }

    /// Worker names, first stage first.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.inner
            .current()
            .stages
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    /// Worker addresses, first stage first.
    #[getter]
    fn addresses(&self) -> Vec<String> {
        self.inner
            .current()
            .stages
            .iter()
            .map(|s| s.address.clone())
            .collect()
    }

    /// Compute time of each stage in the last step, in microseconds.
    #[getter]
    fn last_stage_micros(&self) -> Vec<u32> {
        self.inner
            .current()
            .last_stage_micros
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Kept prefixes the coordinator names (each stage holds its own share
    /// of them: `worker_info`'s `prefix_entries`, `prefix_bytes` and
    /// `prefix_budget_bytes`).
    #[getter]
    fn prefix_index_entries(&self) -> usize {
        crate::util::lock(&self.inner.current().prefixes).len()
    }

    /// Re-plans so far (0: the cluster runs as first loaded).
    #[getter]
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }

    /// Every worker configured or announced, in or out of the plan.
    #[getter]
    fn all_workers(&self) -> Vec<String> {
        self.inner
            .workers()
            .into_iter()
            .map(|w| w.address)
            .collect()
    }

    /// Workers left out of the current plan because they did not answer.
    #[getter]
    fn excluded(&self) -> Vec<String> {
        self.inner.excluded()
    }

    /// The re-plans so far (the latest 32), as JSON.
    #[getter]
    fn recoveries_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.events()).map_err(|e| Error::from(e).into())
    }

    /// Adds a worker that announced itself; true if it was not known.
    fn add_worker(&self, address: String) -> PyResult<bool> {
        check_address(&address)?;
        Ok(self.inner.add_worker(&address))
    }

    /// Whether a worker left out of the plan answers again.
    fn excluded_back(&self, py: Python<'_>) -> bool {
        let h = self.inner.clone();
        py.detach(move || runtime().block_on(h.excluded_back()))
    }

    /// Plans the model again over the workers that answer now (blocking).
    /// Sequences running continue on the new plan by replaying their tokens.
    fn replan(&self, py: Python<'_>, reason: String) -> PyResult<u64> {
        let h = self.inner.clone();
        py.detach(move || {
            let epoch = h.epoch();
            runtime().block_on(h.replan(epoch, &reason))?;
            Ok::<_, Error>(h.epoch())
        })
        .map_err(Into::into)
    }
}

/// Runs a worker on `host:port` until interrupted (blocking). Prints
/// `listening on HOST:PORT` once ready. With `tls_cert_pem` and
/// `tls_key_pem` (PEM texts) it serves TLS. `max_sequences` and
/// `max_message_bytes` bound what it takes (defaults: 256, 160 MiB).
/// `prefix_cache_mb` bounds the KV cache it keeps from ended sequences
/// (default `MLX_DIST_PREFIX_CACHE_MB`, else 1024; at most a quarter of its
/// KV budget; 0: none).
#[pyfunction]
#[pyo3(signature = (host = "127.0.0.1".to_string(), port = 0, name = None, local_files = true, tls_cert_pem = None, tls_key_pem = None, max_sequences = None, max_message_bytes = None, prefix_cache_mb = None, kv_budget_mb = None))]
#[allow(clippy::too_many_arguments)]
pub fn run_worker(
    py: Python<'_>,
    host: String,
    port: u16,
    name: Option<String>,
    local_files: bool,
    tls_cert_pem: Option<String>,
    tls_key_pem: Option<String>,
    max_sequences: Option<usize>,
    max_message_bytes: Option<usize>,
    prefix_cache_mb: Option<u64>,
    kv_budget_mb: Option<u64>,
) -> PyResult<()> {
    let tls = match (tls_cert_pem, tls_key_pem) {
        (Some(cert), Some(key)) => Some(TlsIdentity::new(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(
                Error::InvalidArgument("TLS needs both a certificate and its key".into()).into(),
            )
        }
    };
    if max_sequences == Some(0) {
        return Err(Error::InvalidArgument("max_sequences must be at least 1".into()).into());
    }
    if max_message_bytes.is_some_and(|b| b < 1 << 20) {
        return Err(
            Error::InvalidArgument("max_message_bytes must be at least 1 MiB".into()).into(),
        );
    }
    init_logging();
    let name = name.unwrap_or_else(|| {
        let h = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let h = h.trim();
        format!("{}:{port}", if h.is_empty() { host.as_str() } else { h })
    });
    let mut cfg = WorkerConfig::new(&name);
    cfg.allow_local_paths = local_files;
    cfg.tls = tls;
    if let Some(n) = max_sequences {
        cfg.max_sequences = n;
    }
    if let Some(b) = max_message_bytes {
        cfg.max_message_bytes = b;
    }
    if let Some(mb) = prefix_cache_mb {
        cfg.prefix_cache_bytes = mb.saturating_mul(1 << 20);
    }
    match kv_budget_mb {
        Some(0) => {
            return Err(Error::InvalidArgument("kv_budget_mb must be at least 1".into()).into())
        }
        Some(mb) => cfg.kv_budget_bytes = Some(mb.saturating_mul(1 << 20)),
        None => {}
    }
    py.detach(|| runtime().block_on(serve(&host, port, cfg)))?;
    Ok(())
}

/// Logs to stderr, filtered by `MLX_DIST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MLX_DIST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Starts a worker inside this process, reached without gRPC (see
/// `worker::start_local`), and returns the address that names it.
#[pyfunction]
pub fn start_local_worker(py: Python<'_>) -> PyResult<String> {
    init_logging();
    Ok(py.detach(crate::worker::start_local)?)
}

/// Stops a worker `start_local_worker` started.
#[pyfunction]
pub fn stop_local_worker(address: &str) {
    crate::worker::stop_local(address);
}

/// What the worker at `address` reports about itself (DeviceInfo), as JSON.
#[pyfunction]
#[pyo3(signature = (address, timeout = 5.0))]
pub fn worker_info(py: Python<'_>, address: String, timeout: f64) -> PyResult<String> {
    let info = py.detach(|| {
        runtime().block_on(async {
            let within = Duration::from_secs_f64(timeout.max(0.1));
            let mut link = crate::coordinator::Link::open(&address, within).await?;
            link.device_info()
                .await
                .map_err(|s| crate::transport::error_of(s, |_| (address.clone(), address.clone())))
        })
    })?;
    Ok(serde_json::to_string(&info).map_err(Error::from)?)
}

/// Sets the cluster token this process sends to workers and, as a worker,
/// requires (`None` falls back to `MLX_DIST_TOKEN`).
#[pyfunction]
#[pyo3(signature = (token = None))]
pub fn set_cluster_token(token: Option<String>) {
    crate::transport::set_cluster_token(token);
}

/// Sets the CA certificate (PEM text) this process trusts when it connects
/// to workers, turning TLS on for every later connection; `None`: plain
/// connections (also ignoring `MLX_DIST_TLS_CA`).
#[pyfunction]
#[pyo3(signature = (pem = None))]
pub fn set_tls_ca(pem: Option<String>) -> PyResult<()> {
    crate::transport::set_tls_ca(pem)?;
    Ok(())
}

/// A self-signed certificate naming `hosts` (DNS names or IP addresses) and
/// its private key, as PEM texts `(cert, key)`.
#[pyfunction]
pub fn make_certificate(hosts: Vec<String>) -> PyResult<(String, String)> {
    Ok(crate::transport::make_certificate(&hosts)?)
}

/// A worker address must be `host:port`.
fn check_address(address: &str) -> crate::Result<()> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok && address.len() <= 256 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "bad worker address {address:?}: expected host:port"
        )))
    }
}
