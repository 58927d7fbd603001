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
use crate::transport::{TlsIdentity, TransportConfig};
use crate::util::runtime;
use crate::weights::{local_folder, resolve, Weights};
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

/// The token and CA certificate (PEM) of this process's calls that are not
/// given their own, as `set_cluster_token` and `set_tls_ca` set them
/// (`None`: not set, the environment's then; `Some(None)`: none). The
/// Python API's are process-wide: `mlx_dist.load(..., token=, tls_ca=)`
/// sets them for the calls that follow, `worker_info` among them.
struct Defaults {
    token: Option<Option<String>>,
    tls_ca: Option<Option<String>>,
}

static DEFAULTS: std::sync::RwLock<Defaults> = std::sync::RwLock::new(Defaults {
    token: None,
    tls_ca: None,
});

fn defaults() -> std::sync::RwLockReadGuard<'static, Defaults> {
    DEFAULTS.read().unwrap_or_else(|e| e.into_inner())
}

fn set_defaults(f: impl FnOnce(&mut Defaults)) {
    f(&mut DEFAULTS.write().unwrap_or_else(|e| e.into_inner()));
}

/// How a call reaches workers: `token` and `tls_ca` (PEM) when given
/// (empty: none, plain connections), else what `set_cluster_token` and
/// `set_tls_ca` set, else the environment's (`TransportConfig::from_env`),
/// with `failure_timeout` (seconds) and `h2_window_mb` over it when given.
fn transport(
    token: Option<String>,
    tls_ca: Option<String>,
    failure_timeout: Option<f64>,
    h2_window_mb: Option<u32>,
) -> crate::Result<TransportConfig> {
    let (token, ca) = {
        let d = defaults();
        (
            token.map(Some).or_else(|| d.token.clone()),
            tls_ca.map(Some).or_else(|| d.tls_ca.clone()),
        )
    };
    let mut t = TransportConfig::from_env_with_ca(ca)?;
    if let Some(token) = token {
        t = t.with_token(token);
    }
    if let Some(s) = failure_timeout {
        t.failure_timeout = seconds(s, "failure_timeout")?;
    }
    if let Some(mb) = h2_window_mb {
        t.h2_window = TransportConfig::window_of_mb(mb);
    }
    Ok(t)
}

/// A positive number of seconds.
fn seconds(s: f64, what: &str) -> crate::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what} must be a number of seconds above 0, got {s}"
            ))
        })
}

/// Loads `path_or_repo` over `workers` ("host:port" each), planned with
/// `strategy`. `declared_json` optionally gives a JSON list (one entry per
/// worker, or null) of declared capabilities. `progress(stage, done,
/// total, message)` is called while shards load. When a stage fails, the
/// cluster re-plans over the workers left (unless `recover` is false),
/// waiting up to `recovery_wait` seconds for room for the model. The
/// workers are reached with `token`, `tls_ca` (PEM), `failure_timeout` and
/// `h2_window_mb` (see `transport`); a step's reply is waited for
/// `step_timeout` seconds (plus 0.1 per token) before the stages are asked
/// whether they answer. Options left out (None) come from `MLX_DIST_*`
/// variables (`ClusterOptions::from_env`), else the defaults.
#[pyfunction]
#[pyo3(signature = (path_or_repo, workers, strategy = "balanced", compression_name = "none", kv_tokens = 4096, connect_timeout = 10.0, declared_json = None, progress = None, recover = true, recovery_wait = 30.0, prefill_chunk = 1024, ring = true, token = None, tls_ca = None, step_timeout = None, failure_timeout = None, h2_window_mb = None))]
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
    token: Option<String>,
    tls_ca: Option<String>,
    step_timeout: Option<f64>,
    failure_timeout: Option<f64>,
    h2_window_mb: Option<u32>,
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
    let mut opts =
        ClusterOptions::from_env_with(transport(token, tls_ca, failure_timeout, h2_window_mb)?);
    opts.strategy = strategy;
    opts.kv_tokens = kv_tokens;
    opts.compression = compression(compression_name)?;
    opts.connect_timeout = Duration::from_secs_f64(connect_timeout.max(0.1));
    opts.prefill_chunk = prefill_chunk.max(1);
    opts.ring = ring;
    if let Some(s) = step_timeout {
        opts.step_timeout = seconds(s, "step_timeout")?;
    }
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
        let local = local_tokenizer(&path_or_repo)?;
        let cluster = runtime().block_on(ClusterHandle::load(
            &path_or_repo,
            &specs,
            &opts,
            recovery,
            &report,
        ))?;
        let tokenizer = match (local, &cluster.current().description) {
            (Some(t), _) => t,
            (None, Some(d)) => d.tokenizer()?,
            (None, None) => {
                return Err(Error::NotFound(format!(
                    "no tokenizer for {path_or_repo} here, and no worker sent one"
                )))
            }
        };
        Ok((cluster, tokenizer))
    })?;
    Ok((
        PyCluster {
            inner: Arc::new(cluster),
        },
        PyTokenizer { inner: tokenizer },
    ))
}

