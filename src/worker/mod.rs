//! The worker: a gRPC server that holds one pipeline stage (a layer range of
//! a model) and the KV caches of its layers for every sequence.
//!
//! All MLX work happens on one engine thread that owns the stage and the
//! caches; gRPC handlers send it jobs. A `Forward` stream from upstream is
//! relayed to the next stage over a stream of this worker's own, so
//! activations go along the chain and replies come back up it.
//!
//! Here: the worker's config and the types its parts share (the engine's
//! state, its jobs and step results). The parts:
//!
//! - `step`: one step of one sequence, as the engine takes it;
//! - `engine`: the engine thread's loop, one sequence's step and its output;
//! - `sequences`: admitting a sequence (its slot, the KV budget, a kept
//!   prefix) and ending it;
//! - `batch`: decode steps of several sequences run as one batch;
//! - `ahead`: decode steps launched ahead of their input;
//! - `stage`: the stage held, and loading it;
//! - `warmup`: compiling a loaded stage's GPU kernels;
//! - `files`: the model cache and files pushed into it;
//! - `service`: the gRPC service;
//! - `relay`: the Forward stream, relayed down the chain and round the ring;
//! - `serve`: serving a worker, on a port or inside this process.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
#[cfg(test)]
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::cache::SlotCache;
use crate::codec::{self, Encoded};
use crate::error::{Error, Result};
use crate::mlx::{self, Array};
use crate::prefix::PrefixStore;
use crate::proto::{EngineStats, LoadProgress, LoadShardRequest};
use crate::sample::Sampler;
use crate::transport::{TlsIdentity, TransportConfig};

mod ahead;
mod batch;
mod engine;
mod files;
mod relay;
mod sequences;
mod serve;
mod service;
mod stage;
mod step;
mod warmup;

use ahead::{Guess, Post, Prepared};
pub(crate) use serve::in_process;

pub use serve::{is_local, serve, start_local, stop_local};
pub use service::WorkerService;
use stage::Stage;
pub use step::Step;

/// Largest message a worker accepts unless configured: the activations of a
/// 2048-token prompt chunk of a float32 model with hidden size 8192 are
/// 64 MiB; pushed file chunks are 4 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 160 << 20;

/// Sequences a worker holds at once unless configured.
pub const DEFAULT_MAX_SEQUENCES: usize = 256;

/// Most positions one step may carry (token ids, or activation rows).
pub const MAX_POSITIONS: usize = 1 << 20;

/// How a worker is started. `new` gives the defaults, `from_env` (in
/// `config`) what the environment changes of them.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Shown in logs, errors and `DeviceInfo`.
    pub name: String,
    /// Where pushed model files are kept (`pushed_models_dir` of the cache).
    pub cache_dir: PathBuf,
    /// How long to wait for the next stage's reply to one step.
    pub step_timeout: Duration,
    /// Read models from paths on this machine; when false, only pushed
    /// copies are used.
    pub allow_local_paths: bool,
    /// Serve TLS with this certificate and key; `None`: plain gRPC.
    pub tls: Option<TlsIdentity>,
    /// The cluster token every call must carry, how the next stage (and,
    /// from the last stage, the first) is reached, and the keepalive and
    /// HTTP/2 window settings of this worker's server.
    pub transport: TransportConfig,
    /// Largest gRPC message accepted (larger ones are refused unread).
    pub max_message_bytes: usize,
    /// Sequences held at once; one more is refused (RESOURCE_EXHAUSTED).
    pub max_sequences: usize,
    /// Bytes of KV cache kept from ended sequences at most (and at most a
    /// quarter of the KV budget).
    pub prefix_cache_bytes: u64,
    /// The KV cache budget of a stage loaded here, unless its load request
    /// names one; `None`: 80% of the device memory free after loading.
    pub kv_budget_bytes: Option<u64>,
    /// Compile the stage's GPU kernels as it loads (`warmup`); by default
    /// where MLX compiles them on first use (a CUDA GPU, where mailboxes
    /// wait on the device; Metal ships its kernels compiled, and the CPU's
    /// few compiled ones build in well under a second).
    pub warm_up: bool,
    /// How long the engine polls for a step's result before sleeping: on a
    /// GPU, about a decode step's device time (a sleeping wait woke 40 to
    /// 70 us later per step on an H200); never on the CPU, where MLX
    /// computes on threads of this process and polling would take a core
    /// from them. Zero: always sleep.
    pub spin: Duration,
    /// Whether decode steps are launched ahead of their input (`ahead`):
    /// by default where the mailbox waits on the device (a CUDA GPU). On
    /// one H200 shared by three worker processes it took a stage's step
    /// from about 2 ms to 0.7-0.8 and decode from 0.39-0.77 times one
    /// device's speed to 0.73-1.32 (README). On the CPU, where MLX's
    /// encoding is a small part of a step, it gained nothing; on Metal it
    /// is untried.
    pub launch_ahead: bool,
}

