//! The worker: a gRPC server that holds one pipeline stage (a layer range of
//! a model) and the KV caches of its layers for every sequence.
//!
//! All MLX work happens on one engine thread that owns the stage and the
//! caches; gRPC handlers send it jobs. A `Forward` stream from upstream is
//! relayed to the next stage over a stream of this worker's own, so
//! activations go along the chain and replies come back up it.
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{Caches, SlotCache};
use crate::codec;
use crate::device;
use crate::error::{Error, Result};
use crate::mlx::{self, Array};
use crate::models::{Model, Shard};
use crate::prefix::PrefixStore;
use crate::proto::worker_server::{Worker, WorkerServer};
use crate::proto::{
    Compression, DeviceInfo, DeviceInfoRequest, FileChunk, ForwardReply, ForwardRequest,
    LoadProgress, LoadShardRequest, PushFileReply, ReleaseReply, ReleaseRequest, RingReply,
    RingToken, SamplingParams, ShardInfo, Tensor,
};
use crate::sample::{ProcessorConfig, Sampler, SamplerConfig};
use crate::sharding::Footprint;
use crate::transport::{
    cluster_token, error_chain, h2_window, keepalive_interval, open_client, set_cluster_token,
    tls_ca, CheckToken, Client, TlsIdentity, BUDGET_KEY, ERROR_KIND_KEY, KV_BUDGET_EXCEEDED,
    NEED_KEY, PREFIX_MISSING,
};
use crate::util::lock;
use crate::weights::{resolve, Weights};

mod ahead;
use ahead::{launch_ahead, Guess, Post, Prepared};
mod warmup;

/// Largest message a worker accepts unless configured: the activations of a
/// 2048-token prompt chunk of a float32 model with hidden size 8192 are
/// 64 MiB; pushed file chunks are 4 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 160 << 20;

/// Sequences a worker holds at once unless configured.
pub const DEFAULT_MAX_SEQUENCES: usize = 256;

/// Most positions one step may carry (token ids, or activation rows).
pub const MAX_POSITIONS: usize = 1 << 20;

/// How a worker is started.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Shown in logs, errors and `DeviceInfo`.
    pub name: String,
    /// Where pushed model files are kept.
    pub cache_dir: PathBuf,
    /// How long to wait for the next stage's reply to one step.
    pub step_timeout: Duration,
    /// Read models from paths on this machine; when false, only pushed
    /// copies are used.
    pub allow_local_paths: bool,
    /// Serve TLS with this certificate and key; `None`: plain gRPC.
    pub tls: Option<TlsIdentity>,
    /// Largest gRPC message accepted (larger ones are refused unread).
    pub max_message_bytes: usize,
    /// Sequences held at once; one more is refused (RESOURCE_EXHAUSTED).
    pub max_sequences: usize,
    /// Bytes of KV cache kept from ended sequences at most (and at most a
    /// quarter of the KV budget): `MLX_DIST_PREFIX_CACHE_MB` by default.
    pub prefix_cache_bytes: u64,
    /// The KV cache budget of a stage loaded here, unless its load request
    /// names one; `None`: 80% of the device memory free after loading.
    pub kv_budget_bytes: Option<u64>,
    /// Compile the stage's GPU kernels as it loads (`warmup`):
    /// `MLX_DIST_WARM_UP=0/1`, by default where MLX compiles them on first
    /// use (CUDA).
    pub warm_up: bool,
}

impl WorkerConfig {
    pub fn new(name: &str) -> WorkerConfig {
        let cache = std::env::var_os("MLX_DIST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                home.join(".cache/mlx-dist")
            });
        WorkerConfig {
            name: name.to_string(),
            cache_dir: cache.join("models"),
            step_timeout: Duration::from_secs(600),
            allow_local_paths: true,
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_sequences: DEFAULT_MAX_SEQUENCES,
            prefix_cache_bytes: crate::prefix::budget_from_env(),
            kv_budget_bytes: None,
            warm_up: warmup::enabled(std::env::var("MLX_DIST_WARM_UP").ok().as_deref()),
        }
    }
}

fn status(e: Error) -> Status {
    match e {
        Error::NotFound(m) => Status::not_found(m),
        Error::InvalidArgument(_)
        | Error::InvalidModel { .. }
        | Error::UnsupportedArchitecture { .. } => Status::invalid_argument(e.to_string()),
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        Error::KvBudgetExceeded {
            need,
            budget,
            detail,
        } => {
            let mut s = Status::resource_exhausted(detail);
            let m = s.metadata_mut();
            m.insert(
                ERROR_KIND_KEY,
                tonic::metadata::MetadataValue::from_static(KV_BUDGET_EXCEEDED),
            );
            m.insert(NEED_KEY, need.into());
            m.insert(BUDGET_KEY, budget.into());
            s
        }
        Error::NotReady(m) => Status::failed_precondition(m),
        Error::PrefixMissing(m) => {
            let mut s = Status::failed_precondition(m);
            s.metadata_mut().insert(
                ERROR_KIND_KEY,
                tonic::metadata::MetadataValue::from_static(PREFIX_MISSING),
            );
            s
        }
        other => Status::internal(other.to_string()),
    }
}

/// The stage this worker holds.
struct Stage {
    model: Arc<Model>,
    info: ShardInfo,
    next: Option<String>,
    /// The first stage, where the last one sends ring steps' tokens.
    first: Option<String>,
    compression: Compression,
    cache_budget: u64,
    kv_bytes_per_token: u64,
}

impl Stage {
    /// Whether this stage already holds what `req` asks to load.
    fn holds(&self, req: &LoadShardRequest) -> bool {
        let src = req.source.clone().unwrap_or_default();
        let id = if src.model_id.is_empty() {
            &src.path
        } else {
            &src.model_id
        };
        !id.is_empty()
            && *id == self.info.model_id
            && req.layer_start == self.info.layer_start
            && req.layer_end == self.info.layer_end
            && req.embed == self.info.embed
            && req.head == self.info.head
            && (req.cache_budget == 0 || req.cache_budget == self.cache_budget)
    }
}

/// One sequence's state on this stage.
struct Sequence {
    /// Its row in every layer's `SlotCache`.
    slot: usize,
    /// The last stage samples.
    sampler: Option<Sampler>,
    history: Vec<u32>,
    /// KV bytes reserved for its whole length.
    reserved: u64,
    /// Keep the cache as this prefix when the sequence ends.
    keep_as: Option<String>,
    /// When its last step here ended, and how long its next step takes to
    /// come back (the rest of the pipeline and the coordinator), smoothed.
    done: Option<Instant>,
    back_after: Option<Duration>,
}

/// The result of one step on this stage.
struct StepOut {
    /// Activations for the next stage (not on the last stage).
    hidden: Option<Tensor>,
    token: Option<u32>,
    logprobs: Option<Tensor>,
    micros: u32,
    next: Option<String>,
    first: Option<String>,
}

// A step's request moves through the channel once; boxing it would only add
// an allocation per step.
#[allow(clippy::large_enum_variant)]
enum Job {
    Load(
        LoadShardRequest,
        Arc<WorkerConfig>,
        mpsc::Sender<std::result::Result<LoadProgress, Status>>,
    ),
    /// A step, with when it arrived.
    Step(ForwardRequest, oneshot::Sender<Result<StepOut>>, Instant),
    Release(String, oneshot::Sender<u64>),
    Info(oneshot::Sender<EngineInfo>),
    /// Keeps the engine busy until the sender hangs up.
    #[cfg(test)]
    Hold(std_mpsc::Receiver<()>),
}

/// What the engine thread reports about itself.
#[derive(Clone, Default)]
struct EngineInfo {
    shard: Option<ShardInfo>,
    cache_bytes: u64,
    sequences: u32,
    busy: Duration,
    tokens: u64,
    steps: u64,
    batches: u64,
    batched_steps: u64,
    prefix_entries: u32,
    prefix_bytes: u64,
    prefix_budget: u64,
    launched_ahead: u64,
    launched_ahead_undone: u64,
}

struct Engine {
    name: String,
    /// When the job the engine runs started, in microseconds after
    /// `origin` plus one; 0 while it waits for one.
    job_since: Arc<AtomicU64>,
    origin: Instant,
    /// What it reported when it last finished a job.
    last_info: Arc<std::sync::Mutex<EngineInfo>>,
    /// Sequences held at once at most.
    max_sequences: usize,
    stage: Option<Stage>,
    seqs: HashMap<String, Sequence>,
    /// The KV caches of all sequences, one `SlotCache` per layer held.
    caches: Vec<SlotCache>,
    /// Slots of ended sequences, to reuse.
    free: Vec<usize>,
    /// Time spent on steps and loads.
    busy: Duration,
    /// Token positions run, and steps.
    tokens: u64,
    steps: u64,
    /// Batched decode steps run, and the sequence steps in them.
    batches: u64,
    batched_steps: u64,
    /// KV caches of ended sequences kept for later ones with the same start,
    /// and the bytes they may hold (`WorkerConfig::prefix_cache_bytes`).
    prefixes: PrefixStore,
    prefix_cache_bytes: u64,
    /// How long the last decode step (batched or not) took.
    last_decode: Duration,
    /// How long a step's result is polled for before its wait sleeps.
    spin: Duration,
    /// Whether decode steps are launched ahead of their input (`Prepared`).
    launch_ahead: bool,
    /// The step launched ahead, and the one to launch when the engine
    /// next waits for work.
    prepared: Option<Prepared>,
    next_guess: Option<Guess>,
    /// Where prepared steps' inputs wait (made on first use), and where
    /// they are delivered.
    mailboxes: Option<mlx::MailboxStream>,
    post: Arc<Post>,
    /// Steps launched ahead that their input came for, and those undone.
    launched_ahead: u64,
    launched_ahead_undone: u64,
}

/// A step's results, launched but not yet waited for.
enum Pending {
    /// The activations sent to the next stage.
    Hidden(codec::Outgoing),
    /// The last stage's token and the log-probabilities it was drawn from.
    Token { token: Array, logprobs: Array },
    /// Nothing to send (a prompt's chunk on the last stage).
    Nothing,
}

/// A batched decode row's input, checked (`Engine::row_input`).
enum Row {
    /// The first stage's token ids.
    Ids(Vec<i32>),
    /// Uncompressed activations whose bytes fit their shape, to be joined.
    Raw,
    /// Activations decoded on their own (compressed ones).
    Decoded(Array),
}

/// The most decode steps run as one batch.
const MAX_BATCH: usize = 32;

/// The longest a decode batch waits for sequences due back, and how late
/// one may be.
const MAX_GATHER: Duration = Duration::from_millis(2);
const GATHER_SLACK: Duration = Duration::from_micros(200);

