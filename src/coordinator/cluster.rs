//! A model loaded over a chain of workers: reaching the workers, planning,
//! and loading each stage.
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::description::ModelDescription;
use crate::device::Capabilities;
use crate::error::{Error, Result};
use crate::models::ModelArgs;
use crate::prefix::PrefixIndex;
use crate::proto::{Compression, LoadShardRequest, ModelSource as ProtoSource};
use crate::sharding::{plan, Footprint, Plan, Strategy};
use crate::transport::TransportConfig;

use crate::weights::{resolve, Weights};

use super::files::{model_files, model_id, push_files};
use super::link::{finish_loading, Link};

/// How to reach a worker and, optionally, what it is declared to be able
/// to do (overriding what it measures).
#[derive(Clone, Debug, Default)]
pub struct WorkerSpec {
    pub address: String,
    pub declared: Option<Capabilities>,
}

/// Options of `Cluster::load`. `default` gives the defaults, `from_env` (in
/// `config`) what the environment changes of them.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub strategy: Strategy,
    /// Tokens of KV cache to leave room for on each stage.
    pub kv_tokens: u64,
    pub compression: Compression,
    /// How long to keep trying to reach each worker.
    pub connect_timeout: Duration,
    /// Longest prompt chunk sent through the pipeline at once: smaller
    /// chunks keep every stage busy during a long prefill and let other
    /// sequences' decode steps in between.
    pub prefill_chunk: usize,
    /// Decode steps go round a ring: the last stage sends each token
    /// straight to the first, which runs the next step without waiting on
    /// the coordinator (one network hop per stage instead of two).
    pub ring: bool,
    /// How long to wait for one step's reply before asking the stages
    /// whether they still answer (plus 0.1 s per token of the step, for long
    /// prefill chunks on slow devices).
    pub step_timeout: Duration,
    /// How the workers are reached: the cluster token, TLS, keepalive.
    pub transport: TransportConfig,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            strategy: Strategy::Balanced,
            kv_tokens: 4096,
            compression: Compression::None,
            connect_timeout: Duration::from_secs(10),
            prefill_chunk: 1024,
            ring: true,
            step_timeout: Duration::from_secs(30),
            transport: TransportConfig::default(),
        }
    }
}

/// Loading progress: (stage index, bytes done, bytes in all, message).
pub type Progress<'a> = &'a (dyn Fn(usize, u64, u64, &str) + Sync);

/// A worker in the cluster.
#[derive(Clone)]
pub struct StageHandle {
    pub address: String,
    pub name: String,
    /// The worker runs inside this process (`worker::start_local`), reached
    /// without gRPC.
    pub local: bool,
    pub(super) link: Link,
}

impl StageHandle {
    /// How errors name this stage: (its name, its address), the address
    /// empty for the worker inside this process (its `in-process:N` name is a
    /// detail).
    pub fn named(&self) -> (String, String) {
        let shown = if self.local {
            String::new()
        } else {
            self.address.clone()
        };
        (self.name.clone(), shown)
    }
}

impl std::fmt::Display for StageHandle {
    /// How messages name the worker: `name (address)`, or only its name for
    /// the worker inside this process (its `in-process:N` name is a detail).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.local {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{} ({})", self.name, self.address)
        }
    }
}

/// A model loaded over a chain of workers (one plan; `recovery` re-plans).
pub struct Cluster {
    /// config.json (or its GGUF equivalent).
    pub config: serde_json::Value,
    pub args: ModelArgs,
    pub plan: Plan,
    pub stages: Vec<StageHandle>,
    /// Step time of each stage in the last step, microseconds.
    pub last_stage_micros: Arc<std::sync::Mutex<Vec<u32>>>,
    /// Longest prompt chunk sent through the pipeline at once.
    pub prefill_chunk: usize,
    /// Decode steps go round the ring (`ClusterOptions::ring`).
    pub ring: bool,
    /// What the stages keep of ended sequences, for later prompts.
    pub prefixes: Arc<std::sync::Mutex<PrefixIndex>>,
    /// `ClusterOptions::step_timeout`.
    pub step_timeout: Duration,
    /// How the stages are reached (asked whether they answer, for one).
    pub transport: Arc<TransportConfig>,
    /// The model as a worker described it, when this process has no copy.
    pub description: Option<ModelDescription>,
}

/// The model as the plan needs it.
struct Known {
    config: serde_json::Value,
    args: ModelArgs,
    footprint: Footprint,
    /// This process's copy (its files and their id), to send a worker that
    /// lacks the model.
    copy: Option<(Vec<(std::path::PathBuf, String)>, String)>,
    /// What the workers are asked to load: a path or repo id.
    path: String,
    description: Option<ModelDescription>,
}