/// The most `WorkerConfig::spin` may be.
const MAX_SPIN: Duration = Duration::from_secs(1);

/// A spin of `us` microseconds, at most `MAX_SPIN`.
pub fn spin_of_micros(us: u64) -> Duration {
    Duration::from_micros(us).min(MAX_SPIN)
}

/// Where a worker whose cache folder is `cache` keeps pushed models.
pub fn pushed_models_dir(cache: &std::path::Path) -> PathBuf {
    cache.join("models")
}

impl WorkerConfig {
    /// Refuses a model path of the worker's own files when it reads none
    /// (`allow_local_paths`): the coordinator then sends the files.
    pub(crate) fn check_local_paths(&self) -> Result<()> {
        if self.allow_local_paths {
            return Ok(());
        }
        Err(Error::NotFound(format!(
            "worker {} reads no local model files",
            self.name
        )))
    }

    /// The defaults: pushed models in `~/.cache/mlx-dist/models`, plain
    /// gRPC, no cluster token, and what suits this device.
    pub fn new(name: &str) -> WorkerConfig {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let on_device = mlx::Mailbox::waits_on_device();
        WorkerConfig {
            name: name.to_string(),
            cache_dir: pushed_models_dir(&home.join(".cache/mlx-dist")),
            step_timeout: Duration::from_secs(600),
            allow_local_paths: true,
            tls: None,
            transport: TransportConfig::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_sequences: DEFAULT_MAX_SEQUENCES,
            prefix_cache_bytes: crate::prefix::DEFAULT_BUDGET_MB << 20,
            kv_budget_bytes: None,
            warm_up: on_device,
            spin: if mlx::default_device_is_gpu() {
                Duration::from_micros(2000)
            } else {
                Duration::ZERO
            },
            launch_ahead: on_device,
        }
    }
}

/// `e` as the status this worker answers with, its kind in the metadata
/// (`transport::status_of`).
pub(crate) fn status(e: Error) -> Status {
    crate::transport::status_of(e)
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
pub(crate) struct StepOut {
    /// Activations for the next stage (not on the last stage).
    pub(crate) hidden: Option<Encoded>,
    pub(crate) token: Option<u32>,
    pub(crate) logprobs: Option<Encoded>,
    pub(crate) micros: u32,
    next: Option<String>,
    first: Option<String>,
}

/// A step's result as the service gives it.
pub(crate) type StepOutcome = std::result::Result<StepOut, Status>;

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
    Step(Step, oneshot::Sender<Result<StepOut>>, Instant),
    Release(String, oneshot::Sender<u64>),
    Info(oneshot::Sender<EngineStats>),
    /// Keeps the engine busy until the sender hangs up.
    #[cfg(test)]
    Hold(std_mpsc::Receiver<()>),
}

struct Engine {
    name: String,
    /// When the job the engine runs started, in microseconds after
    /// `origin` plus one; 0 while it waits for one.
    job_since: Arc<AtomicU64>,
    origin: Instant,
    /// What it reported when it last finished a job.
    last_info: Arc<std::sync::Mutex<EngineStats>>,
    /// Sequences held at once at most.
    max_sequences: usize,
    stage: Option<Stage>,
    seqs: HashMap<String, Sequence>,
    /// The KV caches of all sequences, one `SlotCache` per layer held.
    caches: Vec<SlotCache>,
    /// Slots of ended sequences, to reuse.
    free: Vec<usize>,
    /// Jobs put off while a batch gathered, to run after it (`gather`).
    later: std::collections::VecDeque<Job>,
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

fn micros_since(t: Instant) -> u32 {
    t.elapsed().as_micros().min(u32::MAX as u128) as u32
}

type BoxStream<T> =
    std::pin::Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

#[cfg(test)]
mod tests;