impl Engine {
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        // Every line this thread logs names the worker.
        let span = tracing::info_span!("worker", name = %self.name);
        let _in = span.enter();
        // A job taken while gathering a batch, to run next.
        let mut held: Option<Job> = None;
        loop {
            let job = match held.take() {
                Some(j) => j,
                None => {
                    *lock(&self.last_info) = self.info();
                    self.job_since.store(0, Ordering::Relaxed);
                    match self.prepare(&jobs).or_else(|| self.next_job(&jobs)) {
                        Some(j) => j,
                        None => break,
                    }
                }
            };
            let started = Instant::now();
            let since = started.saturating_duration_since(self.origin).as_micros() as u64;
            self.job_since.store(since + 1, Ordering::Relaxed);
            // A prepared step serves the step whose input the post delivered
            // to it; any other job but a question undoes it first.
            let job = match job {
                Job::Step(req, reply, at) if self.delivered_for(&req) => {
                    let p = self.prepared.take();
                    self.run_step(req, reply, at, started, p);
                    continue;
                }
                Job::Info(reply) => Job::Info(reply),
                other => {
                    self.undo_prepared();
                    other
                }
            };
            let job = match job {
                // Decode steps of other sequences waiting now join this one
                // (continuous batching: the batch is whatever is queued),
                // and those due back soon are waited for a little.
                Job::Step(req, reply, at) if self.is_decode(&req) => {
                    let mut batch = vec![(req, reply)];
                    held = self.gather(&jobs, &mut batch);
                    if batch.len() == 1 {
                        let (req, reply) = batch.pop().unwrap();
                        Job::Step(req, reply, at)
                    } else {
                        // The others' arrivals were noted as they joined.
                        self.arrived(&batch[0].0.sequence_id, at);
                        self.batches += 1;
                        self.batched_steps += batch.len() as u64;
                        self.tokens += batch.len() as u64;
                        self.steps += batch.len() as u64;
                        let ids: Vec<String> =
                            batch.iter().map(|(r, _)| r.sequence_id.clone()).collect();
                        self.step_batch(batch);
                        self.finished(&ids, started);
                        self.busy += started.elapsed();
                        continue;
                    }
                }
                other => other,
            };
            match job {
                Job::Load(req, cfg, progress) => {
                    let r = self.load(req, &cfg, &progress);
                    if let Err(e) = r {
                        let _ = progress.blocking_send(Err(status(e)));
                    }
                    self.busy += started.elapsed();
                }
                Job::Step(req, reply, at) => self.run_step(req, reply, at, started, None),
                Job::Release(seq, reply) => {
                    let kept = self.keep(&seq);
                    let freed = self.end(&seq).map_or(0, |s| s.reserved);
                    if let (Some((id, caches)), Some(room)) = (kept, self.prefix_room()) {
                        self.prefixes.insert(id, caches, room);
                    }
                    if freed > 0 {
                        tracing::info!(sequence = %seq, "released, {:.1} MB freed", freed as f64 / 1e6);
                    }
                    let _ = reply.send(freed);
                }
                #[cfg(test)]
                Job::Hold(until) => {
                    let _ = until.recv();
                }
                Job::Info(reply) => {
                    let _ = reply.send(self.info());
                }
            }
        }
        self.undo_prepared();
    }

    /// Runs one sequence's step (with the step prepared for it, if any) and
    /// replies.
    fn run_step(
        &mut self,
        req: ForwardRequest,
        reply: oneshot::Sender<Result<StepOut>>,
        at: Instant,
        started: Instant,
        prepared: Option<Prepared>,
    ) {
        self.arrived(&req.sequence_id, at);
        let seq = req.sequence_id.clone();
        let positions = match &req.hidden {
            Some(t) if req.tokens.is_empty() => t.shape.get(1).copied().unwrap_or(0) as u64,
            _ => req.tokens.len() as u64,
        };
        let guess = self.guess_next(&req);
        let r = match prepared {
            Some(p) => self.step_prepared(req, p),
            None => self.step(req),
        };
        if r.is_err() {
            // A failed step leaves the cache in an unknown state.
            self.end(&seq);
        } else {
            self.tokens += positions;
            self.steps += 1;
            if positions == 1 {
                self.finished(std::slice::from_ref(&seq), started);
                self.next_guess = guess;
            }
        }
        self.busy += started.elapsed();
        let _ = reply.send(r);
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            shard: self.stage.as_ref().map(|s| s.info.clone()),
            cache_bytes: self.caches.iter().map(|c| c.nbytes() as u64).sum(),
            sequences: self.seqs.len() as u32,
            busy: self.busy,
            tokens: self.tokens,
            steps: self.steps,
            batches: self.batches,
            batched_steps: self.batched_steps,
            prefix_entries: self.prefixes.len() as u32,
            prefix_bytes: self.prefixes.bytes(),
            prefix_budget: self.prefix_budget(),
            launched_ahead: self.launched_ahead,
            launched_ahead_undone: self.launched_ahead_undone,
        }
    }

    fn load(
        &mut self,
        req: LoadShardRequest,
        cfg: &WorkerConfig,
        progress: &mpsc::Sender<std::result::Result<LoadProgress, Status>>,
    ) -> Result<()> {
        warmup::keep_compiled_kernels();
        // A new stage replaces the old one and every sequence on it; kept
        // prefixes go too (the coordinator's index starts afresh).
        self.seqs.clear();
        self.drop_caches();
        self.prefixes.clear();
        let src = req.source.clone().unwrap_or_default();
        if let Some(stage) = self.stage.as_mut().filter(|s| s.holds(&req)) {
            // The same layers again (a re-plan that kept them here): only
            // the neighbours change, no weights are read.
            stage.next = Some(req.next.clone()).filter(|n| !n.is_empty());
            stage.first = Some(req.first.clone()).filter(|n| !n.is_empty());
            stage.compression = Compression::try_from(req.compression).unwrap_or(Compression::None);
            let info = stage.info.clone();
            tracing::info!("kept layers {}..{}", info.layer_start, info.layer_end);
            let _ = progress.blocking_send(Ok(LoadProgress {
                bytes_loaded: info.weight_bytes,
                bytes_total: info.weight_bytes,
                done: true,
                shard: Some(info),
            }));
            return Ok(());
        }
        self.stage = None;
        mlx::clear_cache();
        let source = if !src.path.is_empty() {
            if !cfg.allow_local_paths {
                return Err(Error::NotFound(format!(
                    "worker {} reads no local model files",
                    self.name
                )));
            }
            resolve(&src.path)?
        } else {
            let dir = pushed_model_dir(&cfg.cache_dir, &src.model_id)?;
            resolve(dir.to_str().unwrap_or_default())?
        };
        let weights = Weights::open(&source)?;
        let layers = req.layer_start as usize..req.layer_end as usize;
        let shard = Shard {
            layers: layers.clone(),
            embed: req.embed,
            head: req.head,
        };
        let model = Model::load(&weights, Some(shard))?;
        let total = model.nbytes() as u64;
        let mut loaded = 0u64;
        // Read the weights in pieces so progress can be reported.
        let mut group: Vec<&Array> = Vec::new();
        let mut group_bytes = 0u64;
        for a in model.arrays() {
            group_bytes += a.nbytes() as u64;
            group.push(a);
            if group_bytes >= 64 << 20 {
                mlx::eval(&group)?;
                loaded += group_bytes;
                group.clear();
                group_bytes = 0;
                let _ = progress.blocking_send(Ok(LoadProgress {
                    bytes_loaded: loaded,
                    bytes_total: total,
                    ..Default::default()
                }));
            }
        }
        mlx::eval(&group)?;
        let fp = Footprint::from_weights(&weights, &model.args, model.tied());
        let kv_bytes_per_token: u64 = fp.kv_bytes_per_token[layers.clone()].iter().sum();
        let cache_budget = if req.cache_budget > 0 {
            req.cache_budget
        } else if let Some(b) = cfg.kv_budget_bytes {
            b
        } else {
            // What is free now, less a margin for activations.
            let free = device::probe(&self.name)
                .map(|c| c.memory_available)
                .unwrap_or(0);
            (free as f64 * 0.8) as u64
        };
        let model_id = if src.model_id.is_empty() {
            src.path.clone()
        } else {
            src.model_id.clone()
        };
        let info = ShardInfo {
            model_id,
            layer_start: req.layer_start,
            layer_end: req.layer_end,
            embed: req.embed,
            head: req.head,
            weight_bytes: total,
        };
        tracing::info!(
            "loaded layers {}..{} ({:.1} MB){}{}",
            req.layer_start,
            req.layer_end,
            total as f64 / 1e6,
            if req.embed { " + embedding" } else { "" },
            if req.head { " + head" } else { "" }
        );
        self.caches = (layers.start..layers.end)
            .map(|_| SlotCache::new())
            .collect();
        self.stage = Some(Stage {
            model: Arc::new(model),
            info: info.clone(),
            next: Some(req.next.clone()).filter(|n| !n.is_empty()),
            first: Some(req.first.clone()).filter(|n| !n.is_empty()),
            compression: Compression::try_from(req.compression).unwrap_or(Compression::None),
            cache_budget,
            kv_bytes_per_token,
        });
        if cfg.warm_up {
            tracing::info!(
                "compiling this stage's GPU kernels (on a machine's first run, minutes)"
            );
            if let Err(e) = self.warm_up() {
                // Requests will compile them instead, or fail on their own.
                tracing::warn!("warming up failed: {e}");
            }
        }
        let _ = progress.blocking_send(Ok(LoadProgress {
            bytes_loaded: total,
            bytes_total: total,
            done: true,
            shard: Some(info),
        }));
        Ok(())
    }

    fn reserved(&self) -> u64 {
        self.seqs.values().map(|s| s.reserved).sum()
    }

    /// The bytes kept prefixes may hold on this stage (0 with no stage).
    fn prefix_budget(&self) -> u64 {
        self.stage.as_ref().map_or(0, |st| {
            crate::prefix::stage_budget(self.prefix_cache_bytes, st.cache_budget)
        })
    }

    /// Room for kept prefixes now: their budget, and only what live
    /// sequences leave free.
    fn prefix_room(&self) -> Option<u64> {
        let st = self.stage.as_ref()?;
        Some(
            self.prefix_budget()
                .min(st.cache_budget.saturating_sub(self.reserved())),
        )
    }

    /// Drops the kept prefixes the coordinator no longer names; a live
    /// sequence to be kept under such an id will not be.
    fn forget_prefixes(&mut self, ids: &[String]) {
        for id in ids {
            self.prefixes.remove(id);
            for s in self.seqs.values_mut() {
                if s.keep_as.as_ref() == Some(id) {
                    s.keep_as = None;
                }
            }
        }
    }

    /// Notes that a step of `seq` arrived at `at`: how long it took to come
    /// back since its last step here ended.
    fn arrived(&mut self, seq: &str, at: Instant) {
        if let Some(s) = self.seqs.get_mut(seq) {
            if let Some(done) = s.done {
                let back = at.saturating_duration_since(done);
                s.back_after = Some(s.back_after.map_or(back, |b| (b + back) / 2));
            }
        }
    }

    /// Notes the end of a decode step of `seqs` that started at `started`.
    fn finished(&mut self, seqs: &[String], started: Instant) {
        let now = Instant::now();
        self.last_decode = now - started;
        for id in seqs {
            if let Some(s) = self.seqs.get_mut(id) {
                s.done = Some(now);
            }
        }
    }

    /// Adds to `batch` the decode steps queued now, then waits a little for
    /// those of sequences due back soon: without this, sequences whose steps
    /// come back while a batch runs form a batch of their own, and the
    /// stage runs two half batches, each costing nearly a full one. Returns
    /// a job taken that is not a decode step, to run next.
    fn gather(
        &mut self,
        jobs: &std_mpsc::Receiver<Job>,
        batch: &mut Vec<(ForwardRequest, oneshot::Sender<Result<StepOut>>)>,
    ) -> Option<Job> {
        let now = Instant::now();
        let horizon = (self.last_decode / 4).min(MAX_GATHER);
        let mut until: Option<Instant> = None;
        let mut due: Vec<&str> = Vec::new();
        for (id, s) in &self.seqs {
            if let (Some(done), Some(back)) = (s.done, s.back_after) {
                let at = done + back;
                if at <= now + horizon && at + horizon >= now {
                    due.push(id);
                    until = until.max(Some(at + GATHER_SLACK));
                }
            }
        }
        let mut due: std::collections::HashSet<String> =
            due.into_iter().map(String::from).collect();
        for (r, _) in batch.iter() {
            due.remove(&r.sequence_id);
        }
        let until = until.map_or(now, |u| u.min(now + horizon));
        while batch.len() < MAX_BATCH {
            let left = until.saturating_duration_since(Instant::now());
            let job = if due.is_empty() || left.is_zero() {
                jobs.try_recv().ok()
            } else {
                jobs.recv_timeout(left).ok()
            };
            match job {
                Some(Job::Step(r, tx, at))
                    if self.is_decode(&r)
                        && batch.iter().all(|(b, _)| b.sequence_id != r.sequence_id) =>
                {
                    self.arrived(&r.sequence_id, at);
                    due.remove(&r.sequence_id);
                    batch.push((r, tx));
                }
                Some(other) => return Some(other),
                None => break,
            }
        }
        None
    }

    /// A new sequence's slot: the lowest free one, else a new row.
    fn take_slot(&mut self) -> usize {
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        let slot = self
            .free
            .pop()
            .unwrap_or_else(|| self.caches.first().map_or(0, |c| c.slots()));
        for c in &mut self.caches {
            c.reserve(slot + 1, 0);
        }
        slot
    }

    /// Ends a sequence: its slot is freed for reuse, and once no sequence is
    /// left the caches' memory goes back.
    fn end(&mut self, seq: &str) -> Option<Sequence> {
        let ended = self.seqs.remove(seq)?;
        for c in &mut self.caches {
            c.clear_slot(ended.slot);
        }
        self.free.push(ended.slot);
        if self.seqs.is_empty() {
            self.drop_caches();
        }
        Some(ended)
    }

    /// Gives back the memory of every slot (no sequence may hold one).
    fn drop_caches(&mut self) {
        for c in &mut self.caches {
            c.clear();
        }
        self.free.clear();
        mlx::clear_cache();
    }

    /// A copy of an ending sequence's cache, if it asked to be kept as a
    /// prefix: its id and one cache per layer.
    fn keep(&self, seq: &str) -> Option<(String, Vec<crate::cache::KvCache>)> {
        let s = self.seqs.get(seq)?;
        let id = s.keep_as.clone()?;
        let caches: Result<Vec<_>> = self.caches.iter().map(|c| c.copy_out(s.slot)).collect();
        match caches {
            Ok(c) => Some((id, c)),
            Err(e) => {
                tracing::warn!(sequence = %seq, "could not keep the prefix: {e}");
                None
            }
        }
    }

    /// Validates a step and makes its input, `[1, L, hidden]`: embedded
    /// tokens on the first stage, decoded activations on the others. The
    /// sequence is created on its first step.
    fn input(&mut self, req: &ForwardRequest) -> Result<Array> {
        self.admit(req)?;
        self.activations(req)
    }

    /// Checks a step against this stage and its sequence, starting the
    /// sequence (a slot, its KV budget, a kept prefix) on its first step.
    /// Its input is checked where it is read (`activations`, `row_input`).
    fn admit(&mut self, req: &ForwardRequest) -> Result<()> {
        self.forget_prefixes(&req.forget_prefixes);
        let stage = self.stage.as_ref().ok_or_else(|| {
            Error::NotReady(format!(
                "worker {} holds no model: load a shard first",
                self.name
            ))
        })?;
        let model = stage.model.clone();
        if req.sequence_id.is_empty() || req.sequence_id.len() > 256 {
            return Err(Error::InvalidArgument(
                "a sequence id of 1 to 256 characters is required".into(),
            ));
        }
        if !self.seqs.contains_key(&req.sequence_id) {
            if self.seqs.len() >= self.max_sequences {
                return Err(Error::ResourceExhausted(format!(
                    "worker {}: it holds {} sequences, its most (--max-sequences); sequence {} cannot start",
                    self.name,
                    self.seqs.len(),
                    req.sequence_id
                )));
            }
            let prefix = if !req.prefix_id.is_empty() {
                Some(
                    self.prefixes
                        .take(&req.prefix_id, req.offset as usize)
                        .ok_or_else(|| {
                            Error::PrefixMissing(format!(
                                "worker {}: prefix {} ({} positions) is not kept here",
                                self.name, req.prefix_id, req.offset
                            ))
                        })?,
                )
            } else if req.offset != 0 {
                return Err(Error::NotReady(format!(
                    "sequence {} is unknown here (its cache was released or never made) but the step starts at position {}",
                    req.sequence_id, req.offset
                )));
            } else {
                None
            };
            let length = (req.max_length as u64)
                .max(req.offset as u64 + req.tokens.len() as u64)
                .max(1);
            let need = length * stage.kv_bytes_per_token;
            let used = self.reserved();
            // The slot caches give every row the longest row's room.
            let rows =
                self.caches.first().map_or(0, |c| c.slots()) + usize::from(self.free.is_empty());
            let room = self
                .caches
                .first()
                .map_or(0, |c| c.capacity() as u64)
                .max(crate::cache::room_for(length));
            let held = (used + need).max(rows as u64 * room * stage.kv_bytes_per_token);
            if need > stage.cache_budget {
                return Err(Error::KvBudgetExceeded {
                    need,
                    budget: stage.cache_budget,
                    detail: format!(
                        "worker {}: sequence {} needs {:.1} MB of KV cache for {length} tokens, more than this stage's whole budget of {:.1} MB",
                        self.name,
                        req.sequence_id,
                        need as f64 / 1e6,
                        stage.cache_budget as f64 / 1e6
                    ),
                });
            }
            if held > stage.cache_budget {
                return Err(Error::ResourceExhausted(format!(
                    "worker {}: sequence {} needs {:.1} MB of KV cache for {length} tokens ({:.1} MB held in all with it, each of {rows} sequences with room for {room} tokens), but the budget is {:.1} MB",
                    self.name,
                    req.sequence_id,
                    need as f64 / 1e6,
                    held as f64 / 1e6,
                    stage.cache_budget as f64 / 1e6
                )));
            }
            // Kept prefixes give way to live sequences.
            self.prefixes.shrink(stage.cache_budget - held);
            let sampler = if stage.info.head {
                let p = req.sampling.clone().unwrap_or_default();
                Some(sampler_from(&p, model.args.vocab_size as usize)?)
            } else {
                None
            };
            let slot = self.take_slot();
            let copied = self.caches.iter_mut().enumerate().try_for_each(|(i, c)| {
                c.reserve(slot + 1, length as i32);
                match &prefix {
                    Some(p) => c.copy_in(slot, &p[i]),
                    None => Ok(()),
                }
            });
            if let Err(e) = copied {
                for c in &mut self.caches {
                    c.clear_slot(slot);
                }
                self.free.push(slot);
                return Err(e);
            }
            tracing::info!(
                sequence = %req.sequence_id,
                "started: up to {length} tokens, {:.1} MB of KV reserved{}",
                need as f64 / 1e6,
                if req.offset > 0 { format!(", {} positions from a kept prefix", req.offset) } else { String::new() }
            );
            self.seqs.insert(
                req.sequence_id.clone(),
                Sequence {
                    slot,
                    sampler,
                    history: Vec::new(),
                    reserved: need,
                    keep_as: Some(req.keep_as.clone()).filter(|k| !k.is_empty()),
                    done: None,
                    back_after: None,
                },
            );
        }
        let seq = &self.seqs[&req.sequence_id];
        let offset = self.caches.first().map_or(0, |c| c.length(seq.slot)) as u32;
        if offset != req.offset {
            return Err(Error::InvalidArgument(format!(
                "sequence {}: step starts at position {} but this stage's cache holds {offset}",
                req.sequence_id, req.offset
            )));
        }
        Ok(())
    }

    /// An admitted step's `[1, L, hidden]` input: the first stage embeds its
    /// token ids, the others decode the previous stage's activations.
    fn activations(&self, req: &ForwardRequest) -> Result<Array> {
        let stage = self.stage.as_ref().unwrap();
        if stage.info.embed {
            let ids = self.token_ids(req)?;
            stage
                .model
                .embed(&Array::from_slice(&ids, &[1, ids.len() as i32])?)
        } else {
            codec::decode(self.hidden(req)?)
        }
    }

    /// The first stage's token ids, each checked against the vocabulary.
    fn token_ids(&self, req: &ForwardRequest) -> Result<Vec<i32>> {
        let vocab = self.stage.as_ref().unwrap().model.args.vocab_size as u32;
        if req.tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "the first stage needs token ids".into(),
            ));
        }
        // The position, not the id: errors are logged, token ids are not.
        if let Some(i) = req.tokens.iter().position(|&t| t >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "the token at position {i} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(req.tokens.iter().map(|&t| t as i32).collect())
    }

    /// The activations a later stage gets, their shape and dtype checked
    /// before MLX sees the data.
    fn hidden<'a>(&self, req: &'a ForwardRequest) -> Result<&'a Tensor> {
        let t = req.hidden.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this stage needs activations from the previous one".into())
        })?;
        let s = &t.shape;
        let hidden = self.stage.as_ref().unwrap().model.args.hidden_size as i64;
        if s.len() != 3
            || s[0] != 1
            || !(1..=MAX_POSITIONS as i64).contains(&s[1])
            || s[2] != hidden
        {
            return Err(Error::InvalidArgument(format!(
                "activations of shape {s:?} do not fit this model: [1, L, {hidden}] expected, L up to {MAX_POSITIONS}"
            )));
        }
        let dtype = codec::dtype_from_proto(t.dtype)?;
        if !dtype.is_float() {
            return Err(Error::InvalidArgument(format!(
                "activations must be float32, float16 or bfloat16, not {}",
                dtype.name()
            )));
        }
        Ok(t)
    }

    /// Checks a row of a batched step's input once, and gives what
    /// `batch_input` makes the batch's input from: the first stage's token
    /// ids; a later stage's uncompressed activations whose bytes fit their
    /// shape (joined as bytes); other activations decoded here. Bytes that
    /// do not fit are refused here, so that they cannot shift their
    /// neighbours' rows.
    fn row_input(&self, req: &ForwardRequest) -> Result<Row> {
        if self.stage.as_ref().unwrap().info.embed {
            return self.token_ids(req).map(Row::Ids);
        }
        let t = self.hidden(req)?;
        if t.compression == Compression::None as i32 {
            let dtype = codec::dtype_from_proto(t.dtype)?;
            let need = t.shape.iter().product::<i64>() as usize * dtype.size();
            if t.data.len() == need {
                return Ok(Row::Raw);
            }
        }
        codec::decode(t).map(Row::Decoded)
    }

    /// The `[B, 1, hidden]` input of a batch of admitted decode steps (`rows`:
    /// each one's `row_input`), made in one piece where it can be: the first
    /// stage embeds all B ids at once, a later stage joins raw rows' bytes
    /// of one dtype before MLX sees them. Row by row, B embeddings and a
    /// B-way concatenation cost a few kernels per row, which a step bound by
    /// launching kernels (as on CUDA) feels.
    fn batch_input(&self, reqs: &[&ForwardRequest], rows: Vec<Row>) -> Result<Array> {
        let b = reqs.len() as i32;
        // Set on a later stage's rows: `row_input` checked it there.
        fn tensor(req: &ForwardRequest) -> &Tensor {
            req.hidden.as_ref().unwrap()
        }
        if self.stage.as_ref().unwrap().info.embed {
            let mut ids = Vec::with_capacity(reqs.len());
            for row in rows {
                if let Row::Ids(row) = row {
                    ids.extend(row);
                }
            }
            let model = &self.stage.as_ref().unwrap().model;
            return model.embed(&Array::from_slice(&ids, &[b, 1])?);
        }
        let dtype = tensor(reqs[0]).dtype;
        if rows.iter().all(|r| matches!(r, Row::Raw))
            && reqs.iter().all(|r| tensor(r).dtype == dtype)
        {
            let first = tensor(reqs[0]);
            let mut data = Vec::with_capacity(first.data.len() * reqs.len());
            for req in reqs {
                data.extend_from_slice(&tensor(req).data);
            }
            let joined = Tensor {
                shape: vec![b as i64, 1, first.shape[2]],
                dtype,
                data: data.into(),
                compression: Compression::None as i32,
                scales: Default::default(),
            };
            return codec::decode(&joined);
        }
        let arrays = rows
            .into_iter()
            .zip(reqs)
            .map(|(row, req)| match row {
                Row::Decoded(a) => Ok(a),
                _ => codec::decode(tensor(req)),
            })
            .collect::<Result<Vec<_>>>()?;
        mlx::ops::concatenate(&arrays.iter().collect::<Vec<_>>(), 0)
    }

    /// One step of one sequence.
    fn step(&mut self, req: ForwardRequest) -> Result<StepOut> {
        let started = Instant::now();
        let h = self.input(&req)?;
        let model = self.stage.as_ref().unwrap().model.clone();
        let slot = self.seqs[&req.sequence_id].slot;
        // Decode steps are latency-bound: overlap graph building with compute.
        let every = if req.tokens.len() <= 1 { 2 } else { 0 };
        let h = model.forward_layers_eager(h, Caches::Slot(&mut self.caches, slot), every)?;
        let mut out = self.output(&req, &h, None)?;
        // The buffers of a prompt's chunks are reused by the next chunk;
        // give them back once the prompt is done (freeing them after every
        // chunk costs an allocation per chunk, slow on CUDA).
        if req.sample && req.tokens.len() > 1 {
            mlx::clear_cache();
        }
        out.micros = micros_since(started);
        Ok(out)
    }

    /// Whether `req` is a decode step (one position) of a sequence this
    /// stage already holds: those can run batched with others.
    fn is_decode(&self, req: &ForwardRequest) -> bool {
        let positions = match &req.hidden {
            Some(t) => t.shape.len() == 3 && t.shape[0] == 1 && t.shape[1] == 1,
            None => req.tokens.len() == 1,
        };
        positions && self.stage.is_some() && self.seqs.contains_key(&req.sequence_id)
    }

    /// Decode steps of several sequences as one batch: the layers run once
    /// on `[B, 1, hidden]` (attention on the sequences' rows of the slot
    /// caches), the head once on all rows; then each sequence samples its
    /// row, all evaluated together.
    fn step_batch(&mut self, batch: Vec<(ForwardRequest, oneshot::Sender<Result<StepOut>>)>) {
        let started = Instant::now();
        let mut admitted = Vec::with_capacity(batch.len());
        for (req, reply) in batch {
            // A bad row fails its own sequence alone, before the batch runs.
            match self.admit(&req).and_then(|()| self.row_input(&req)) {
                Ok(row) => admitted.push((req, reply, row)),
                Err(e) => {
                    self.end(&req.sequence_id);
                    let _ = reply.send(Err(e));
                }
            }
        }
        if admitted.is_empty() {
            return;
        }
        // In slot order: when the batch is every slot, or a run of them, the
        // layers attend on the cache buffer as it lies, with no gather.
        admitted.sort_by_key(|(req, _, _)| self.seqs[&req.sequence_id].slot);
        let (mut ready, mut rows) = (Vec::new(), Vec::new());
        for (req, reply, row) in admitted {
            ready.push((req, reply));
            rows.push(row);
        }
        let model = self.stage.as_ref().unwrap().model.clone();
        let head = self.stage.as_ref().unwrap().info.head;
        let slots: Vec<usize> = ready
            .iter()
            .map(|(req, _)| self.seqs[&req.sequence_id].slot)
            .collect();
        let compression = self.stage.as_ref().unwrap().compression;
        enum Out {
            Logits(Array),
            Hidden(codec::Outgoing),
        }
        let result = (|| -> Result<Out> {
            let reqs: Vec<&ForwardRequest> = ready.iter().map(|(req, _)| req).collect();
            let h = self.batch_input(&reqs, rows)?;
            let h = model.forward_layers_rows(h, &mut self.caches, &slots, 2)?;
            if head {
                Ok(Out::Logits(model.logits(&h)?.squeeze(1)?))
            } else {
                // Every row's activations (quantized, if so) at once.
                let out = codec::Outgoing::new(&h, compression)?;
                mlx::eval_polling(&out.arrays(), self.spin)?;
                Ok(Out::Hidden(out))
            }
        })();
        let outs = result.and_then(|r| match r {
            Out::Logits(logits) => self.sample_rows(&ready, &logits),
            Out::Hidden(h) => ready
                .iter()
                .enumerate()
                .map(|(b, (req, _))| self.send_on(req, h.row(b as i32)?))
                .collect(),
        });
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                // The caches are in an unknown state: every sequence fails.
                for (req, reply) in ready {
                    self.end(&req.sequence_id);
                    let _ = reply.send(Err(Error::Mlx(format!("batched step failed: {e}"))));
                }
                return;
            }
        };
        let micros = micros_since(started);
        for ((_, reply), mut out) in ready.into_iter().zip(outs) {
            out.micros = micros;
            let _ = reply.send(Ok(out));
        }
    }

    /// The last stage's outputs of a batched decode step from its logits
    /// (`[B, vocab]`): each sequence samples its row with its own sampler,
    /// except that greedy rows without logits processors take their argmax
    /// all at once (one kernel, not one per row); all rows are evaluated
    /// together.
    fn sample_rows(
        &mut self,
        ready: &[(ForwardRequest, oneshot::Sender<Result<StepOut>>)],
        logits: &Array,
    ) -> Result<Vec<StepOut>> {
        let next = self.stage.as_ref().unwrap().next.clone();
        let first = self.stage.as_ref().unwrap().first.clone();
        let shared = logits.sub(&logits.logsumexp(-1, true)?)?;
        let plain: Vec<bool> = ready
            .iter()
            .map(|(req, _)| {
                let sampler = self.seqs[&req.sequence_id].sampler.as_ref().unwrap();
                sampler.is_greedy() && !sampler.needs_history()
            })
            .collect();
        let argmax = plain
            .iter()
            .any(|&p| p)
            .then(|| shared.argmax(-1, false))
            .transpose()?;
        let mut picks = Vec::with_capacity(ready.len());
        for ((req, _), &in_shared_argmax) in ready.iter().zip(&plain) {
            let b = picks.len() as i32;
            let seq = self.seqs.get_mut(&req.sequence_id).unwrap();
            let sampler = seq.sampler.as_mut().unwrap();
            let logprobs = if sampler.needs_history() {
                seq.history.extend_from_slice(&req.tokens);
                let l = sampler.process(logits.slice_axis(0, b, b + 1)?, &seq.history)?;
                l.sub(&l.logsumexp(mlx::ops::ALL_AXES, true)?)?
            } else {
                shared.slice_axis(0, b, b + 1)?
            };
            let token = (!in_shared_argmax)
                .then(|| sampler.sample(&logprobs))
                .transpose()?;
            picks.push((token, logprobs));
        }
        let pending: Vec<&Array> = argmax
            .iter()
            .chain(
                picks
                    .iter()
                    .zip(ready)
                    .flat_map(|((t, l), (req, _))| t.iter().chain(req.logprobs.then_some(l))),
            )
            .collect();
        mlx::eval_polling(&pending, self.spin)?;
        let greedy = argmax.map(|a| a.to_vec::<u32>()).transpose()?;
        picks
            .into_iter()
            .zip(ready)
            .enumerate()
            .map(|(b, ((token, logprobs), (req, _)))| {
                let token = match token {
                    Some(t) => t.item::<u32>()?,
                    None => greedy.as_ref().unwrap()[b],
                };
                Ok(StepOut {
                    hidden: None,
                    token: Some(token),
                    logprobs: if req.logprobs {
                        Some(codec::encode(&logprobs.squeeze(0)?, Compression::None)?)
                    } else {
                        None
                    },
                    micros: 0,
                    next: next.clone(),
                    first: first.clone(),
                })
            })
            .collect()
    }

    /// What one sequence's step sends on: the last stage samples from its
    /// logits (`[1, L, vocab]`, computed here unless given), the others
    /// encode the activations `h` for the next stage.
    fn output(
        &mut self,
        req: &ForwardRequest,
        h: &Array,
        logits: Option<Array>,
    ) -> Result<StepOut> {
        let stage = self.stage.as_ref().unwrap();
        if !stage.info.head {
            let h = codec::Outgoing::new(h, stage.compression)?;
            return self.send_on(req, h);
        }
        let seq = self.seqs.get_mut(&req.sequence_id).unwrap();
        if seq.sampler.as_ref().is_some_and(|s| s.needs_history()) {
            seq.history.extend_from_slice(&req.tokens);
        }
        if !req.sample {
            let state: Vec<&Array> = self.caches.iter().flat_map(|c| c.state()).collect();
            mlx::eval(&state)?;
            return self.finish(req, Pending::Nothing);
        }
        let l = h.dim(1);
        let logits = match logits {
            Some(x) => x.slice_axis(1, l - 1, l)?,
            None => stage.model.logits(&h.slice_axis(1, l - 1, l)?)?,
        };
        let sampler = seq.sampler.as_mut().unwrap();
        let (token, logprobs) = draw(sampler, logits.squeeze(1)?, &seq.history)?;
        self.finish(req, Pending::Token { token, logprobs })
    }

    /// What a stage without the head sends on: activations `h` for the
    /// next stage.
    fn send_on(&self, req: &ForwardRequest, h: codec::Outgoing) -> Result<StepOut> {
        if self.stage.as_ref().unwrap().next.is_none() {
            return Err(Error::InvalidArgument(
                "this stage has no next stage to send activations to".into(),
            ));
        }
        self.finish(req, Pending::Hidden(h))
    }

    /// Waits for a step's results and makes what the step sends on.
    fn finish(&self, req: &ForwardRequest, pending: Pending) -> Result<StepOut> {
        let stage = self.stage.as_ref().unwrap();
        let mut out = StepOut {
            hidden: None,
            token: None,
            logprobs: None,
            micros: 0,
            next: stage.next.clone(),
            first: stage.first.clone(),
        };
        match pending {
            Pending::Hidden(h) => {
                mlx::eval_polling(&h.arrays(), self.spin)?;
                out.hidden = Some(h.encode()?);
            }
            Pending::Token { token, logprobs } => {
                mlx::eval_polling(&[&token, &logprobs], self.spin)?;
                out.token = Some(token.item::<u32>()?);
                if req.logprobs {
                    out.logprobs = Some(codec::encode(&logprobs.squeeze(0)?, Compression::None)?);
                }
            }
            Pending::Nothing => {}
        }
        Ok(out)
    }
}