/// The tokenizer of `path_or_repo` as this process has it: the model's, or
/// the tokenizer files alone (a coordinator holding no weights); `None`
/// when it has neither, for the workers to send.
fn local_tokenizer(path_or_repo: &str) -> crate::Result<Option<Tokenizer>> {
    match resolve(path_or_repo).and_then(|src| Weights::open(&src)) {
        Ok(weights) => Ok(Some(Tokenizer::for_model(&weights)?)),
        Err(Error::NotFound(_) | Error::InvalidModel { .. }) => {
            let Some(dir) =
                local_folder(path_or_repo).filter(|d| d.join("tokenizer.json").is_file())
            else {
                return Ok(None);
            };
            let config: Option<serde_json::Value> =
                std::fs::read_to_string(dir.join("config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            let eos = config.as_ref().and_then(|c| c.get("eos_token_id"));
            Ok(Some(Tokenizer::from_dir(&dir, eos)?))
        }
        Err(e) => Err(e),
    }
}

#[pymethods]
impl PyCluster {
    /// Which device holds which layers, and why (a table).
    #[getter]
    fn plan_text(&self) -> String {
        self.inner.current().plan.to_string()
    }

    /// The plan, as a dict of its stages.
    #[getter]
    fn plan(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let record = serde_json::to_value(&self.inner.current().plan).map_err(Error::from)?;
        Ok(super::json_to_py(py, &record)?.unbind())
    }

    /// config.json (or its GGUF equivalent), as a dict: this process's
    /// copy's, or the one a worker described.
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(super::json_to_py(py, &self.inner.current().config)?.unbind())
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

    /// The re-plans so far (the latest 32), a dict each.
    #[getter]
    fn recoveries(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let record = serde_json::to_value(self.inner.events()).map_err(Error::from)?;
        Ok(super::json_to_py(py, &record)?.unbind())
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
/// `prefix_cache_mb` bounds the KV cache it keeps from ended sequences (at
/// most a quarter of its KV budget; 0: none). It requires `token` of every
/// call, and reaches the next stage with `token`, `tls_ca`,
/// `failure_timeout` and `h2_window_mb` (see `transport`). `cache_dir` holds
/// pushed models (in its `models/`); `step_spin_us`, `launch_ahead` and
/// `warm_up` are `WorkerConfig`'s `spin`, `launch_ahead` and `warm_up`.
/// Options left out (None) come from `MLX_DIST_*` variables
/// (`WorkerConfig::from_env`), else the defaults.
#[pyfunction]
#[pyo3(signature = (host = "127.0.0.1".to_string(), port = 0, name = None, local_files = true, tls_cert_pem = None, tls_key_pem = None, max_sequences = None, max_message_bytes = None, prefix_cache_mb = None, kv_budget_mb = None, token = None, tls_ca = None, cache_dir = None, step_spin_us = None, launch_ahead = None, warm_up = None, failure_timeout = None, h2_window_mb = None))]
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
    token: Option<String>,
    tls_ca: Option<String>,
    cache_dir: Option<std::path::PathBuf>,
    step_spin_us: Option<u64>,
    launch_ahead: Option<bool>,
    warm_up: Option<bool>,
    failure_timeout: Option<f64>,
    h2_window_mb: Option<u32>,
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
    let transport = transport(token, tls_ca, failure_timeout, h2_window_mb)?;
    let mut cfg = WorkerConfig::from_env_with(&name, transport);
    cfg.allow_local_paths = local_files;
    cfg.tls = tls;
    if let Some(n) = max_sequences {
        cfg.max_sequences = n;
    }
    if let Some(b) = max_message_bytes {
        cfg.max_message_bytes = b;
    }
    match kv_budget_mb {
        Some(0) => {
            return Err(Error::InvalidArgument("kv_budget_mb must be at least 1".into()).into())
        }
        Some(mb) => cfg.kv_budget_bytes = Some(mb.saturating_mul(1 << 20)),
        None => {}
    }
    if let Some(dir) = cache_dir {
        cfg.cache_dir = crate::worker::pushed_models_dir(&dir);
    }
    engine_options(
        &mut cfg,
        prefix_cache_mb,
        step_spin_us,
        launch_ahead,
        warm_up,
    );
    py.detach(|| runtime().block_on(serve(&host, port, cfg)))?;
    Ok(())
}

/// The options of a worker's engine that are given, over `cfg`'s.
fn engine_options(
    cfg: &mut WorkerConfig,
    prefix_cache_mb: Option<u64>,
    step_spin_us: Option<u64>,
    launch_ahead: Option<bool>,
    warm_up: Option<bool>,
) {
    if let Some(mb) = prefix_cache_mb {
        cfg.prefix_cache_bytes = mb.saturating_mul(1 << 20);
    }
    if let Some(us) = step_spin_us {
        cfg.spin = crate::worker::spin_of_micros(us);
    }
    if let Some(on) = launch_ahead {
        cfg.launch_ahead = on;
    }
    if let Some(on) = warm_up {
        cfg.warm_up = on;
    }
}

/// Logs to stderr, filtered by `MLX_DIST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = crate::config::log_filter_from_env()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Starts a worker inside this process, reached without gRPC (see
/// `worker::start_local`), and returns the address that names it. Its
/// options are `run_worker`'s; no token guards it (it has no port).
#[pyfunction]
#[pyo3(signature = (token = None, prefix_cache_mb = None, step_spin_us = None, launch_ahead = None, warm_up = None))]
pub fn start_local_worker(
    py: Python<'_>,
    token: Option<String>,
    prefix_cache_mb: Option<u64>,
    step_spin_us: Option<u64>,
    launch_ahead: Option<bool>,
    warm_up: Option<bool>,
) -> PyResult<String> {
    init_logging();
    let transport = transport(token, None, None, None)?;
    let mut cfg = WorkerConfig::from_env_with("local", transport);
    engine_options(
        &mut cfg,
        prefix_cache_mb,
        step_spin_us,
        launch_ahead,
        warm_up,
    );
    Ok(py.detach(|| crate::worker::start_local(cfg))?)
}

/// Stops a worker `start_local_worker` started.
#[pyfunction]
pub fn stop_local_worker(address: &str) {
    crate::worker::stop_local(address);
}

/// What the worker at `address` reports about itself (DeviceInfo), as a
/// dict of its fields (its parts nested: `device`, `engine`, `memory`,
/// `traffic`); reached with `token` and `tls_ca` as for `load_cluster`.
#[pyfunction]
#[pyo3(signature = (address, timeout = 5.0, token = None, tls_ca = None))]
pub fn worker_info(
    py: Python<'_>,
    address: String,
    timeout: f64,
    token: Option<String>,
    tls_ca: Option<String>,
) -> PyResult<Py<PyAny>> {
    let transport = transport(token, tls_ca, None, None)?;
    let info = py.detach(|| {
        runtime().block_on(async {
            let within = Duration::from_secs_f64(timeout.max(0.1));
            let mut link = crate::coordinator::Link::open(&address, within, &transport).await?;
            link.device_info()
                .await
                .map_err(|s| crate::transport::error_of(s, |_| (address.clone(), address.clone())))
        })
    })?;
    let record = serde_json::to_value(&info).map_err(Error::from)?;
    Ok(super::json_to_py(py, &record)?.unbind())
}

/// Sets the cluster token of this process's later calls that are given
/// none (loads, `worker_info`, workers started here); `None` or empty:
/// none, whatever `MLX_DIST_TOKEN` says.
#[pyfunction]
#[pyo3(signature = (token = None))]
pub fn set_cluster_token(token: Option<String>) {
    set_defaults(|d| d.token = Some(token.filter(|t| !t.is_empty())));
}

/// Sets the CA certificate (PEM text, checked here) this process's later
/// calls that are given none trust when they connect to workers, turning
/// TLS on; `None`: plain connections (whatever `MLX_DIST_TLS_CA` says).
#[pyfunction]
#[pyo3(signature = (pem = None))]
pub fn set_tls_ca(pem: Option<String>) -> PyResult<()> {
    let pem = TransportConfig::default().with_tls_ca(pem)?.tls_ca;
    set_defaults(|d| d.tls_ca = Some(pem));
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