/// The model `source` as the first worker that can read it describes it,
/// for a coordinator without it (`here` says why it could not read it).
async fn described(source: &str, handles: &mut [StageHandle], here: Error) -> Result<Known> {
    let mut why = Vec::new();
    for h in handles.iter_mut().filter(|h| !h.local) {
        match h.link.describe_model(source).await {
            Ok(d) => {
                let d = ModelDescription::try_from(d)?;
                let (args, _) = d.args()?;
                tracing::info!(
                    "{source} is not readable here ({here}); planned from {}'s copy",
                    h.name
                );
                return Ok(Known {
                    config: d.config.clone(),
                    args,
                    footprint: d.footprint.clone(),
                    copy: None,
                    path: source.to_string(),
                    description: Some(d),
                });
            }
            Err(s) => why.push(format!("{}: {}", h.name, s.message())),
        }
    }
    Err(Error::NotFound(format!(
        "{here}; no worker has it either ({})",
        if why.is_empty() {
            "no remote workers".to_string()
        } else {
            why.join("; ")
        }
    )))
}

/// Capabilities declared in a cluster config take the place of measured ones.
fn declared_over(mut c: Capabilities, d: &Capabilities) -> Capabilities {
    if !d.name.is_empty() {
        c.name = d.name.clone();
    }
    if !d.chip.is_empty() {
        c.chip = d.chip.clone();
    }
    if d.gpu_cores > 0 {
        c.gpu_cores = d.gpu_cores;
    }
    if d.memory_total > 0 {
        c.memory_total = d.memory_total;
    }
    if d.memory_available > 0 {
        c.memory_available = d.memory_available;
    }
    if d.matmul_gflops > 0.0 {
        c.matmul_gflops = d.matmul_gflops;
    }
    if d.bandwidth_gbs > 0.0 {
        c.bandwidth_gbs = d.bandwidth_gbs;
    }
    c
}