/// A token drawn by `sampler` from `[1, vocab]` logits (after its logits
/// processors, given the tokens so far), and the log-probabilities it was
/// drawn from.
fn draw(sampler: &mut Sampler, logits: Array, history: &[u32]) -> Result<(Array, Array)> {
    let logits = if sampler.needs_history() {
        sampler.process(logits, history)?
    } else {
        logits
    };
    let logprobs = logits.sub(&logits.logsumexp(mlx::ops::ALL_AXES, true)?)?;
    let token = sampler.sample(&logprobs)?;
    Ok((token, logprobs))
}

/// How long the engine polls for a step's result before sleeping: on a GPU,
/// about a decode step's device time (a sleeping wait woke 40 to 70 us later
/// per step on an H200); never on the CPU, where MLX computes on threads of
/// this process and polling would take a core from them.
/// `MLX_DIST_STEP_SPIN_US` overrides it (0: always sleep).
fn step_spin() -> Duration {
    let default = if mlx::default_device_is_gpu() {
        2000
    } else {
        0
    };
    let us = std::env::var("MLX_DIST_STEP_SPIN_US")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(default);
    Duration::from_micros(us.min(1_000_000))
}

fn micros_since(t: Instant) -> u32 {
    t.elapsed().as_micros().min(u32::MAX as u128) as u32
}

