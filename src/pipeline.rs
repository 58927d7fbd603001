//! The coordinator's side of a pipeline: connecting to workers, planning
//! and loading the stages, pushing model files a worker lacks, and running
//! sequences through the chain (`RemoteTokens`, a `TokenSource`).
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::codec;
use crate::device::Capabilities;
use crate::error::{Error, Result};
use crate::generate::{check_prompt, TokenSource};
use crate::mlx::Array;
use crate::models::ModelArgs;
use crate::prefix::PrefixIndex;
use crate::proto::{
    Compression, DeviceInfoRequest, FileChunk, ForwardReply, ForwardRequest, LoadShardRequest,
    ModelSource as ProtoSource, ReleaseRequest, SamplingParams,
};
use crate::sample::{ProcessorConfig, SamplerConfig};
use crate::sharding::{plan, Footprint, Plan, Strategy};
use crate::transport::{connect, Client};
use crate::util::{lock, runtime};

use crate::weights::{resolve, ModelSource, Weights};

mod late;
mod ledger;
use late::{step_deadline, Late, LATE_DEADLINES};
use ledger::{Ledger, Next};

/// How to reach a worker and, optionally, what it is declared to be able
/// to do (overriding what it measures).
#[derive(Clone, Debug, Default)]
pub struct WorkerSpec {
    pub address: String,
    pub declared: Option<Capabilities>,
}

/// Options of `Cluster::load`.
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
    /// The worker runs inside this process (`worker::start_local`).
    pub local: bool,
    client: Client,
}

impl std::fmt::Display for StageHandle {
    /// How messages name the worker: `name (address)`, or only its name for
    /// the worker inside this process (its loopback port is a detail).
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
}

/// Prompt chunks of one sequence in flight through the pipeline at once.
const PREFILL_IN_FLIGHT: usize = 4;

/// Ring steps a sequence may run ahead of the tokens read here: enough that
/// a reader keeping up never stalls the ring, few enough that one stopping
/// early wastes little.
const RING_CREDIT: u32 = 2;

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