/// Connects to one worker, retrying with backoff until `deadline` while
/// it cannot be reached (a TLS mismatch or a bad address is returned at
/// once: retrying does not mend those).
async fn connect_retrying(
    addr: &str,
    within: Duration,
    transport: &TransportConfig,
) -> Result<Link> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = within.saturating_sub(start.elapsed());
        match Link::open(
            addr,
            left.min(Duration::from_secs(3))
                .max(Duration::from_millis(200)),
            transport,
        )
        .await
        {
            Ok(c) => return Ok(c),
            Err(Error::StageFailed { cause, .. }) if start.elapsed() + wait >= within => {
                return Err(Error::stage_failed(
                    addr,
                    addr,
                    format!(
                        "{cause} (after {attempts} attempts in {:.1} s)",
                        start.elapsed().as_secs_f64()
                    ),
                ))
            }
            Err(Error::StageFailed { .. }) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What `stage`'s refusal `s` means (`transport::error_of`).
pub(super) fn worker_error(stage: &StageHandle, s: tonic::Status) -> Error {
    stage_error(stage, &[], s)
}

/// `worker_error` for a refusal that may come from a later stage of the
/// chain `stages`, through `first`: it names the stage it comes from.
pub(super) fn stage_error(first: &StageHandle, stages: &[StageHandle], s: tonic::Status) -> Error {
    crate::transport::error_of(s, |from| match from {
        None => first.named(),
        Some(a) => match stages.iter().chain([first]).find(|h| h.address == a) {
            Some(h) => h.named(),
            None => (a.to_string(), a.to_string()),
        },
    })
}

impl Cluster {
    /// Plans `source` over `workers` and loads each stage; a worker that
    /// cannot read the model itself gets its files from here.
    pub async fn load(
        source: &str,
        workers: &[WorkerSpec],
        opts: &ClusterOptions,
        progress: Progress<'_>,
    ) -> Result<Cluster> {
        if workers.is_empty() {
            return Err(Error::InvalidArgument("no workers given".into()));
        }
        // The model as this process has it; a coordinator with no copy of
        // the weights (or none at all) asks the workers below.
        let local = match resolve(source).and_then(|src| Ok((Weights::open(&src)?, src))) {
            Err(e) if !matches!(e, Error::NotFound(_) | Error::InvalidModel { .. }) => {
                return Err(e)
            }
            local => local,
        };

        // Reach every worker (concurrently) and learn what it can do.
        let mut handles = Vec::new();
        let mut caps = Vec::new();
        let connects = workers
            .iter()
            .map(|w| connect_retrying(&w.address, opts.connect_timeout, &opts.transport));
        let clients = futures::future::join_all(connects).await;
        for (spec, link) in workers.iter().zip(clients) {
            let mut link = link?;
            let info = tokio::time::timeout(Duration::from_secs(60), link.device_info())
                .await
                .map_err(|_| {
                    let a = &spec.address;
                    Error::stage_failed(a, a, "it did not describe itself within 60 s")
                })?
                .map_err(|s| {
                    let a = &spec.address;
                    crate::transport::error_of(s, |_| (a.clone(), a.clone()))
                })?;
            let mut c = Capabilities::from(info.device.clone().unwrap_or_default());
            if let Some(d) = &spec.declared {
                c = declared_over(c, d);
            }
            handles.push(StageHandle {
                local: crate::worker::is_local(&spec.address),
                address: spec.address.clone(),
                name: c.name.clone(),
                link,
            });
            caps.push(c);
        }
        let model = match local {
            Ok((weights, src)) => {
                let (args, tied) = crate::description::args_of(&weights)?;
                let footprint = Footprint::from_weights(&weights, &args, tied);
                let files = model_files(&src)?;
                let id = model_id(&files)?;
                let path = std::fs::canonicalize(src.path())?
                    .to_string_lossy()
                    .into_owned();
                Known {
                    config: weights.config.clone(),
                    args,
                    footprint,
                    copy: Some((files, id)),
                    path,
                    description: None,
                }
            }
            Err(here) => described(source, &mut handles, here).await?,
        };
        let Known {
            config,
            args,
            footprint,
            copy,
            path,
            description,
        } = model;
        let plan = plan(&footprint, &caps, &opts.strategy, opts.kv_tokens)?;
        let mut stages = Vec::new();
        for (i, st) in plan.stages.iter().enumerate() {
            let handle = handles[st.device].clone();
            let next = plan
                .stages
                .get(i + 1)
                .map(|n| handles[n.device].address.clone())
                .unwrap_or_default();
            let first = if i + 1 == plan.stages.len() {
                handles[plan.stages[0].device].address.clone()
            } else {
                String::new()
            };
            let mut req = LoadShardRequest {
                source: Some(ProtoSource {
                    path: path.clone(),
                    model_id: String::new(),
                }),
                layer_start: st.layers.start as u32,
                layer_end: st.layers.end as u32,
                embed: st.embed,
                head: st.head,
                next,
                cache_budget: 0,
                compression: opts.compression as i32,
                first,
            };
            let mut link = handle.link.clone();
            match load_stage(&mut link, req.clone(), i, progress).await {
                Err(s) if s.code() == tonic::Code::NotFound && copy.is_none() => {
                    return Err(Error::stage_failed(
                        &handle.name,
                        &handle.address,
                        format!(
                            "it cannot read the model {source:?} ({}), and this coordinator \
                             has no copy to send it",
                            s.message()
                        ),
                    ));
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    let (files, id) = copy.as_ref().expect("a local copy");
                    // The worker has no copy: try its cache of pushed models,
                    // and push the files if it has none either.
                    req.source = Some(ProtoSource {
                        path: String::new(),
                        model_id: id.clone(),
                    });
                    match load_stage(&mut link, req.clone(), i, progress).await {
                        Err(s) if s.code() == tonic::Code::NotFound => {
                            let Some(client) = link.client() else {
                                return Err(worker_error(&handle, s));
                            };
                            progress(i, 0, 0, &format!("sending the model to {}", handle.name));
                            push_files(client, id, files, |d, t| progress(i, d, t, "sending"))
                                .await?;
                            load_stage(&mut link, req, i, progress)
                                .await
                                .map_err(|s| worker_error(&handle, s))?;
                        }
                        r => r.map_err(|s| worker_error(&handle, s))?,
                    }
                }
                r => r.map_err(|s| worker_error(&handle, s))?,
            }
            stages.push(handle);
        }
        Ok(Cluster {
            config,
            args,
            plan,
            stages,
            description,
            last_stage_micros: Arc::new(std::sync::Mutex::new(Vec::new())),
            prefill_chunk: opts.prefill_chunk,
            ring: opts.ring,
            prefixes: Default::default(),
            step_timeout: opts.step_timeout,
            transport: Arc::new(opts.transport.clone()),
        })
    }
}

async fn load_stage(
    link: &mut Link,
    req: LoadShardRequest,
    stage: usize,
    progress: Progress<'_>,
) -> std::result::Result<(), tonic::Status> {
    let stream = link.load_shard(req).await?;
    finish_loading(stream, |p| {
        progress(
            stage,
            p.bytes_loaded,
            p.bytes_total,
            if p.done { "loaded" } else { "loading" },
        )
    })
    .await
}