fn sampler_from(p: &SamplingParams, vocab: usize) -> Result<Sampler> {
    let cfg = SamplerConfig {
        temp: p.temp,
        top_p: p.top_p,
        min_p: p.min_p,
        min_tokens_to_keep: p.min_tokens_to_keep.max(1),
        top_k: p.top_k,
        seed: p.seed,
    };
    let ctx = |n: u32| if n == 0 { 20 } else { n as usize };
    let mut bias: Vec<(u32, f32)> = p.logit_bias.iter().map(|(k, v)| (*k, *v)).collect();
    bias.sort_by_key(|(k, _)| *k);
    let procs = ProcessorConfig {
        logit_bias: bias,
        repetition_penalty: p.repetition_penalty,
        repetition_context_size: ctx(p.repetition_context_size),
        presence_penalty: p.presence_penalty,
        presence_context_size: ctx(p.presence_context_size),
        frequency_penalty: p.frequency_penalty,
        frequency_context_size: ctx(p.frequency_context_size),
    };
    procs.validate(vocab)?;
    Sampler::new(cfg, procs)
}

/// Prefix ids one step may ask a stage to forget at most (the coordinator
/// queues 1024 at most).
const MAX_FORGET: usize = 4096;

/// The checks of a step that need no state, made before the step reaches
/// the engine thread (and MLX): ids and sizes within bounds.
fn check_forward(req: &ForwardRequest) -> Result<()> {
    if req.sequence_id.is_empty() || req.sequence_id.len() > 256 {
        return Err(Error::InvalidArgument(
            "a sequence id of 1 to 256 characters is required".into(),
        ));
    }
    if req.prefix_id.len() > 256
        || req.keep_as.len() > 256
        || req.forget_prefixes.iter().any(|p| p.len() > 256)
    {
        return Err(Error::InvalidArgument(
            "prefix ids are at most 256 characters".into(),
        ));
    }
    if req.forget_prefixes.len() > MAX_FORGET {
        return Err(Error::InvalidArgument(format!(
            "{} prefixes to forget in one step: at most {MAX_FORGET} are taken",
            req.forget_prefixes.len()
        )));
    }
    if req.tokens.len() > MAX_POSITIONS {
        return Err(Error::InvalidArgument(format!(
            "a step of {} token positions: at most {MAX_POSITIONS} are taken",
            req.tokens.len()
        )));
    }
    if let Some(t) = &req.hidden {
        let positions = t.shape.get(1).copied().unwrap_or(0);
        if t.shape.len() != 3 || !(1..=MAX_POSITIONS as i64).contains(&positions) {
            return Err(Error::InvalidArgument(format!(
                "activations of shape {:?} do not fit: [1, L, hidden] expected, L from 1 to {MAX_POSITIONS}",
                t.shape
            )));
        }
    }
    Ok(())
}

/// The cache folder of pushed files of `model_id`, which must be a plain
/// name (it becomes a path).
fn model_cache_dir(cache_dir: &Path, model_id: &str) -> Result<PathBuf> {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if model_id.is_empty() || model_id.len() > 128 || !model_id.chars().all(plain) {
        return Err(Error::InvalidArgument(format!(
            "invalid model id {model_id:?}"
        )));
    }
    Ok(cache_dir.join(model_id))
}

/// Where pushed files of `model_id` live, if they were pushed.
fn pushed_model_dir(cache_dir: &Path, model_id: &str) -> Result<PathBuf> {
    let dir = model_cache_dir(cache_dir, model_id)?;
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "model {model_id} is not in this worker's cache"
        )));
    }
    Ok(dir)
}

/// A file path inside a model directory: relative, no `..`.
fn safe_relative(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if path.is_empty()
        || path.len() > 512
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Error::InvalidArgument(format!(
            "invalid file path {path:?}"
        )));
    }
    Ok(p.to_path_buf())
}

/// The gRPC service.
#[derive(Clone)]
pub struct WorkerService {
    cfg: Arc<WorkerConfig>,
    jobs: std_mpsc::Sender<Job>,
    /// (bytes, messages) of Forward requests sent downstream.
    sent: Arc<(AtomicU64, AtomicU64)>,
    started: Instant,
    /// On the first stage: the Forward stream of each sequence in a ring
    /// step, where the token coming round (Ring) goes.
    rings: Arc<std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<RingToken>>>>,
    /// Set when the worker shuts down: incoming rings, which never end by
    /// themselves, end then so the server can stop.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// Tokens received round the ring.
    ring_tokens: Arc<AtomicU64>,
    /// The engine's `job_since` and `last_info`: what GetDeviceInfo reports
    /// while the engine is too busy to answer.
    job_since: Arc<AtomicU64>,
    last_info: Arc<std::sync::Mutex<EngineInfo>>,
    /// Where the input of the engine's step launched ahead is delivered.
    post: Arc<Post>,
}

/// How long GetDeviceInfo waits for the engine's own figures before giving
/// its last ones: a worker busy with a long step or load still answers
/// health probes, `/cluster/status` and re-planning at once.
const ENGINE_ANSWER: Duration = Duration::from_millis(500);