/// Connects to one worker, retrying with backoff until `deadline`.
async fn connect_retrying(addr: &str, within: Duration) -> Result<Client> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = within.saturating_sub(start.elapsed());
        match connect(
            addr,
            left.min(Duration::from_secs(3))
                .max(Duration::from_millis(200)),
        )
        .await
        {
            Ok(c) => return Ok(c),
            // A certificate problem does not go away by retrying.
            Err(e) if crate::transport::is_tls_mismatch(&e) => return Err(e),
            Err(e) if start.elapsed() + wait >= within => {
                return Err(Error::Worker(format!(
                    "worker {addr} is unreachable after {attempts} attempts in {:.1} s: {e}",
                    start.elapsed().as_secs_f64()
                )))
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn worker_error(stage: &StageHandle, s: tonic::Status) -> Error {
    let msg = s.message();
    let kind = s
        .metadata()
        .get(crate::transport::ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok());
    let bytes = |key| {
        s.metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    match s.code() {
        tonic::Code::ResourceExhausted if kind == Some(crate::transport::KV_BUDGET_EXCEEDED) => {
            Error::KvBudgetExceeded {
                need: bytes(crate::transport::NEED_KEY),
                budget: bytes(crate::transport::BUDGET_KEY),
                detail: msg.to_string(),
            }
        }
        tonic::Code::ResourceExhausted => Error::ResourceExhausted(msg.to_string()),
        // An evicted prefix: a cache miss (`Cluster::start`).
        tonic::Code::FailedPrecondition if kind == Some(crate::transport::PREFIX_MISSING) => {
            Error::PrefixMissing(format!("worker {stage}: {msg}"))
        }
        // A restarted worker or a dropped sequence: a re-plan mends it.
        tonic::Code::FailedPrecondition => Error::Worker(format!("worker {stage}: {msg}")),
        tonic::Code::InvalidArgument => Error::InvalidArgument(format!("worker {stage}: {msg}")),
        _ => Error::Worker(format!("worker {stage}: {msg}")),
    }
}

/// A stable id for pushed copies of a model: its file names, sizes and the
/// first MiB of each file.
fn model_id(files: &[(PathBuf, String)]) -> Result<String> {
    let mut h = Sha256::new();
    for (path, rel) in files {
        let meta = std::fs::metadata(path)?;
        h.update(rel.as_bytes());
        h.update(meta.len().to_le_bytes());
        let mut head = vec![0u8; 1 << 20];
        let n = std::fs::File::open(path)?.read(&mut head)?;
        h.update(&head[..n]);
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// The files a worker needs to load `source` (weights and config; the
/// tokenizer stays with the coordinator).
fn model_files(source: &ModelSource) -> Result<Vec<(PathBuf, String)>> {
    match source {
        ModelSource::Gguf(f) => {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("model.gguf")
                .to_string();
            Ok(vec![(f.clone(), name)])
        }
        ModelSource::Directory(dir) => {
            let mut out = Vec::new();
            for e in std::fs::read_dir(dir)? {
                let p = e?.path();
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if name == "config.json"
                    || name.ends_with(".safetensors")
                    || name == "model.safetensors.index.json"
                {
                    out.push((p, name));
                }
            }
            out.sort_by(|a, b| a.1.cmp(&b.1));
            Ok(out)
        }
    }
}

async fn push_files(
    client: &mut Client,
    id: &str,
    files: &[(PathBuf, String)],
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let total: u64 = files
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let (tx, rx) = mpsc::channel::<FileChunk>(4);
    let call = client.push_file(ReceiverStream::new(rx));
    let id = id.to_string();
    let files = files.to_vec();
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let producer = tokio::task::spawn_blocking(move || -> Result<()> {
        const CHUNK: usize = 4 << 20;
        for (path, rel) in files {
            let mut f = std::fs::File::open(&path)?;
            let size = f.metadata()?.len();
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = f.read(&mut buf)?;
                buf.truncate(n);
                let last = offset + n as u64 >= size;
                let chunk = FileChunk {
                    model_id: id.clone(),
                    path: rel.clone(),
                    offset,
                    data: buf.into(),
                    total_size: size,
                    last,
                };
                if tx.blocking_send(chunk).is_err() {
                    return Ok(());
                }
                offset += n as u64;
                sent2.fetch_add(n as u64, Ordering::Relaxed);
                if last {
                    break;
                }
            }
        }
        Ok(())
    });
    let reporter = {
        let sent = sent.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                progress(sent.load(Ordering::Relaxed), total);
            }
        }
    };
    let result = tokio::select! {
        r = call => r,
        _ = reporter => unreachable!(),
    };
    producer.await.map_err(|e| Error::Worker(e.to_string()))??;
    result.map_err(|s| Error::Worker(format!("pushing the model failed: {}", s.message())))?;
    Ok(())
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
        let model_source = resolve(source)?;
        let weights = Weights::open(&model_source)?;
        let args: ModelArgs = serde_json::from_value(weights.config.clone())
            .map_err(|e| weights.invalid(format!("config.json: {e}")))?;
        let tied = crate::models::is_tied(&weights.config, &args)?;
        let footprint = Footprint::from_weights(&weights, &args, tied);

        // Reach every worker (concurrently) and learn what it can do.
        let mut handles = Vec::new();
        let mut caps = Vec::new();
        let connects = workers
            .iter()
            .map(|w| connect_retrying(&w.address, opts.connect_timeout));
        let clients = futures::future::join_all(connects).await;
        for (spec, client) in workers.iter().zip(clients) {
            let mut client = client?;
            let info = tokio::time::timeout(
                Duration::from_secs(60),
                client.get_device_info(DeviceInfoRequest::default()),
            )
            .await
            .map_err(|_| {
                Error::Worker(format!(
                    "worker {} did not describe itself within 60 s",
                    spec.address
                ))
            })?
            .map_err(|s| Error::Worker(format!("worker {}: {}", spec.address, s.message())))?
            .into_inner();
            let mut c = Capabilities {
                name: info.name.clone(),
                device_type: info.device_type,
                chip: info.chip,
                gpu_cores: info.gpu_cores,
                memory_total: info.memory_total,
                memory_available: info.memory_available,
                matmul_gflops: info.matmul_gflops,
                bandwidth_gbs: info.bandwidth_gbs,
            };
            if let Some(d) = &spec.declared {
                c = declared_over(c, d);
            }
            handles.push(StageHandle {
                local: crate::worker::is_local(&spec.address),
                address: spec.address.clone(),
                name: info.name,
                client,
            });
            caps.push(c);
        }
        let plan = plan(&footprint, &caps, &opts.strategy, opts.kv_tokens)?;
        let files = model_files(&model_source)?;
        let id = model_id(&files)?;
        let path = std::fs::canonicalize(model_source.path())?
            .to_string_lossy()
            .into_owned();
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
            let mut client = handle.client.clone();
            match load_stage(&mut client, req.clone(), i, progress).await {
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // The worker has no copy: try its cache of pushed models,
                    // and push the files if it has none either.
                    req.source = Some(ProtoSource {
                        path: String::new(),
                        model_id: id.clone(),
                    });
                    match load_stage(&mut client, req.clone(), i, progress).await {
                        Err(s) if s.code() == tonic::Code::NotFound => {
                            progress(i, 0, 0, &format!("sending the model to {}", handle.name));
                            push_files(&mut client, &id, &files, |d, t| {
                                progress(i, d, t, "sending")
                            })
                            .await?;
                            load_stage(&mut client, req, i, progress)
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
            args,
            plan,
            stages,
            last_stage_micros: Arc::new(std::sync::Mutex::new(Vec::new())),
            prefill_chunk: opts.prefill_chunk,
            ring: opts.ring,
            prefixes: Default::default(),
        })
    }

    /// Starts a sequence: opens its stream to the first stage and prefills
    /// the prompt through the chain.
    pub async fn start(&self, spec: &SequenceSpec) -> Result<RemoteTokens> {
        let (prompt, sampler, procs) = (&spec.prompt, &spec.sampler, &spec.processors);
        check_prompt(prompt, self.args.vocab_size)?;
        let vocab = self.args.vocab_size as u32;
        sampler.validate()?;
        procs.validate(vocab as usize)?;
        // Penalties look back over the prompt, which a stage starting from a
        // kept prefix has not seen: such sequences compute it all.
        let penalties = procs.repetition_penalty.is_some()
            || procs.presence_penalty.is_some()
            || procs.frequency_penalty.is_some();
        // The last two prompt tokens run at least: the step before the last
        // is answered before this returns, so a stage that lacks the prefix
        // says so here (the last step's answer is the first token, read
        // later), and `cached_tokens` is known when it returns.
        let prefix = if penalties {
            None
        } else {
            lock(&self.prefixes).lookup(prompt, 2)
        };
        let run = |prefix| self.start_from(spec, prefix);
        match (run(prefix.clone()).await, prefix) {
            (Err(Error::PrefixMissing(why)), Some((id, _))) => {
                // A stage evicted it: a miss, computed again from scratch.
                tracing::debug!("{why}: the prompt runs without it");
                lock(&self.prefixes).remove(&id);
                run(None).await
            }
            (r, _) => r,
        }
    }

    async fn start_from(
        &self,
        spec: &SequenceSpec,
        prefix: Option<(String, usize)>,
    ) -> Result<RemoteTokens> {
        let SequenceSpec {
            prompt,
            sampler,
            processors: procs,
            max_tokens,
            prefill_step,
            logprobs,
        } = spec;
        let (max_tokens, prefill_step, logprobs) = (*max_tokens, *prefill_step, *logprobs);
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // Unique across coordinators too: ids also name kept prefixes.
        let seq = format!(
            "{:x}-{}",
            process_nonce(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let first = self.stages[0].clone();
        let mut client = first.client.clone();
        let (tx, rx) = mpsc::channel(4);
        let replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|s| worker_error(&first, s))?
            .into_inner();
        let sampling = SamplingParams {
            temp: sampler.temp,
            top_p: sampler.top_p,
            min_p: sampler.min_p,
            min_tokens_to_keep: sampler.min_tokens_to_keep,
            top_k: sampler.top_k,
            seed: sampler.seed,
            repetition_penalty: procs.repetition_penalty,
            repetition_context_size: procs.repetition_context_size as u32,
            presence_penalty: procs.presence_penalty,
            presence_context_size: procs.presence_context_size as u32,
            frequency_penalty: procs.frequency_penalty,
            frequency_context_size: procs.frequency_context_size as u32,
            logit_bias: procs.logit_bias.iter().copied().collect(),
        };
        let cached = prefix.as_ref().map_or(0, |p| p.1);
        let mut r = RemoteTokens {
            keep: Some(seq.clone()),
            prefixes: self.prefixes.clone(),
            forgets: Vec::new(),
            first_step: Some((prefix.map(|p| p.0).unwrap_or_default(), seq.clone())),
            seq,
            first,
            stages: self.stages.clone(),
            tx,
            replies,
            logprobs,
            ledger: Ledger::new(&prompt[..cached]),
            micros: self.last_stage_micros.clone(),
            failed: false,
            cached,
        };
        let max_length = (prompt.len() + max_tokens) as u32;
        let (head, last) = prompt[cached..].split_at(prompt.len() - cached - 1);
        let mut sampling = Some(sampling);
        // The chunks go out back to back: stage 1 prefills chunk k+1 while
        // stage 2 prefills chunk k. A few at a time, so that neither side's
        // buffers fill while the other waits.
        let step = prefill_step.clamp(1, self.prefill_chunk.max(1));
        for chunk in head.chunks(step) {
            r.send(chunk, false, sampling.take(), max_length, 0).await?;
            if r.ledger.in_flight() >= PREFILL_IN_FLIGHT {
                r.receive().await?;
            }
        }
        // The tokens after the first go round the ring by themselves.
        let ahead = if self.ring {
            max_tokens.saturating_sub(1).min(u32::MAX as usize) as u32
        } else {
            0
        };
        r.send(last, true, sampling.take(), max_length, ahead)
            .await?;
        r.ledger.started(ahead);
        while r.ledger.in_flight() > 1 {
            r.receive().await?;
        }
        Ok(r)
    }
}

async fn load_stage(
    client: &mut Client,
    req: LoadShardRequest,
    stage: usize,
    progress: Progress<'_>,
) -> std::result::Result<(), tonic::Status> {
    let mut stream = client.load_shard(req).await?.into_inner();
    while let Some(p) = stream.message().await? {
        progress(
            stage,
            p.bytes_loaded,
            p.bytes_total,
            if p.done { "loaded" } else { "loading" },
        );
        if p.done {
            return Ok(());
        }
    }
    Err(tonic::Status::internal("loading ended without finishing"))
}

/// What a sequence needs to start, or to start again from its history.
#[derive(Clone, Debug)]
pub struct SequenceSpec {
    pub prompt: Vec<u32>,
    pub sampler: SamplerConfig,
    pub processors: ProcessorConfig,
    pub max_tokens: usize,
    pub prefill_step: usize,
    pub logprobs: bool,
}

/// A sequence running through the pipeline.
pub struct RemoteTokens {
    seq: String,
    first: StageHandle,
    /// Every stage, asked whether it still answers when a reply is late.
    stages: Vec<StageHandle>,
    tx: mpsc::Sender<ForwardRequest>,
    replies: Streaming<ForwardReply>,
    logprobs: bool,
    /// Steps sent, replies read, ring tokens, and what the stages hold.
    ledger: Ledger,
    failed: bool,
    /// Prompt positions taken from a kept prefix.
    pub cached: usize,
    /// (prefix to start from, id to keep this sequence as), on the first step.
    first_step: Option<(String, String)>,
    /// The id the stages keep this sequence's cache as, to note at the end
    /// in `prefixes`.
    keep: Option<String>,
    prefixes: Arc<std::sync::Mutex<PrefixIndex>>,
    /// Kept prefixes the first step told the stages to forget: queued again
    /// if the sequence fails (they may not have reached every stage).
    forgets: Vec<String>,
    micros: Arc<std::sync::Mutex<Vec<u32>>>,
}

impl RemoteTokens {
    /// The id the workers know this sequence by.
    pub fn sequence_id(&self) -> &str {
        &self.seq
    }

    async fn send(
        &mut self,
        tokens: &[u32],
        sample: bool,
        sampling: Option<SamplingParams>,
        max_length: u32,
        decode_ahead: u32,
    ) -> Result<()> {
        let first = self.first_step.take();
        let forget_prefixes = if first.is_some() {
            self.forgets = lock(&self.prefixes).take_forgotten();
            self.forgets.clone()
        } else {
            Vec::new()
        };
        let (prefix_id, keep_as) = first.unwrap_or_default();
        let offset = self.ledger.sent(tokens);
        let req = ForwardRequest {
            sequence_id: self.seq.clone(),
            offset,
            tokens: tokens.to_vec(),
            hidden: None,
            sample,
            sampling,
            logprobs: self.logprobs && sample,
            max_length,
            prefix_id,
            keep_as,
            decode_ahead,
            stage_micros: Vec::new(),
            ring_credit: if decode_ahead > 0 { RING_CREDIT } else { 0 },
            forget_prefixes,
        };
        if self.tx.send(req).await.is_err() {
            // The stream broke: the reply read tells why.
            return Err(self.receive().await.err().unwrap_or_else(|| {
                Error::Worker(format!("worker {} closed the stream", self.first))
            }));
        }
        Ok(())
    }

    async fn receive(&mut self) -> Result<ForwardReply> {
        let r = self.receive_one().await;
        self.failed |= r.is_err();
        r
    }

    async fn receive_one(&mut self) -> Result<ForwardReply> {
        let deadline = step_deadline(self.ledger.in_flight_tokens());
        let mut late = 0;
        let reply = loop {
            // Reading a stream's next message is cancel-safe: a timeout
            // loses nothing, and the wait can go on.
            if let Ok(r) = tokio::time::timeout(deadline, self.replies.message()).await {
                break r;
            }
            late += 1;
            let waited = (deadline * late).as_secs_f64();
            let first = format!("worker {}", self.first);
            match self.late_stages().await {
                Late::Silent(s, e) => {
                    return Err(Error::Worker(format!(
                        "the pipeline from {first} gave no reply within {waited:.0} s, and worker {s} does not answer: {e}"
                    )))
                }
                Late::Idle => {
                    // Nothing computes anywhere and yet no reply came: the
                    // step is lost, and waiting longer would wait forever.
                    return Err(Error::Stalled(format!(
                        "sequence {}: the pipeline from {first} gave no reply within {waited:.0} s while every stage answered and none was busy",
                        self.seq
                    )));
                }
                Late::Busy(s, busy) if late < LATE_DEADLINES => tracing::warn!(
                    sequence = %self.seq,
                    "no reply from the pipeline for {waited:.0} s: worker {s} has run one job for {:.0} s (compiling GPU kernels for a new shape, or a long prompt chunk); waiting",
                    busy.as_secs_f64()
                ),
                Late::Busy(s, busy) => {
                    return Err(Error::Worker(format!(
                        "the pipeline from {first} gave no reply within {waited:.0} s; worker {s} has run one job for {:.0} s",
                        busy.as_secs_f64()
                    )))
                }
            }
        };
        match reply {
            Ok(Some(r)) => {
                self.ledger.replied();
                if let Ok(mut m) = self.micros.lock() {
                    *m = r.stage_micros.clone();
                }
                Ok(r)
            }
            Ok(None) => Err(Error::Worker(format!(
                "worker {} ended the stream",
                self.first
            ))),
            Err(s) if s.code() == tonic::Code::Unavailable && !s.message().contains("stage") => {
                Err(Error::Worker(format!(
                    "worker {} failed: {}",
                    self.first,
                    s.message()
                )))
            }
            Err(s) => Err(worker_error(&self.first, s)),
        }
    }

    async fn next_async(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        if !self.ledger.pending() {
            return Err(Error::InvalidArgument("generation has ended".into()));
        }
        let reply = self.receive().await?;
        let token = reply.token.ok_or_else(|| {
            Error::Worker(format!(
                "the last stage returned no token for sequence {}",
                self.seq
            ))
        })?;
        let logprobs = reply.logprobs.as_ref().map(codec::decode).transpose()?;
        match self.ledger.token_read(token, schedule_next) {
            Next::Credit => {
                let credit = ForwardRequest {
                    sequence_id: self.seq.clone(),
                    ring_credit: 1,
                    ..Default::default()
                };
                // A broken stream shows in the next reply.
                let _ = self.tx.send(credit).await;
            }
            // The next step is on its way while the caller handles this token.
            Next::Step(t) => self.send(&[t], true, None, 0, 0).await?,
            Next::Nothing => {}
        }
        Ok((token, logprobs))
    }
}

impl TokenSource for RemoteTokens {
    fn next_token(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        runtime().block_on(self.next_async(schedule_next))
    }

    fn cached_tokens(&self) -> usize {
        self.cached
    }
}

impl Drop for RemoteTokens {
    /// The stages keep the cache of a sequence that ended well (closing the
    /// stream releases it there): note what it holds for later prompts.
    fn drop(&mut self) {
        if !self.failed && self.ledger.ring_running() {
            // Steps still go round the ring: end the stream, then release
            // the sequence at the first stage, behind its step in flight
            // there, so that a sequence started next finds it gone.
            drop(std::mem::replace(&mut self.tx, mpsc::channel(1).0));
            let mut client = self.first.client.clone();
            let req = ReleaseRequest {
                sequence_id: self.seq.clone(),
            };
            let release = async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.release(req)).await;
            };
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime().spawn(release);
            } else {
                runtime().block_on(release);
            }
        }
        if let Some(id) = self.keep.take() {
            let mut index = lock(&self.prefixes);
            if self.failed {
                // A stage before the one that failed may keep it, and the
                // forgets its first step carried may not have gone past it.
                index.requeue(std::mem::take(&mut self.forgets));
                index.remove(&id);
            } else {
                index.insert(id, self.ledger.confirmed());
            }
        }
    }
}

/// A random number fixed for this process, so that sequence ids of
/// different coordinators never collide on a shared worker.
fn process_nonce() -> u64 {
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    })
}