impl WorkerService {
    pub fn new(cfg: WorkerConfig) -> WorkerService {
        let (tx, rx) = std_mpsc::channel();
        let started = Instant::now();
        let job_since = Arc::new(AtomicU64::new(0));
        let last_info: Arc<std::sync::Mutex<EngineInfo>> = Default::default();
        let post = Arc::new(Post::default());
        let engine = Engine {
            name: cfg.name.clone(),
            job_since: job_since.clone(),
            origin: started,
            last_info: last_info.clone(),
            max_sequences: cfg.max_sequences.max(1),
            stage: None,
            seqs: HashMap::new(),
            caches: Vec::new(),
            free: Vec::new(),
            busy: Duration::ZERO,
            tokens: 0,
            steps: 0,
            batches: 0,
            batched_steps: 0,
            prefixes: PrefixStore::default(),
            prefix_cache_bytes: cfg.prefix_cache_bytes,
            last_decode: Duration::ZERO,
            spin: step_spin(),
            launch_ahead: launch_ahead(),
            prepared: None,
            next_guess: None,
            mailboxes: None,
            post: post.clone(),
            launched_ahead: 0,
            launched_ahead_undone: 0,
        };
        std::thread::Builder::new()
            .name("mlx-dist-engine".into())
            .spawn(move || engine.run(rx))
            .expect("cannot start the engine thread");
        WorkerService {
            cfg: Arc::new(cfg),
            jobs: tx,
            sent: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
            started,
            rings: Default::default(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            ring_tokens: Arc::new(AtomicU64::new(0)),
            job_since,
            last_info,
            post,
        }
    }

    fn send(&self, job: Job) -> std::result::Result<(), Status> {
        let _sorted = self.post.sort(&job);
        self.jobs
            .send(job)
            .map_err(|_| Status::internal("the engine thread has stopped"))
    }

    async fn step(&self, req: ForwardRequest) -> std::result::Result<StepOut, Status> {
        check_forward(&req).map_err(status)?;
        let (tx, rx) = oneshot::channel();
        self.send(Job::Step(req, tx, Instant::now()))?;
        rx.await
            .map_err(|_| Status::internal("the engine thread has stopped"))?
            .map_err(status)
    }

    async fn release(&self, seq: String) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.send(Job::Release(seq, tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// The service behind the cluster-token check (open when no token is set).
    pub fn into_server(
        self,
    ) -> tonic::service::interceptor::InterceptedService<WorkerServer<WorkerService>, CheckToken>
    {
        let check = CheckToken(cluster_token().map(String::into_bytes));
        let limit = self.cfg.max_message_bytes.max(1 << 20);
        let server = WorkerServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }
}

type BoxStream<T> =
    std::pin::Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// This worker's stream to the next stage.
struct Downstream {
    addr: String,
    tx: mpsc::Sender<ForwardRequest>,
    rx: Streaming<ForwardReply>,
}

/// What this process keeps per peer address, shared by all its streams.
type ByAddress<T> = std::sync::LazyLock<std::sync::Mutex<HashMap<String, T>>>;

/// One channel per next-stage address, shared by every sequence's stream:
/// a sequence's first step pays no connection (or TLS handshake).
static CHANNELS: ByAddress<Client> = ByAddress::new(Default::default);

impl Downstream {
    async fn open(addr: &str, timeout: Duration) -> std::result::Result<Downstream, Status> {
        let cached = lock(&CHANNELS).get(addr).cloned();
        if let Some(client) = cached {
            if let Ok(d) = Self::open_on(client, addr).await {
                return Ok(d);
            }
            // The stage behind it went away (or restarted): connect afresh.
            lock(&CHANNELS).remove(addr);
        }
        // No probe: the stream itself tells whether the stage answers.
        let client = open_client(addr, timeout, false)
            .await
            .map_err(|e| Status::unavailable(format!("next stage {e}")))?;
        let d = Self::open_on(client.clone(), addr).await?;
        lock(&CHANNELS).insert(addr.to_string(), client);
        Ok(d)
    }

    async fn open_on(mut client: Client, addr: &str) -> std::result::Result<Downstream, Status> {
        let (tx, rx) = mpsc::channel(4);
        let rx = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|e| {
                let plain = !addr.starts_with("https://") && tls_ca().ok().flatten().is_none();
                let hint = if plain && e.code() == tonic::Code::Unknown {
                    " (if it serves TLS, start this worker with --tls-ca)"
                } else {
                    ""
                };
                Status::unavailable(format!("next stage {addr}: {}{hint}", e.message()))
            })?
            .into_inner();
        Ok(Downstream {
            addr: addr.to_string(),
            tx,
            rx,
        })
    }
}

/// One reply of the next stage, in order, within `timeout`.
async fn downstream_reply(
    rx: &mut Streaming<ForwardReply>,
    addr: &str,
    timeout: Duration,
) -> std::result::Result<ForwardReply, Status> {
    match tokio::time::timeout(timeout, rx.message()).await {
        Err(_) => Err(Status::unavailable(format!(
            "next stage {addr} failed: no reply within {} s",
            timeout.as_secs()
        ))),
        Ok(r) => from_below(r, addr),
    }
}

/// What the next stage's stream gave, as this stage reports it.
fn from_below(
    r: std::result::Result<Option<ForwardReply>, Status>,
    addr: &str,
) -> std::result::Result<ForwardReply, Status> {
    let lost = |why: String| Status::unavailable(format!("next stage {addr} failed: {why}"));
    match r {
        Err(e) if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::Unknown => {
            Err(lost(e.message().to_string()))
        }
        // Errors of later stages already name them.
        Err(e) => Err(e),
        Ok(None) => Err(lost("its stream ended".into())),
        Ok(Some(r)) => Ok(r),
    }
}

/// Where the reply to one request of a Forward stream comes from.
enum Slot {
    /// The stream to the next stage (at this address) was opened: its replies.
    Opened(Streaming<ForwardReply>, String),
    /// Made here (the last stage, a token come round the ring, or an error).
    Ready(std::result::Result<ForwardReply, Status>),
    /// The next stage's reply to the request sent on, plus this stage's time.
    Below { micros: u32, addr: String },
}

/// Requests of one Forward stream in flight below this stage at most.
const MAX_IN_FLIGHT: usize = 8;

/// The last stage's streams to first stages (Ring), by address, shared by
/// every sequence.
static RINGS: ByAddress<mpsc::Sender<RingToken>> = ByAddress::new(Default::default);

/// Sends `token` round the ring to the first stage at `addr`, opening the
/// stream on first use and again if it broke.
async fn send_round(addr: &str, token: RingToken) -> std::result::Result<(), Status> {
    let cached = lock(&RINGS).get(addr).cloned();
    let token = match cached {
        Some(tx) => match tx.send(token).await {
            Ok(()) => return Ok(()),
            // The first stage went away (or restarted): reconnect.
            Err(mpsc::error::SendError(t)) => t,
        },
        None => token,
    };
    let mut client = open_client(addr, Duration::from_secs(10), false)
        .await
        .map_err(|e| Status::unavailable(format!("first stage {e}")))?;
    let (tx, rx) = mpsc::channel(64);
    let ring = addr.to_string();
    tokio::spawn(async move {
        // The call lasts as long as the stream; when it ends, the next token
        // reconnects.
        if let Err(e) = client.ring(ReceiverStream::new(rx)).await {
            tracing::warn!("the ring to first stage {ring} ended: {}", e.message());
        }
    });
    tx.send(token)
        .await
        .map_err(|_| Status::unavailable(format!("first stage {addr} closed the ring")))?;
    lock(&RINGS).insert(addr.to_string(), tx);
    Ok(())
}

/// The step the first stage runs on a token come round the ring.
fn ring_step(t: RingToken) -> ForwardRequest {
    ForwardRequest {
        sequence_id: t.sequence_id,
        offset: t.offset,
        tokens: vec![t.token],
        sample: true,
        logprobs: t.logprobs.is_some(),
        decode_ahead: t.decode_ahead.saturating_sub(1),
        ..Default::default()
    }
}

/// The positions a step runs: its activations' length, or its tokens.
fn step_positions(req: &ForwardRequest) -> u32 {
    match &req.hidden {
        Some(t) => t.shape.get(1).copied().unwrap_or(0) as u32,
        None => req.tokens.len() as u32,
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn get_device_info(
        &self,
        request: Request<DeviceInfoRequest>,
    ) -> std::result::Result<Response<DeviceInfo>, Status> {
        let remeasure = request.into_inner().remeasure;
        let name = self.cfg.name.clone();
        let caps = tokio::task::spawn_blocking(move || {
            if remeasure {
                device::remeasure(&name)
            } else {
                device::capabilities(&name)
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
        let (tx, rx) = oneshot::channel();
        self.send(Job::Info(tx))?;
        let (engine, busy_for) = match tokio::time::timeout(ENGINE_ANSWER, rx).await {
            Ok(answer) => (
                answer.map_err(|_| Status::internal("the engine thread has stopped"))?,
                0,
            ),
            // Busy: its figures after its last job, and for how long (the
            // question stays queued; its answer goes nowhere).
            Err(_) => {
                let since = self.job_since.load(Ordering::Relaxed);
                let now = self.started.elapsed().as_micros() as u64;
                let busy_for = if since == 0 {
                    0
                } else {
                    now.saturating_sub(since - 1).max(1)
                };
                (lock(&self.last_info).clone(), busy_for)
            }
        };
        Ok(Response::new(DeviceInfo {
            name: caps.name,
            device_type: caps.device_type,
            chip: caps.chip,
            gpu_cores: caps.gpu_cores,
            memory_total: caps.memory_total,
            memory_available: caps.memory_available,
            matmul_gflops: caps.matmul_gflops,
            bandwidth_gbs: caps.bandwidth_gbs,
            version: env!("CARGO_PKG_VERSION").to_string(),
            mlx_version: mlx::version(),
            shard: engine.shard,
            cache_bytes: engine.cache_bytes,
            sequences: engine.sequences,
            busy_micros: engine.busy.as_micros() as u64,
            tokens_processed: engine.tokens,
            steps: engine.steps,
            batches: engine.batches,
            batched_steps: engine.batched_steps,
            steps_launched_ahead: engine.launched_ahead,
            steps_launched_ahead_undone: engine.launched_ahead_undone,
            prefix_entries: engine.prefix_entries,
            prefix_bytes: engine.prefix_bytes,
            prefix_budget_bytes: engine.prefix_budget,
            uptime_micros: self.started.elapsed().as_micros() as u64,
            mlx_active_memory: mlx::active_memory() as u64,
            mlx_peak_memory: mlx::peak_memory() as u64,
            forward_bytes_sent: self.sent.0.load(Ordering::Relaxed),
            forward_messages_sent: self.sent.1.load(Ordering::Relaxed),
            ring_tokens: self.ring_tokens.load(Ordering::Relaxed),
            busy_for_micros: busy_for,
        }))
    }

    async fn push_file(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<PushFileReply>, Status> {
        let mut chunks = request.into_inner();
        let mut written = 0u64;
        let mut open: Option<(PathBuf, PathBuf, tokio::fs::File, u64, u64)> = None;
        while let Some(chunk) = chunks.message().await? {
            let rel = safe_relative(&chunk.path).map_err(status)?;
            let dir = model_cache_dir(&self.cfg.cache_dir, &chunk.model_id).map_err(status)?;
            let target = dir.join(&rel);
            if open.as_ref().is_none_or(|(t, ..)| *t != target) {
                if chunk.offset != 0 {
                    return Err(Status::invalid_argument(format!(
                        "{}: the first chunk must start at offset 0",
                        chunk.path
                    )));
                }
                let partial = target.with_extension("partial");
                if let Some(parent) = partial.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let f = tokio::fs::File::create(&partial).await?;
                open = Some((target.clone(), partial, f, 0, chunk.total_size));
            }
            let (_, partial, f, pos, total) = open.as_mut().unwrap();
            if chunk.offset != *pos {
                return Err(Status::invalid_argument(format!(
                    "{}: chunk at {} but {} bytes were written",
                    chunk.path, chunk.offset, pos
                )));
            }
            if *pos + chunk.data.len() as u64 > *total {
                return Err(Status::invalid_argument(format!(
                    "{}: more data than its size {total}",
                    chunk.path
                )));
            }
            f.write_all(&chunk.data).await?;
            *pos += chunk.data.len() as u64;
            written += chunk.data.len() as u64;
            if chunk.last {
                if *pos != *total {
                    return Err(Status::invalid_argument(format!(
                        "{}: {} of {total} bytes arrived",
                        chunk.path, pos
                    )));
                }
                f.flush().await?;
                tokio::fs::rename(&partial, &target).await?;
                open = None;
            }
        }
        if let Some((_, partial, ..)) = open {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(Status::invalid_argument(
                "the stream ended before the file's last chunk",
            ));
        }
        Ok(Response::new(PushFileReply {
            bytes_written: written,
        }))
    }

    type LoadShardStream = BoxStream<LoadProgress>;

    async fn load_shard(
        &self,
        request: Request<LoadShardRequest>,
    ) -> std::result::Result<Response<Self::LoadShardStream>, Status> {
        let req = request.into_inner();
        if req.layer_end < req.layer_start {
            return Err(Status::invalid_argument("layer_end is before layer_start"));
        }
        let (tx, rx) = mpsc::channel(64);
        self.send(Job::Load(req, self.cfg.clone(), tx))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ForwardStream = BoxStream<ForwardReply>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> std::result::Result<Response<Self::ForwardStream>, Status> {
        let mut upstream = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        // Replies go back in request order. A step sent on to the next stage
        // does not wait for that stage's reply before this stage takes the
        // next request, so the chunks of a long prompt flow through the
        // stages back to back; `slots` keeps the order (and bounds how many
        // steps are in flight below this stage).
        let (slots, mut pending) = mpsc::channel::<Slot>(MAX_IN_FLIGHT);
        let svc = self.clone();
        let replies = tx.clone();
        let timeout = svc.cfg.step_timeout;
        tokio::spawn(async move {
            let mut below: Option<(Streaming<ForwardReply>, String)> = None;
            // Replies that came from below before their slot did.
            let mut early = std::collections::VecDeque::new();
            loop {
                let slot = tokio::select! {
                    biased;
                    s = pending.recv() => match s {
                        Some(s) => s,
                        None => break,
                    },
                    // Ring steps get no reply from below, so the stream is
                    // watched while nothing waits on it: what comes is a
                    // reply whose slot is on its way, or a later stage's
                    // failure.
                    r = async { below.as_mut().unwrap().0.message().await }, if below.is_some() => {
                        let addr = &below.as_ref().unwrap().1;
                        match from_below(r, addr) {
                            Ok(r) => {
                                early.push_back(r);
                                continue;
                            }
                            Err(e) => Slot::Ready(Err(e)),
                        }
                    }
                };
                let reply = match slot {
                    Slot::Opened(rx, addr) => {
                        below = Some((rx, addr));
                        continue;
                    }
                    Slot::Ready(r) => r,
                    Slot::Below { micros, addr } => {
                        let r = match (early.pop_front(), below.as_mut()) {
                            (Some(r), _) => Ok(r),
                            (None, None) => Err(Status::internal("no stream to the next stage")),
                            (None, Some((rx, _))) => downstream_reply(rx, &addr, timeout).await,
                        };
                        r.map(|mut r| {
                            r.stage_micros.insert(0, micros);
                            r
                        })
                    }
                };
                let failed = reply.is_err();
                if replies.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut downstream: Option<(String, mpsc::Sender<ForwardRequest>)> = None;
            let mut seen: HashSet<String> = HashSet::new();
            // On the first stage: tokens of this stream's ring steps, come
            // round from the last stage.
            let (ring_tx, mut ring_rx) = mpsc::unbounded_channel::<RingToken>();
            // Ring steps each sequence whose ring starts here may still
            // start, and a token held for want of one.
            let mut credit: HashMap<String, u32> = HashMap::new();
            let mut held: HashMap<String, RingToken> = HashMap::new();
            loop {
                let msg = tokio::select! {
                    // The client's end first: no ring step after it.
                    biased;
                    m = upstream.message() => match m {
                        Ok(Some(m)) if m.tokens.is_empty() && m.hidden.is_none() && m.ring_credit > 0 => {
                            // The coordinator read a token: one more step.
                            let Some(c) = credit.get_mut(&m.sequence_id) else {
                                continue;
                            };
                            *c = c.saturating_add(m.ring_credit);
                            match held.remove(&m.sequence_id) {
                                Some(t) => {
                                    *c -= 1;
                                    ring_step(t)
                                }
                                None => continue,
                            }
                        }
                        Ok(Some(m)) => m,
                        // The client finished: its sequences end.
                        Ok(None) => break,
                        // A message that is too large or does not decode, or
                        // a client that went away (then nobody hears this).
                        Err(e) => {
                            let e = if e.code() == tonic::Code::OutOfRange {
                                Status::resource_exhausted(format!(
                                    "worker {}: {} (raise its --max-message-mb)",
                                    svc.cfg.name,
                                    e.message()
                                ))
                            } else {
                                e
                            };
                            let _ = slots.send(Slot::Ready(Err(e))).await;
                            break;
                        }
                    },
                    Some(mut t) = ring_rx.recv() => {
                        // The token is the reply to the step that sampled it,
                        // and the next step starts here without the client.
                        let reply = ForwardReply {
                            sequence_id: t.sequence_id.clone(),
                            token: Some(t.token),
                            logprobs: t.logprobs.clone(),
                            stage_micros: std::mem::take(&mut t.stage_micros),
                        };
                        if slots.send(Slot::Ready(Ok(reply))).await.is_err() {
                            break;
                        }
                        if t.decode_ahead == 0 {
                            continue;
                        }
                        match credit.get_mut(&t.sequence_id) {
                            Some(c) if *c > 0 => {
                                *c -= 1;
                                ring_step(t)
                            }
                            _ => {
                                held.insert(t.sequence_id.clone(), t);
                                continue;
                            }
                        }
                    }
                };
                let sequence = msg.sequence_id.clone();
                seen.insert(sequence.clone());
                if msg.decode_ahead > 0 && msg.hidden.is_none() && !credit.contains_key(&sequence) {
                    // The first stage of a ring: its tokens come back here.
                    lock(&svc.rings).insert(sequence.clone(), ring_tx.clone());
                    credit.insert(sequence.clone(), msg.ring_credit);
                }
                let ring = msg.decode_ahead > 0;
                let slot = match svc.step(msg.clone()).await {
                    Err(e) => Slot::Ready(Err(e)),
                    Ok(out) => match (out.hidden, out.token) {
                        (None, Some(token)) if ring => {
                            // The last stage of a ring step: the token goes
                            // straight to the first stage.
                            let mut stage_micros = msg.stage_micros.clone();
                            stage_micros.push(out.micros);
                            let round = RingToken {
                                sequence_id: msg.sequence_id.clone(),
                                offset: msg.offset + step_positions(&msg),
                                token,
                                logprobs: out.logprobs,
                                stage_micros,
                                decode_ahead: msg.decode_ahead,
                            };
                            if msg.hidden.is_none() {
                                // A one-stage ring: this stage is also the
                                // first, whose stream is this one.
                                svc.ring_tokens.fetch_add(1, Ordering::Relaxed);
                                let _ = ring_tx.send(round);
                                continue;
                            }
                            match out.first {
                                None => Slot::Ready(Err(Status::failed_precondition(
                                    "this stage was loaded without the first stage's address: it cannot run ring steps",
                                ))),
                                Some(first) => match send_round(&first, round).await {
                                    Ok(()) => continue,
                                    Err(e) => Slot::Ready(Err(e)),
                                },
                            }
                        }
                        (None, token) => Slot::Ready(Ok(ForwardReply {
                            sequence_id: msg.sequence_id.clone(),
                            token,
                            logprobs: out.logprobs,
                            stage_micros: vec![out.micros],
                        })),
                        (Some(hidden), _) => {
                            let next = out.next.unwrap_or_default();
                            if downstream.is_none() {
                                match Downstream::open(&next, Duration::from_secs(10)).await {
                                    Ok(d) => {
                                        if slots
                                            .send(Slot::Opened(d.rx, d.addr.clone()))
                                            .await
                                            .is_err()
                                        {
                                            break;
                                        }
                                        downstream = Some((d.addr, d.tx));
                                    }
                                    Err(e) => {
                                        let _ = slots.send(Slot::Ready(Err(e))).await;
                                        break;
                                    }
                                }
                            }
                            let (addr, down) = downstream.as_ref().unwrap();
                            let mut fwd = ForwardRequest {
                                hidden: Some(hidden),
                                ..msg
                            };
                            if ring {
                                fwd.stage_micros.push(out.micros);
                            }
                            svc.sent.0.fetch_add(
                                prost::Message::encoded_len(&fwd) as u64,
                                Ordering::Relaxed,
                            );
                            svc.sent.1.fetch_add(1, Ordering::Relaxed);
                            if down.send(fwd).await.is_err() {
                                Slot::Ready(Err(Status::unavailable(format!(
                                    "next stage {addr} failed: its stream closed"
                                ))))
                            } else if ring {
                                // Its token comes round the ring, not back up.
                                continue;
                            } else {
                                Slot::Below {
                                    micros: out.micros,
                                    addr: addr.clone(),
                                }
                            }
                        }
                    },
                };
                let failed = matches!(slot, Slot::Ready(Err(_)));
                if let Slot::Ready(Err(e)) = &slot {
                    tracing::warn!(worker = %svc.cfg.name, sequence = %sequence, "step failed: {}", e.message());
                }
                if slots.send(slot).await.is_err() || failed {
                    break;
                }
            }
            {
                let mut rings = lock(&svc.rings);
                for seq in credit.keys() {
                    rings.remove(seq);
                }
            }
            // Dropping the sender closes the next stage's stream, which
            // releases the same sequences there.
            drop(downstream);
            for seq in seen {
                svc.release(seq).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ring(
        &self,
        request: Request<Streaming<RingToken>>,
    ) -> std::result::Result<Response<RingReply>, Status> {
        let mut tokens = request.into_inner();
        let mut stopping = self.stopping.subscribe();
        let mut n = 0;
        loop {
            let t = tokio::select! {
                t = tokens.message() => match t? {
                    Some(t) => t,
                    None => break,
                },
                _ = stopping.wait_for(|s| *s) => break,
            };
            n += 1;
            self.ring_tokens.fetch_add(1, Ordering::Relaxed);
            // A sequence that ended meanwhile drops its late token.
            if let Some(tx) = lock(&self.rings).get(&t.sequence_id) {
                let _ = tx.send(t);
            }
        }
        Ok(Response::new(RingReply { tokens: n }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> std::result::Result<Response<ReleaseReply>, Status> {
        let seq = request.into_inner().sequence_id;
        let freed = WorkerService::release(self, seq).await;
        Ok(Response::new(ReleaseReply { freed_bytes: freed }))
    }
}

/// Serves a worker on `host:port` until Ctrl-C or SIGTERM; prints
/// `listening on HOST:PORT` (the real port when 0 was asked) once ready.
pub async fn serve(host: &str, port: u16, cfg: WorkerConfig) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen on {host}:{port}: {e}")))?;
    let local = listener.local_addr()?;
    println!("listening on {host}:{}", local.port());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    serve_on(listener, cfg, shutdown_signal()).await
}

/// A worker inside this process, on a free loopback port, for as long as
/// the process lives: a server on one device runs its model there, so that
/// the decode steps of concurrent sequences run batched. It requires the
/// cluster token; when none is set, one is made up (and set for this
/// process), so that no other local user can drive it. Returns its address.
pub fn start_local() -> Result<String> {
    if cluster_token().is_none() {
        let mut bytes = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        set_cluster_token(Some(hex::encode(bytes)));
    }
    let rt = crate::util::runtime();
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))?;
    let addr = format!("127.0.0.1:{}", listener.local_addr()?.port());
    let cfg = WorkerConfig::new("local");
    let (stop, stopped) = oneshot::channel::<()>();
    lock(&LOCAL).insert(addr.clone(), stop);
    rt.spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = serve_on(listener, cfg, shutdown).await {
            tracing::error!("the local worker stopped: {e}");
        }
    });
    Ok(addr)
}

/// Stops the local worker at `addr` (see `start_local`), which frees its
/// model once its streams have ended.
pub fn stop_local(addr: &str) {
    if let Some(stop) = lock(&LOCAL).remove(addr) {
        let _ = stop.send(());
    }
}

/// Whether `addr` is a worker `start_local` started in this process.
pub fn is_local(addr: &str) -> bool {
    lock(&LOCAL).contains_key(addr)
}

/// Local workers of this process, by address: how to stop each.
static LOCAL: ByAddress<oneshot::Sender<()>> = ByAddress::new(Default::default);

/// Serves a worker on `listener` until `shutdown` completes.
async fn serve_on(
    listener: tokio::net::TcpListener,
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let local = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    let name = cfg.name.clone();
    let builder = server_builder(&cfg)?;
    let tls = cfg.tls.is_some();
    let service = WorkerService::new(cfg);
    let stopping = service.stopping.clone();
    let service = service.into_server();
    tracing::info!(
        worker = %name,
        "serving on {local}{}",
        if tls { " with TLS" } else { " (plain, no TLS)" }
    );
    let incoming = incoming(listener);
    builder
        // A coordinator or previous stage that vanished is noticed within seconds.
        .http2_keepalive_interval(Some(keepalive_interval()))
        .http2_keepalive_timeout(Some(keepalive_interval()))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            stopping.send_replace(true);
        })
        .await
        .map_err(|e| Error::Worker(format!("worker {name} stopped: {e}")))
}

/// The connections a worker serves, each with TCP_NODELAY: the builder's
/// own setting applies only to listeners it binds itself, and without it a
/// small reply can wait for the peer's delayed ACK. (Clients set it in
/// `open_client`, which every channel of this crate goes through.)
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A gRPC server builder serving TLS when `cfg` says.
fn server_builder(cfg: &WorkerConfig) -> Result<tonic::transport::Server> {
    let window = h2_window();
    let builder = tonic::transport::Server::builder()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window.map(|w| w.saturating_mul(2)));
    let Some(id) = &cfg.tls else {
        return Ok(builder);
    };
    let id = TlsIdentity::new(id.cert_pem.clone(), id.key_pem.clone())?;
    let config = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            id.cert_pem,
            id.key_pem,
        ))
        // A client that never finishes its handshake is dropped.
        .timeout(Duration::from_secs(10));
    builder.tls_config(config).map_err(|e| {
        Error::InvalidArgument(format!("worker {}: TLS: {}", cfg.name, error_chain(&e)))
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ModelSource as ProtoSource, Tensor};
    use crate::transport::{connect, is_tls_mismatch, make_certificate, set_tls_ca};

    async fn start(dir: &Path) -> (String, Client) {
        let mut cfg = WorkerConfig::new("test");
        cfg.cache_dir = dir.join("cache");
        start_with(dir, cfg).await
    }

    /// A worker configured by `cfg` (TLS included) on a free port, holding
    /// layers 1..3 and the head of the model in `dir`.
    async fn start_with(dir: &Path, cfg: WorkerConfig) -> (String, Client) {
        let (addr, client, _) = start_with_jobs(dir, cfg).await;
        (addr, client)
    }

    /// `start_with`, and the engine's job queue (to hold it with `Job::Hold`).
    async fn start_with_jobs(
        dir: &Path,
        cfg: WorkerConfig,
    ) -> (String, Client, std_mpsc::Sender<Job>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut builder = server_builder(&cfg).unwrap();
        let svc = WorkerService::new(cfg);
        let jobs = svc.jobs.clone();
        let server = svc.into_server();
        tokio::spawn(
            builder
                .add_service(server)
                .serve_with_incoming(incoming(listener)),
        );
        let mut client = connect(&addr, Duration::from_secs(5)).await.unwrap();
        let req = LoadShardRequest {
            source: Some(ProtoSource {
                path: dir.display().to_string(),
                model_id: String::new(),
            }),
            layer_start: 1,
            layer_end: 3,
            embed: false,
            head: true,
            cache_budget: 1 << 30,
            ..Default::default()
        };
        let mut progress = client.load_shard(req).await.unwrap().into_inner();
        while let Some(p) = progress.message().await.unwrap() {
            if p.done {
                break;
            }
        }
        (addr, client, jobs)
    }

    async fn one_step(
        client: &mut Client,
        req: ForwardRequest,
    ) -> std::result::Result<ForwardReply, Status> {
        let (tx, rx) = mpsc::channel(1);
        tx.send(req).await.unwrap();
        let mut replies = client.forward(ReceiverStream::new(rx)).await?.into_inner();
        let r = replies.message().await?;
        r.ok_or_else(|| Status::internal("no reply"))
    }

    fn step(seq: &str, hidden: Tensor) -> ForwardRequest {
        ForwardRequest {
            sequence_id: seq.into(),
            hidden: Some(hidden),
            sample: true,
            tokens: vec![3],
            max_length: 8,
            ..Default::default()
        }
    }

    #[test]
    fn served_connections_set_tcp_nodelay() {
        crate::util::runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut accepted = incoming(listener);
            let _peer = tokio::net::TcpStream::connect(addr).await.unwrap();
            let conn = tokio_stream::StreamExt::next(&mut accepted).await.unwrap();
            assert!(conn.unwrap().nodelay().unwrap());
        });
    }

    /// One step of a new sequence of `positions` positions (this stage
    /// holds layers 1..3 and the head), kept as `keep_as` when it ends.
    fn first_step(seq: &str, positions: i32, keep_as: &str) -> ForwardRequest {
        let hidden = codec::encode(
            &Array::full(&[1, positions, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
            Compression::None,
        )
        .unwrap();
        ForwardRequest {
            tokens: vec![3; positions as usize],
            keep_as: keep_as.into(),
            max_length: 16,
            ..step(seq, hidden)
        }
    }

    async fn prefix_entries(client: &mut Client, want: u32) -> DeviceInfo {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = client
                .get_device_info(DeviceInfoRequest::default())
                .await
                .unwrap()
                .into_inner();
            if info.prefix_entries == want || Instant::now() > deadline {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn prefixes_are_kept_found_refused_by_kind_and_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        crate::util::runtime().block_on(async {
            let mut cfg = WorkerConfig::new("pfx");
            cfg.cache_dir = tmp.path().join("cache");
            cfg.prefix_cache_bytes = 100 << 20;
            let (_addr, mut client) = start_with(tmp.path(), cfg).await;
            one_step(&mut client, first_step("a", 5, "pa"))
                .await
                .unwrap();
            let info = prefix_entries(&mut client, 1).await;
            assert_eq!(info.prefix_entries, 1);
            // The budget reported: the setting, within a quarter of the KV budget.
            assert_eq!(info.prefix_budget_bytes, 100 << 20);
            // Only the 5 positions are kept: 2 layers, K and V, 4 heads of 64 (f32).
            assert_eq!(info.prefix_bytes, 5 * 2 * 2 * 4 * 64 * 4);
            let mut from = first_step("b", 1, "");
            from.prefix_id = "pa".into();
            from.offset = 5;
            assert!(one_step(&mut client, from.clone())
                .await
                .unwrap()
                .token
                .is_some());
            // One not kept here is refused as a miss, by kind.
            from.sequence_id = "c".into();
            from.prefix_id = "gone".into();
            let err = one_step(&mut client, from).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition);
            let kind = err
                .metadata()
                .get(ERROR_KIND_KEY)
                .map(|v| v.to_str().unwrap());
            assert_eq!(kind, Some(PREFIX_MISSING), "{err:?}");
            // Forgotten: the kept one, and a live one not to be kept.
            let (tx, rx) = mpsc::channel(2);
            tx.send(first_step("d", 2, "pd")).await.unwrap();
            let mut replies = client
                .forward(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            assert!(replies.message().await.unwrap().is_some());
            let mut e = first_step("e", 2, "");
            e.forget_prefixes = vec!["pa".into(), "pd".into(), "never".into()];
            one_step(&mut client, e).await.unwrap();
            drop((tx, replies));
            tokio::time::sleep(Duration::from_millis(200)).await;
            let info = prefix_entries(&mut client, 0).await;
            assert_eq!((info.prefix_entries, info.prefix_bytes), (0, 0));
        });
    }

    #[test]
    fn device_info_answers_while_the_engine_is_busy() {
        let svc = WorkerService::new(WorkerConfig::new("busy"));
        let ask = |svc: &WorkerService| {
            crate::util::runtime().block_on(async {
                let asked = svc.get_device_info(Request::new(DeviceInfoRequest::default()));
                tokio::time::timeout(Duration::from_secs(30), asked)
                    .await
                    .expect("GetDeviceInfo waited for the busy engine")
                    .unwrap()
                    .into_inner()
            })
        };
        assert_eq!(ask(&svc).busy_for_micros, 0);
        let (release, until) = std_mpsc::channel();
        svc.jobs.send(Job::Hold(until)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let info = ask(&svc);
        assert!(info.busy_for_micros >= 100_000, "{}", info.busy_for_micros);
        assert_eq!(info.name, "busy");
        drop(release);
        assert_eq!(ask(&svc).busy_for_micros, 0);
    }

    #[test]
    fn calls_without_the_cluster_token_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        set_cluster_token(Some("s3cret".into()));
        crate::util::runtime().block_on(async {
            let (addr, mut client) = start(tmp.path()).await;
            assert!(client
                .get_device_info(DeviceInfoRequest::default())
                .await
                .is_ok());
            set_cluster_token(Some("wrong".into()));
            let mut other = connect(&addr, Duration::from_secs(5)).await.unwrap();
            let err = other
                .get_device_info(DeviceInfoRequest::default())
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            set_cluster_token(None);
            let mut none = connect(&addr, Duration::from_secs(5)).await.unwrap();
            assert!(none
                .release(ReleaseRequest {
                    sequence_id: "x".into()
                })
                .await
                .is_err());
        });
        set_cluster_token(None);
    }

    #[test]
    fn the_kv_budget_counts_the_longest_rows_room_for_every_row() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
        let m = Model::load(&weights, None).unwrap();
        let fp = Footprint::from_weights(&weights, &m.args, m.tied());
        let per_token: u64 = fp.kv_bytes_per_token[1..3].iter().sum();
        crate::util::runtime().block_on(async {
            let (_addr, mut client) = start(tmp.path()).await;
            // Room for 1500 tokens: a sequence of 1000 and one of 8 fit by
            // their sum, but each row of the shared cache gets 1024.
            load(
                &mut client,
                LoadShardRequest {
                    source: Some(ProtoSource {
                        path: tmp.path().display().to_string(),
                        model_id: String::new(),
                    }),
                    layer_start: 1,
                    layer_end: 3,
                    head: true,
                    cache_budget: per_token * 1500,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let good = codec::encode(
                &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
                Compression::None,
            )
            .unwrap();
            let (tx, rx) = mpsc::channel(1);
            let mut replies = client
                .forward(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut long = step("long", good.clone());
            long.max_length = 1000;
            tx.send(long).await.unwrap();
            assert!(replies.message().await.unwrap().unwrap().token.is_some());
            let err = one_step(&mut client, step("short", good.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
            assert!(
                err.message()
                    .contains("2 sequences with room for 1024 tokens"),
                "{err:?}"
            );
            // Once the long one ends, the short one fits.
            drop((tx, replies));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match one_step(&mut client, step("short", good.clone())).await {
                    Ok(r) => break assert!(r.token.is_some()),
                    Err(e) if Instant::now() < deadline => {
                        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("still refused: {e:?}"),
                }
            }
        });
    }

    #[test]
    fn bad_messages_are_refused_and_the_worker_keeps_serving() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        crate::util::runtime().block_on(async {
            let (addr, mut client) = start(tmp.path()).await;
            let good = codec::encode(
                &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
                Compression::None,
            )
            .unwrap();

            let mut truncated = good.clone();
            truncated.data = truncated.data.slice(..10);
            let err = one_step(&mut client, step("a", truncated))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

            let mut wrong_shape = good.clone();
            wrong_shape.shape = vec![1, 2, 128];
            let err = one_step(&mut client, step("b", wrong_shape))
                .await
                .unwrap_err();
            assert!(err.message().contains("do not fit"), "{err:?}");

            let mut bad_dtype = good.clone();
            bad_dtype.dtype = 99;
            assert!(one_step(&mut client, step("c", bad_dtype)).await.is_err());

            let mut late = step("d", good.clone());
            late.offset = 5;
            let err = one_step(&mut client, late).await.unwrap_err();
            assert!(err.message().contains("unknown"), "{err:?}");

            let mut huge = step("e", good.clone());
            huge.max_length = 1 << 31;
            let err = one_step(&mut client, huge).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

            // Garbage on the raw port, then a truncated gRPC frame.
            for junk in [
                &b"\x00\x01garbage that is not http/2"[..],
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"[..],
            ] {
                use tokio::io::AsyncWriteExt as _;
                let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
                raw.write_all(junk).await.unwrap();
                drop(raw);
            }

            let reply = one_step(&mut client, step("f", good.clone()))
                .await
                .unwrap();
            assert!(reply.token.is_some());
            assert_eq!(reply.stage_micros.len(), 1);
        });
    }

    /// Decode steps queued together run as one batch; a row whose bytes do
    /// not fit its shape (one short, one long: together the batch's size)
    /// fails its own sequence alone, and the others get their tokens.
    #[test]
    fn a_bad_row_fails_alone_in_a_batched_step() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        crate::util::runtime().block_on(async {
            let mut cfg = WorkerConfig::new("batch");
            cfg.cache_dir = tmp.path().join("cache");
            let (addr, mut client, jobs) = start_with_jobs(tmp.path(), cfg).await;
            let row = |v: f64| {
                codec::encode(
                    &Array::full(&[1, 1, 256], v, crate::mlx::Dtype::Float32).unwrap(),
                    Compression::None,
                )
                .unwrap()
            };
            // A sequence lives as long as its Forward stream: one each.
            let names = ["a", "b", "c", "d"];
            let mut streams = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let (tx, rx) = mpsc::channel(2);
                tx.send(step(name, row(0.01 * i as f64))).await.unwrap();
                let mut replies = client
                    .forward(ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(replies.message().await.unwrap().is_some());
                streams.push((tx, replies));
            }
            let batches = || async {
                let mut c = connect(&addr, Duration::from_secs(5)).await.unwrap();
                c.get_device_info(DeviceInfoRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .batches
            };
            let before = batches().await;
            let (release, until) = std_mpsc::channel();
            jobs.send(Job::Hold(until)).unwrap();
            for (i, (name, (tx, _))) in names.iter().zip(&streams).enumerate() {
                let mut hidden = row(0.02 * i as f64);
                let mut data = hidden.data.to_vec();
                match *name {
                    "b" => data.truncate(data.len() - 1),
                    "c" => data.push(0),
                    _ => {}
                }
                hidden.data = data.into();
                let mut req = step(name, hidden);
                req.offset = 1;
                tx.send(req).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            release.send(()).unwrap();
            for (name, (_, replies)) in names.iter().zip(&mut streams) {
                let r = within("a batched step", replies.message()).await;
                match *name {
                    "b" | "c" => {
                        let err = r.unwrap_err();
                        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
                        assert!(err.message().contains("bytes"), "{name}: {err:?}");
                    }
                    _ => assert!(r.unwrap().unwrap().token.is_some(), "{name}"),
                }
            }
            assert_eq!(
                batches().await,
                before + 1,
                "the steps did not run as one batch"
            );
        });
    }

    /// xorshift64*: a tiny seeded generator, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }

        /// Fewer than `most` random bytes.
        fn some_bytes(&mut self, most: u64) -> Vec<u8> {
            let n = self.below(most) as usize;
            self.bytes(n)
        }

        fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len() as u64) as usize]
        }
    }

    /// `f`'s result, or a test failure if it takes more than 10 s (a hang).
    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
    }

    /// Loads a shard; an error of the call or of its progress stream is the
    /// result's.
    async fn load(
        client: &mut Client,
        req: LoadShardRequest,
    ) -> std::result::Result<ShardInfo, Status> {
        let mut progress = client.load_shard(req).await?.into_inner();
        while let Some(p) = progress.message().await? {
            if p.done {
                return p
                    .shard
                    .ok_or_else(|| Status::internal("done without a shard"));
            }
        }
        Err(Status::internal("the load ended before it was done"))
    }

    /// Sends `body` as the one message of a Forward stream, as it is: bytes
    /// that need not be a ForwardRequest.
    async fn raw_forward(addr: &str, body: Vec<u8>) -> std::result::Result<ForwardReply, Status> {
        struct Raw;
        impl tonic::codec::Encoder for Raw {
            type Item = Vec<u8>;
            type Error = Status;
            fn encode(
                &mut self,
                item: Vec<u8>,
                dst: &mut tonic::codec::EncodeBuf<'_>,
            ) -> std::result::Result<(), Status> {
                bytes::BufMut::put_slice(dst, &item);
                Ok(())
            }
        }
        struct Replies;
        impl tonic::codec::Decoder for Replies {
            type Item = ForwardReply;
            type Error = Status;
            fn decode(
                &mut self,
                src: &mut tonic::codec::DecodeBuf<'_>,
            ) -> std::result::Result<Option<ForwardReply>, Status> {
                prost::Message::decode(src)
                    .map(Some)
                    .map_err(|e| Status::internal(e.to_string()))
            }
        }
        struct Codec;
        impl tonic::codec::Codec for Codec {
            type Encode = Vec<u8>;
            type Decode = ForwardReply;
            type Encoder = Raw;
            type Decoder = Replies;
            fn encoder(&mut self) -> Raw {
                Raw
            }
            fn decoder(&mut self) -> Replies {
                Replies
            }
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/mlx_dist.v1.Worker/Forward");
        let mut replies = grpc
            .streaming(Request::new(tokio_stream::once(body)), path, Codec)
            .await?
            .into_inner();
        replies
            .message()
            .await?
            .ok_or_else(|| Status::internal("no reply"))
    }

    /// One way to spoil a valid step; each alone makes it invalid.
    fn spoil(rng: &mut Rng, req: &mut ForwardRequest, limit: usize) -> String {
        let t = req.hidden.as_mut().unwrap();
        match rng.below(14) {
            0 => {
                let n = rng.below(t.data.len() as u64) as usize;
                t.data = t.data.slice(..n);
                format!("data truncated to {n} bytes")
            }
            1 => {
                let mut d = t.data.to_vec();
                d.push(0);
                d.extend(rng.some_bytes(64));
                t.data = d.into();
                "data too long".into()
            }
            2 => {
                t.dtype = rng.pick(&[-1, 0, 2, 3, 4, 5, 6, 7, 99, i32::MAX, i32::MIN]);
                format!("dtype {}", t.dtype)
            }
            3 => {
                let dims = [
                    -1,
                    0,
                    1,
                    2,
                    3,
                    255,
                    256,
                    257,
                    1 << 20,
                    (1 << 20) + 1,
                    1 << 40,
                    i64::MAX,
                    i64::MIN,
                ];
                let rank = rng.below(6) as usize;
                let mut shape: Vec<i64> = (0..rank)
                    .map(|_| {
                        if rng.below(4) == 0 {
                            rng.next() as i64
                        } else {
                            rng.pick(&dims)
                        }
                    })
                    .collect();
                if shape == [1, 1, 256] {
                    shape[2] = 255;
                }
                t.shape = shape;
                format!("shape {:?}", t.shape)
            }
            4 => {
                t.compression = rng.pick(&[1, 2, 99, -1, i32::MIN]);
                format!("compression {}", t.compression)
            }
            5 => {
                let mut scales = vec![0u8];
                scales.extend(rng.some_bytes(64));
                t.scales = scales.into();
                "scales on an uncompressed tensor".into()
            }
            6 => {
                req.sequence_id = if rng.below(2) == 0 {
                    String::new()
                } else {
                    "s".repeat(257 + rng.below(1000) as usize)
                };
                format!("sequence id of {} characters", req.sequence_id.len())
            }
            7 => {
                req.offset = 1 + rng.below(1 << 20) as u32;
                format!("unknown sequence at offset {}", req.offset)
            }
            8 => {
                req.tokens = vec![0; MAX_POSITIONS + 1 + rng.below(100) as usize];
                format!("{} tokens", req.tokens.len())
            }
            9 => {
                t.data = vec![0u8; limit + rng.below(1 << 20) as usize].into();
                format!("a {} byte message", t.data.len())
            }
            10 => {
                req.max_length = (1 << 28) + rng.below(u32::MAX as u64 - (1 << 28)) as u32;
                format!("max_length {}", req.max_length)
            }
            11 => {
                req.prefix_id = format!("p{}", rng.next());
                "an unknown prefix".into()
            }
            12 => {
                let mut p = SamplingParams::default();
                p.logit_bias.insert(1024 + rng.below(1 << 30) as u32, 1.0);
                req.sampling = Some(p);
                "a logit bias outside the vocabulary".into()
            }
            _ => {
                req.hidden = None;
                "no activations".into()
            }
        }
    }

    #[test]
    fn fuzzed_requests_get_errors_and_the_worker_keeps_serving() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        let limit = 2 << 20;
        crate::util::runtime().block_on(async {
            let mut cfg = WorkerConfig::new("fuzz");
            cfg.cache_dir = tmp.path().join("cache");
            cfg.max_message_bytes = limit;
            cfg.max_sequences = 2;
            let (addr, mut client) = start_with(tmp.path(), cfg).await;
            let good = codec::encode(
                &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
                Compression::None,
            )
            .unwrap();
            let path = tmp.path().display().to_string();
            let valid_load = LoadShardRequest {
                source: Some(ProtoSource {
                    path: path.clone(),
                    model_id: String::new(),
                }),
                layer_start: 1,
                layer_end: 3,
                head: true,
                cache_budget: 1 << 30,
                ..Default::default()
            };
            let started = Instant::now();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let mut kinds = [0usize; 4];
            for i in 0..400 {
                let kind = match rng.below(16) {
                    0..=3 => 0,
                    4..=12 => 1,
                    13..=14 => 2,
                    _ => 3,
                };
                kinds[kind] += 1;
                match kind {
                    // Raw bytes on the port, then gone.
                    0 => {
                        use tokio::io::AsyncWriteExt as _;
                        let mut junk = if rng.below(2) == 0 {
                            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
                        } else {
                            Vec::new()
                        };
                        junk.extend(rng.some_bytes(4096));
                        within("raw bytes", async {
                            let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
                            // The worker may hang up first: that is fine.
                            let _ = raw.write_all(&junk).await;
                        })
                        .await;
                    }
                    // A valid step spoiled one way.
                    1 => {
                        let mut req = step(&format!("f{i}"), good.clone());
                        let what = spoil(&mut rng, &mut req, limit);
                        let r = within(&what, one_step(&mut client, req)).await;
                        assert!(r.is_err(), "{what}: a reply, not an error");
                    }
                    // Bytes that need not be a ForwardRequest.
                    2 => {
                        let body = rng.some_bytes(2048);
                        let r = within("raw protobuf", raw_forward(&addr, body)).await;
                        assert!(r.is_err(), "random bytes got a reply");
                    }
                    // A shard that cannot be loaded; then the valid one again.
                    _ => {
                        let mut req = valid_load.clone();
                        let ends = [0, 1, 2, 3, 4, 5, 1000, u32::MAX];
                        let what = match rng.below(4) {
                            0 => {
                                req.layer_start = 1 + rng.below(u32::MAX as u64 - 1) as u32;
                                req.layer_end = rng.below(req.layer_start as u64) as u32;
                                "start after end".to_string()
                            }
                            1 => {
                                req.layer_start = rng.pick(&ends[..4]);
                                req.layer_end = rng.pick(&ends[4..]);
                                "beyond the model".to_string()
                            }
                            2 => {
                                req.source = Some(ProtoSource {
                                    path: String::new(),
                                    model_id: rng
                                        .pick(&["", "../x", "a/b", "no-such-model"])
                                        .into(),
                                });
                                "a bad model id".to_string()
                            }
                            _ => {
                                req.source = Some(ProtoSource {
                                    path: format!("{path}/missing-{}", rng.next()),
                                    model_id: String::new(),
                                });
                                "a missing path".to_string()
                            }
                        };
                        let what = format!("load: {what} ({}..{})", req.layer_start, req.layer_end);
                        let r = within(&what, load(&mut client, req)).await;
                        assert!(r.is_err(), "{what}: loaded");
                        within("reload", load(&mut client, valid_load.clone()))
                            .await
                            .unwrap();
                    }
                }
            }
            assert!(kinds.iter().all(|&k| k > 10), "{kinds:?}");

            // One sequence more than allowed, on one stream.
            let (tx, rx) = mpsc::channel(4);
            let mut replies = client
                .forward(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            for seq in ["m1", "m2"] {
                tx.send(step(seq, good.clone())).await.unwrap();
                let r = within("a step", replies.message()).await.unwrap().unwrap();
                assert!(r.token.is_some());
            }
            tx.send(step("m3", good.clone())).await.unwrap();
            let err = within("a third sequence", replies.message())
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
            assert!(err.message().contains("max-sequences"), "{err:?}");
            drop(tx);

            // An oversize message is refused with a clear word.
            let mut big = good.clone();
            big.data = vec![0u8; limit + 1].into();
            let err = one_step(&mut client, step("big", big)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
            assert!(err.message().contains("max-message-mb"), "{err:?}");

            // Still serving.
            let reply = within(
                "a valid step",
                one_step(&mut client, step("ok", good.clone())),
            )
            .await
            .unwrap();
            assert!(reply.token.is_some());
            let info = within(
                "device info",
                client.get_device_info(DeviceInfoRequest::default()),
            )
            .await
            .unwrap()
            .into_inner();
            assert_eq!(info.shard.unwrap().layer_end, 3);
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{:?}",
                started.elapsed()
            );
        });
    }

    #[test]
    fn certificates_are_checked_and_made_for_their_hosts() {
        assert!(make_certificate(&[]).is_err());
        assert!(make_certificate(&[" ".into()]).is_err());
        assert!(make_certificate(&["not a host!".into()]).is_err());
        let (cert, key) =
            make_certificate(&["127.0.0.1".into(), "localhost".into(), "[::1]".into()]).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        assert!(TlsIdentity::new(cert.clone(), key.clone()).is_ok());
        let (_, other_key) = make_certificate(&["localhost".into()]).unwrap();
        let err = TlsIdentity::new(cert.clone(), other_key).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert!(TlsIdentity::new(cert.clone(), "junk".into()).is_err());
        assert!(TlsIdentity::new("junk".into(), key.clone()).is_err());
        assert!(set_tls_ca(Some("not a certificate".into())).is_err());
        let id = TlsIdentity::new(cert, key).unwrap();
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    #[test]
    fn tls_workers_answer_only_clients_that_trust_them() {
        let tmp = tempfile::tempdir().unwrap();
        crate::models::tests::write_llama(tmp.path(), 3);
        let (cert, key) = make_certificate(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        let (other, _) = make_certificate(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        set_tls_ca(Some(cert.clone())).unwrap();
        crate::util::runtime().block_on(async {
            let mut cfg = WorkerConfig::new("tls");
            cfg.cache_dir = tmp.path().join("cache");
            cfg.tls = Some(TlsIdentity::new(cert.clone(), key).unwrap());
            let (addr, mut client) = start_with(tmp.path(), cfg).await;
            let good = codec::encode(
                &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
                Compression::None,
            )
            .unwrap();
            let reply = one_step(&mut client, step("a", good.clone()))
                .await
                .unwrap();
            assert!(reply.token.is_some());
            let port = addr.rsplit_once(':').unwrap().1;
            let mut by_name = connect(&format!("localhost:{port}"), Duration::from_secs(5))
                .await
                .unwrap();
            assert!(by_name
                .get_device_info(DeviceInfoRequest::default())
                .await
                .is_ok());

            // A client trusting another CA, one without TLS, and a TLS
            // client of a plain worker fail at once, naming the worker.
            set_tls_ca(None).unwrap();
            let (plain, _) = start(tmp.path()).await;
            for (ca, to, word) in [
                (Some(other), &addr, "certificate"),
                (None, &addr, "TLS"),
                (Some(cert.clone()), &plain, "TLS"),
            ] {
                set_tls_ca(ca).unwrap();
                let t = Instant::now();
                let Err(err) = connect(to, Duration::from_secs(5)).await else {
                    panic!("connected to {to}");
                };
                assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
                let msg = err.to_string();
                assert!(msg.contains(to.as_str()) && msg.contains(word), "{msg}");
                assert!(is_tls_mismatch(&err), "{msg}");
            }
            // A worker that is not up is worth trying again.
            let gone = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            };
            for ca in [None, Some(cert.clone())] {
                set_tls_ca(ca).unwrap();
                let err = connect(&gone, Duration::from_secs(2)).await.unwrap_err();
                assert!(!is_tls_mismatch(&err), "{err}");
            }
        });
        set_tls_ca(None).unwrap();
    }
}
